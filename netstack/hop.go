package netstack

import "net/netip"

// A Router is a Handler that makes the stack a hop on its clients' paths,
// as a gateway is: a packet that reaches it with its TTL (hop limit) at 1
// or 0, and that is to be passed on rather than taken by the gateway
// itself, goes no further and is answered with ICMP time exceeded from the
// gateway's own address, as a router answers (which is what traceroute
// shows as the gateway's hop).
type Router interface {
	// RouterAddr returns the address to answer a packet from src to dst
	// from, or the zero Addr if dst is the gateway's own (the packet has
	// arrived, whatever its TTL) or the gateway has no address in src's
	// family (then the packet is passed on as it is).
	RouterAddr(src, dst netip.Addr) netip.Addr
}

// A TTLHandler is a Handler that is told the TTL (hop limit) each UDP
// datagram and echo request arrived with: the stack calls HandleUDPTTL
// and HandleEchoTTL instead of HandleUDP and HandleEcho. A router passes a
// packet on with one less, which is what lets traceroute see the hops past
// the gateway. Packets whose TTL runs out at the gateway never reach it
// (see Router).
type TTLHandler interface {
	HandleUDPTTL(src, dst netip.AddrPort, ttl uint8, payload []byte) error
	HandleEchoTTL(src, dst netip.Addr, ttl uint8, id, seq uint16, payload []byte) error
}

// handleEcho passes an echo request to the handler, with its TTL if the
// handler wants it.
func (s *Stack) handleEcho(src, dst netip.Addr, ttl uint8, id, seq uint16, payload []byte) error {
	if th, ok := s.opts.Handler.(TTLHandler); ok {
		return th.HandleEchoTTL(src, dst, ttl, id, seq, payload)
	}
	return s.opts.Handler.HandleEcho(src, dst, id, seq, payload)
}

// stopsHere reports whether a client's packet goes no further than the
// gateway, as a router would stop it, and answers it if a router would.
func (s *Stack) stopsHere(b []byte, pi packetInfo) bool {
	return s.echoToGroup(b, pi) || s.hopExpired(b, pi)
}

// echoToGroup drops and counts echo requests to a broadcast or multicast
// address: a router passes on neither, and the gateway, which relays each
// ping to one destination and hands back only that destination's reply,
// has no one destination to ask. (IPv6 multicast echo is also refused in
// interceptICMPv6.)
func (s *Stack) echoToGroup(b []byte, pi packetInfo) bool {
	if !pi.dst.IsMulticast() && pi.dst != netip.AddrFrom4([4]byte{255, 255, 255, 255}) {
		return false
	}
	if len(b) <= pi.hdrLen {
		return false
	}
	if pi.version == 4 && pi.proto == protoICMPv4 && b[pi.hdrLen] == icmpv4Echo ||
		pi.version == 6 && pi.proto == protoICMPv6 && b[pi.hdrLen] == icmpv6Echo {
		s.unsupported.Add(1)
		return true
	}
	return false
}

// hopExpired reports whether a client's packet ran out of TTL at the
// gateway, and answers it if so. It is not answered if it is itself an
// ICMP error (RFC 1122 3.2.2), nor if it is a fragment after the first,
// whose sender hears of the first.
func (s *Stack) hopExpired(b []byte, pi packetInfo) bool {
	if ttlOf(b) > 1 {
		return false
	}
	r, ok := s.opts.Handler.(Router)
	if !ok {
		return false
	}
	from := r.RouterAddr(pi.src, pi.dst)
	if !from.IsValid() {
		return false
	}
	if pi.dst.IsMulticast() || (pi.version == 4 && isLaterFragment(b)) || isICMPError(b, pi) {
		return true
	}
	s.sendICMP(b, from, timeExceeded) // it quotes what fits
	return true
}

// isLaterFragment reports whether an IPv4 packet is a fragment with a
// non-zero offset.
func isLaterFragment(b []byte) bool { return (uint16(b[6])<<8|uint16(b[7]))&0x1fff != 0 }

// isICMPError reports whether a packet is an ICMP error message, which
// no ICMP error may answer. IPv6 extension headers are not followed: a
// packet with them is taken not to be one.
func isICMPError(b []byte, pi packetInfo) bool {
	if len(b) <= pi.hdrLen {
		return false
	}
	t := b[pi.hdrLen]
	switch {
	case pi.version == 4 && pi.proto == protoICMPv4:
		return t != icmpv4Echo && t != icmpv4EchoReply && t < 13 // 13-18 are queries
	case pi.version == 6 && pi.proto == protoICMPv6:
		return t < 128
	}
	return false
}
