// Package netstack terminates the flows that clients send into a tunnel. It
// is a gVisor network stack in promiscuous and spoofing mode: it accepts
// packets for any destination and answers as that destination. Its outer
// face is a golang.zx2c4.com/wireguard/tun.Device, so any packet source can
// drive it; its inner face is a Handler that the gateway supplies, which
// decides what happens to each flow.
//
// netstack never opens a socket itself and knows nothing of egress pools or
// connection tables. Nothing gVisor-specific leaves the package: the seams
// use net.Conn, netip and plain errors.
package netstack

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"syscall"
)

// Handler decides the fate of every flow a client opens. Its methods are
// called concurrently.
type Handler interface {
	// DialTCP is called once for each client SYN, before the client's
	// handshake completes: the stack completes it only if DialTCP returns a
	// connection, then relays bytes between the two until both directions
	// have closed, and finally closes the connection. An error refuses the
	// client the way a real path would: see Refuse and Classify. ctx is
	// cancelled when the stack closes.
	//
	// If the connection has a CloseWrite method (as *net.TCPConn has), a
	// client's FIN is passed on as CloseWrite. If it implements
	// SegmentCounter, the stack reports the client side's segment counts
	// through it.
	DialTCP(ctx context.Context, src, dst netip.AddrPort) (net.Conn, error)

	// HandleUDP is called for each datagram a client sends. payload is only
	// valid during the call. Replies go back through Stack.WriteUDP. An
	// error refuses the datagram with the matching ICMP error.
	HandleUDP(src, dst netip.AddrPort, payload []byte) error

	// HandleEcho is called for each ICMP or ICMPv6 echo request a client
	// sends. The stack never answers a ping itself: the handler passes it
	// on, and a real reply comes back through Stack.WriteEchoReply. payload
	// is only valid during the call.
	HandleEcho(src, dst netip.Addr, id, seq uint16, payload []byte) error
}

// A Batcher is a Handler that may hold what it is handed (UDP datagrams,
// say, to send a run of them at once) until the end of the batch of
// packets they came in: the stack calls FlushBatch after each Write, on
// the writer's goroutine, once every packet of the Write has been handled.
type Batcher interface {
	FlushBatch()
}

// TryReader is an optional interface of the connections that
// Handler.DialTCP returns: TryRead reads what is there without waiting,
// and reports ok false, with nothing read and no error, when nothing is
// (the errors and EOF are Read's). The stack then keeps its copy buffer
// between the reads of a bulk transfer without checking readiness before
// each, yet holds none while the connection pauses.
type TryReader interface {
	TryRead(p []byte) (n int, ok bool, err error)
}

// SegmentCounter is an optional interface of the connections that
// Handler.DialTCP returns. The stack reports through it, as increments,
// the TCP packets that crossed the tunnel each way while the connection
// was relayed (counted on the wire: before GRO merges them, after GSO
// segments are cut); the byte counts are what the connection itself sees.
type SegmentCounter interface {
	CountSegments(fromClient, toClient uint64)
}

// Refusal is the way the stack turns a flow away.
type Refusal uint8

// Refusals, each answered as a real network path would answer.
const (
	// RefuseReset answers a TCP SYN with RST and a UDP datagram with ICMP
	// port unreachable: nothing listens there.
	RefuseReset Refusal = iota + 1
	// RefuseNetUnreachable answers with ICMP network unreachable (v6: no
	// route to destination).
	RefuseNetUnreachable
	// RefuseHostUnreachable answers with ICMP host unreachable (v6: address
	// unreachable).
	RefuseHostUnreachable
	// RefuseProhibited answers with ICMP communication administratively
	// prohibited.
	RefuseProhibited
	// RefuseTooBig answers with ICMP fragmentation needed (v6: packet too
	// big). It only makes sense for datagrams.
	RefuseTooBig
	// RefuseDrop drops the packet silently, as an overloaded path does.
	RefuseDrop
)

func (r Refusal) String() string {
	switch r {
	case RefuseReset:
		return "reset"
	case RefuseNetUnreachable:
		return "net-unreachable"
	case RefuseHostUnreachable:
		return "host-unreachable"
	case RefuseProhibited:
		return "prohibited"
	case RefuseTooBig:
		return "too-big"
	case RefuseDrop:
		return "drop"
	}
	return "unknown"
}

// RefusalError carries the refusal a handler chose for an error.
type RefusalError struct {
	Refusal Refusal
	// MTU is the path MTU reported with RefuseTooBig; zero means the
	// stack's own MTU.
	MTU int
	Err error
}

func (e *RefusalError) Error() string {
	if e.Err == nil {
		return "refused: " + e.Refusal.String()
	}
	return e.Err.Error()
}

func (e *RefusalError) Unwrap() error { return e.Err }

// Refuse wraps err so that the stack refuses the flow with r.
func Refuse(r Refusal, err error) error {
	return &RefusalError{Refusal: r, Err: err}
}

// Classify returns the refusal the stack uses for a handler's error: the
// one a RefusalError carries, else the one that matches the socket error
// (connection refused: reset; network unreachable; host unreachable or a
// timeout: host unreachable; message too long: too big), else reset.
func Classify(err error) Refusal {
	var re *RefusalError
	switch {
	case errors.As(err, &re):
		return re.Refusal
	case errors.Is(err, syscall.ECONNREFUSED):
		return RefuseReset
	case errors.Is(err, syscall.ENETUNREACH):
		return RefuseNetUnreachable
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ETIMEDOUT),
		errors.Is(err, os.ErrDeadlineExceeded), errors.Is(err, context.DeadlineExceeded):
		return RefuseHostUnreachable
	case errors.Is(err, syscall.EMSGSIZE):
		return RefuseTooBig
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		return RefuseProhibited
	}
	return RefuseReset
}
