// Package nat is sluice's in-process replacement for iptables and conntrack:
// the connection table, the port-sharded egress socket pool, the policy that
// decides which destinations a client may reach, and the UDP and ICMP echo
// mappings that carry datagrams out through egress sockets.
package nat

import (
	"fmt"
	"net/netip"
	"time"
)

// Proto is the transport protocol of a flow, numbered as in the IP header.
// ICMP echo flows of both families use ICMP.
type Proto uint8

// Protocols a flow can have.
const (
	ICMP Proto = 1
	TCP  Proto = 6
	UDP  Proto = 17
)

func (p Proto) String() string {
	switch p {
	case ICMP:
		return "icmp"
	case TCP:
		return "tcp"
	case UDP:
		return "udp"
	}
	return fmt.Sprintf("proto-%d", uint8(p))
}

// State is the tracking state of a flow. It selects the idle timeout, the
// way conntrack's per-state timeouts do.
type State uint8

// Flow states.
const (
	// StateNew is a flow whose egress side is still being set up (a TCP
	// dial in progress).
	StateNew State = iota
	// StateEstablished is a TCP flow whose both sides are open.
	StateEstablished
	// StateClosing is a TCP flow where at least one side has sent FIN.
	StateClosing
	// StateUnreplied is a UDP or ICMP flow that has not seen a reply yet.
	StateUnreplied
	// StateAssured is a UDP or ICMP flow that has seen traffic both ways.
	StateAssured
)

func (s State) String() string {
	switch s {
	case StateNew:
		return "new"
	case StateEstablished:
		return "established"
	case StateClosing:
		return "closing"
	case StateUnreplied:
		return "unreplied"
	case StateAssured:
		return "assured"
	}
	return fmt.Sprintf("state-%d", uint8(s))
}

// Key identifies a flow: the client's address and port as seen inside the
// tunnel and the destination it asked for. For ICMP echo, both ports hold the
// client's echo identifier.
type Key struct {
	Proto  Proto
	Client netip.AddrPort
	Dest   netip.AddrPort
}

func (k Key) String() string {
	return fmt.Sprintf("%s %s->%s", k.Proto, k.Client, k.Dest)
}

// Reason says why a flow ended.
type Reason uint8

// Reasons a flow can end.
const (
	ReasonClosed   Reason = iota // both sides closed normally
	ReasonReset                  // one side reset or failed
	ReasonTimeout                // idle for longer than its state's timeout
	ReasonEvicted                // removed by an operator or a policy change
	ReasonShutdown               // the table was closed
)

func (r Reason) String() string {
	switch r {
	case ReasonClosed:
		return "closed"
	case ReasonReset:
		return "reset"
	case ReasonTimeout:
		return "timeout"
	case ReasonEvicted:
		return "evicted"
	case ReasonShutdown:
		return "shutdown"
	}
	return fmt.Sprintf("reason-%d", uint8(r))
}

// Entry is a point-in-time copy of a flow, as listed by Table.Snapshot and
// carried by events.
type Entry struct {
	ID    uint64
	Key   Key
	Peer  string // the tunnel peer the flow belongs to; empty if unknown
	State State
	// Egress is the local address and port of the egress socket, once known.
	Egress netip.AddrPort

	// Orig counts the client-to-destination direction, Reply the other.
	OrigBytes, OrigPackets   uint64
	ReplyBytes, ReplyPackets uint64

	Created  time.Time
	LastSeen time.Time
}

// EventType tells whether an event reports a new or an ended flow.
type EventType uint8

// Event types.
const (
	EventNew EventType = iota
	EventEnded
)

func (t EventType) String() string {
	if t == EventNew {
		return "new"
	}
	return "ended"
}

// Event reports a flow that was created or has ended. Reason is set for
// EventEnded; the entry's counters are final then.
type Event struct {
	Type   EventType
	Entry  Entry
	Reason Reason
}
