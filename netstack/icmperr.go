package netstack

import (
	"encoding/binary"
	"net/netip"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// ICMP codes for each refusal: destination unreachable (v4 type 3, v6 type
// 1) unless the refusal is too big.
var (
	icmpv4Codes = map[Refusal]uint8{
		RefuseReset:           3,  // port unreachable
		RefuseNetUnreachable:  0,  // net unreachable
		RefuseHostUnreachable: 1,  // host unreachable
		RefuseProhibited:      13, // communication administratively prohibited
		RefuseTooBig:          4,  // fragmentation needed and DF set
	}
	icmpv6Codes = map[Refusal]uint8{
		RefuseReset:           4, // port unreachable
		RefuseNetUnreachable:  0, // no route to destination
		RefuseHostUnreachable: 3, // address unreachable
		RefuseProhibited:      1, // communication administratively prohibited
	}
)

// sendICMPError tells a client that the packet quoted in q (its IP header
// and at least the first 8 bytes after it) was refused. The error comes
// from the packet's destination, as if from the last router before it.
// Errors are rate-limited like a router's.
func (s *Stack) sendICMPError(q []byte, how Refusal, mtu int) {
	if len(q) == 0 {
		return
	}
	var src, dst netip.Addr
	switch q[0] >> 4 {
	case 4:
		if len(q) < 20 {
			return
		}
		src, dst = netip.AddrFrom4([4]byte(q[12:16])), netip.AddrFrom4([4]byte(q[16:20]))
	case 6:
		if len(q) < 40 {
			return
		}
		src, dst = netip.AddrFrom16([16]byte(q[8:24])), netip.AddrFrom16([16]byte(q[24:40]))
	default:
		return
	}
	// Never answer a packet from an address that cannot be answered.
	if src.IsMulticast() || src.IsUnspecified() || (src.Is4() && src == netip.AddrFrom4([4]byte{255, 255, 255, 255})) {
		return
	}
	if !s.icmpLimit.Allow() {
		return
	}
	if mtu == 0 {
		mtu = int(s.link.MTU())
	}

	r, err := s.route(dst, src)
	if err != nil {
		return
	}
	defer r.Release()

	var msg []byte
	var proto tcpip.TransportProtocolNumber
	if src.Is4() {
		proto = header.ICMPv4ProtocolNumber
		code, ok := icmpv4Codes[how]
		if !ok {
			return
		}
		// RFC 1812: quote as much as fits in 576 bytes.
		q = q[:min(len(q), 576-20-8)]
		msg = make([]byte, 8+len(q))
		msg[0], msg[1] = icmpv4Unreachable, code
		if how == RefuseTooBig {
			binary.BigEndian.PutUint16(msg[6:8], uint16(mtu))
		}
		copy(msg[8:], q)
		binary.BigEndian.PutUint16(msg[2:4], ^checksum.Checksum(msg, 0))
	} else {
		proto = header.ICMPv6ProtocolNumber
		q = q[:min(len(q), header.IPv6MinimumMTU-40-8)]
		msg = make([]byte, 8+len(q))
		if how == RefuseTooBig {
			msg[0] = icmpv6TooBig
			binary.BigEndian.PutUint32(msg[4:8], uint32(mtu))
		} else {
			code, ok := icmpv6Codes[how]
			if !ok {
				return
			}
			msg[0], msg[1] = icmpv6Unreachable, code
		}
		copy(msg[8:], q)
		binary.BigEndian.PutUint16(msg[2:4], ^checksum.Checksum(msg,
			header.PseudoHeaderChecksum(header.ICMPv6ProtocolNumber, r.LocalAddress(), r.RemoteAddress(), uint16(len(msg)))))
	}

	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
		ReserveHeaderBytes: int(r.MaxHeaderLength()),
		Payload:            buffer.MakeWithData(msg),
	})
	defer pkt.DecRef()
	pkt.TransportProtocolNumber = proto
	if r.WritePacket(stack.NetworkHeaderParams{Protocol: proto, TTL: r.DefaultTTL()}, pkt) == nil {
		s.icmpSent.Add(1)
	}
}
