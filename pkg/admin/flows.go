package admin

import (
	"fmt"
	"net/netip"
	"net/url"
	"strconv"
	"time"
)

// FlowInfo is one entry of the connection table.
type FlowInfo struct {
	ID           uint64         `json:"id"`
	Proto        string         `json:"proto"`
	Client       netip.AddrPort `json:"client"`
	Dest         netip.AddrPort `json:"dest"`
	Egress       netip.AddrPort `json:"egress,omitzero"`
	Peer         string         `json:"peer,omitempty"`
	State        string         `json:"state"`
	OrigBytes    uint64         `json:"orig_bytes"`
	OrigPackets  uint64         `json:"orig_packets"`
	ReplyBytes   uint64         `json:"reply_bytes"`
	ReplyPackets uint64         `json:"reply_packets"`
	Created      time.Time      `json:"created"`
	LastSeen     time.Time      `json:"last_seen"`
}

// FlowEvent reports a new or an ended flow.
type FlowEvent struct {
	Type   string   `json:"type"`             // "new" or "ended"
	Reason string   `json:"reason,omitempty"` // why it ended
	Flow   FlowInfo `json:"flow"`
}

// FlowFilter selects flows; zero fields match everything.
type FlowFilter struct {
	Peer  string       // the peer's name
	Proto string       // tcp, udp or icmp
	Dest  netip.Prefix // destinations inside this prefix
	Port  uint16       // destination port
	State string       // new, established, closing, unreplied, assured
}

// IsZero reports whether f matches every flow.
func (f FlowFilter) IsZero() bool { return f == FlowFilter{} }

// Match reports whether fi passes the filter.
func (f FlowFilter) Match(fi FlowInfo) bool {
	switch {
	case f.Peer != "" && fi.Peer != f.Peer:
	case f.Proto != "" && fi.Proto != f.Proto:
	case f.Dest.IsValid() && !f.Dest.Contains(fi.Dest.Addr().Unmap()):
	case f.Port != 0 && fi.Dest.Port() != f.Port:
	case f.State != "" && fi.State != f.State:
	default:
		return true
	}
	return false
}

// Values encodes the filter as query parameters.
func (f FlowFilter) Values() url.Values {
	v := url.Values{}
	if f.Peer != "" {
		v.Set("peer", f.Peer)
	}
	if f.Proto != "" {
		v.Set("proto", f.Proto)
	}
	if f.Dest.IsValid() {
		v.Set("dest", f.Dest.String())
	}
	if f.Port != 0 {
		v.Set("port", strconv.Itoa(int(f.Port)))
	}
	if f.State != "" {
		v.Set("state", f.State)
	}
	return v
}

var (
	protos = map[string]bool{"tcp": true, "udp": true, "icmp": true}
	states = map[string]bool{"new": true, "established": true, "closing": true, "unreplied": true, "assured": true}
)

// ParseFlowFilter reads a filter from query parameters or flags, naming
// the one that is wrong.
func ParseFlowFilter(v url.Values) (FlowFilter, error) {
	var f FlowFilter
	f.Peer = v.Get("peer")
	if f.Proto = v.Get("proto"); f.Proto != "" && !protos[f.Proto] {
		return f, fmt.Errorf("%w: proto %q: want tcp, udp or icmp", ErrInvalid, f.Proto)
	}
	if s := v.Get("dest"); s != "" {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			a, aerr := netip.ParseAddr(s)
			if aerr != nil {
				return f, fmt.Errorf("%w: dest %q: not a CIDR prefix or address", ErrInvalid, s)
			}
			p = netip.PrefixFrom(a, a.BitLen())
		}
		f.Dest = p.Masked()
	}
	if s := v.Get("port"); s != "" {
		n, err := strconv.ParseUint(s, 10, 16)
		if err != nil || n == 0 {
			return f, fmt.Errorf("%w: port %q: want 1-65535", ErrInvalid, s)
		}
		f.Port = uint16(n)
	}
	if f.State = v.Get("state"); f.State != "" && !states[f.State] {
		return f, fmt.Errorf("%w: state %q: want new, established, closing, unreplied or assured", ErrInvalid, f.State)
	}
	return f, nil
}

// Status is the gateway at a glance, like wg show.
type Status struct {
	// Mode is how clients reach the gateway: "wireguard", or "tun" for a
	// TUN device, which has no key, no listening port and no peers.
	Mode string `json:"mode"`
	// Device is the TUN device's name in TUN mode.
	Device     string       `json:"device,omitempty"`
	PublicKey  string       `json:"public_key,omitempty"`
	ListenPort int          `json:"listen_port,omitempty"`
	Addrs      []netip.Addr `json:"addrs,omitempty"`
	Flows      int          `json:"flows"`
	Peers      []PeerStatus `json:"peers"`
	// Edge is the edge that publishes peers' services; nil without one.
	Edge *EdgeStatus `json:"edge,omitempty"`
}

// EdgeStatus is the edge at a glance: where it listens and what it
// publishes.
type EdgeStatus struct {
	Listeners []string `json:"listeners"` // "http 0.0.0.0:80", "tcp 0.0.0.0:2222"
	Hostnames int      `json:"hostnames"`
	Replicas  int      `json:"replicas"`
	Healthy   int      `json:"healthy"`
}

// PeerStatus is a peer with its flows.
type PeerStatus struct {
	PeerInfo
	Flows int `json:"flows"`
}

func netipParse(s string) (netip.Addr, error) { return netip.ParseAddr(s) }
