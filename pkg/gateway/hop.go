package gateway

import (
	"net/netip"

	"github.com/sluice-vpn/sluice/nat"
	"github.com/sluice-vpn/sluice/netstack"
)

// The gateway as a hop on its clients' paths: it answers a packet whose
// TTL runs out at it, and passes on the ICMP errors that come back for
// their datagrams.

var (
	_ netstack.Router     = (*handler)(nil)
	_ netstack.TTLHandler = (*handler)(nil)
)

// RouterAddr implements netstack.Router: the gateway is the first hop of
// its clients' paths, and answers as one from its own address in the
// client's family.
func (h *handler) RouterAddr(src, dst netip.Addr) netip.Addr {
	if h.own[dst.Unmap()] {
		return netip.Addr{}
	}
	for _, a := range h.opts.Addrs {
		if a.Unmap().Is4() == src.Unmap().Is4() {
			return a.Unmap()
		}
	}
	return netip.Addr{}
}

// deliverUDPError passes on to the client an ICMP error that came back
// for its datagram: a hop's time exceeded from the hop, the others from
// the destination, as the host or the last router before it.
func (s *Server) deliverUDPError(remote, client netip.AddrPort, payload []byte, e nat.ICMPError) {
	if e.TimeExceeded {
		s.stack.WriteTimeExceeded(e.From, client, remote, payload)
		return
	}
	s.stack.WriteUDPError(client, remote, payload, e.Err)
}

// deliverEchoError passes on to the client an ICMP error that came back
// for its echo request, as deliverUDPError does.
func (s *Server) deliverEchoError(client, dst netip.Addr, id, seq uint16, payload []byte, e nat.ICMPError) {
	if e.TimeExceeded {
		s.stack.WriteEchoTimeExceeded(e.From, client, dst, id, seq, payload)
		return
	}
	s.stack.WriteEchoUnreachable(client, dst, id, seq, payload, e.Err)
}
