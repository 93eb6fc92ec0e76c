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

// icmpKind is an ICMP error's type and code, per family, and for too
// big the MTU to report.
type icmpKind struct {
	type4, code4, type6, code6 uint8
	info                       uint32 // the 32 bits after the checksum
}

// kindOf returns the ICMP error for a refusal; ok is false for a refusal
// that has none in the family.
func kindOf(how Refusal, mtu int, v4 bool) (k icmpKind, ok bool) {
	if how == RefuseTooBig {
		if v4 {
			return icmpKind{type4: icmpv4Unreachable, code4: icmpv4Codes[how], info: uint32(uint16(mtu))}, true
		}
		return icmpKind{type6: icmpv6TooBig, info: uint32(mtu)}, true
	}
	if v4 {
		code, ok := icmpv4Codes[how]
		return icmpKind{type4: icmpv4Unreachable, code4: code}, ok
	}
	code, ok := icmpv6Codes[how]
	return icmpKind{type6: icmpv6Unreachable, code6: code}, ok
}

// timeExceeded is ICMP time exceeded, TTL (hop limit) exceeded in transit.
var timeExceeded = icmpKind{type4: icmpv4TimeExceeded, type6: icmpv6TimeExceeded}

// sendICMPError tells a client that the packet quoted in q (its IP header
// and at least the first 8 bytes after it) was refused. The error comes
// from the packet's destination, as if from the last router before it.
// Errors are rate-limited like a router's.
func (s *Stack) sendICMPError(q []byte, how Refusal, mtu int) {
	if len(q) == 0 {
		return
	}
	if mtu == 0 {
		mtu = int(s.link.MTU())
	}
	k, ok := kindOf(how, mtu, q[0]>>4 == 4)
	if !ok {
		return
	}
	s.sendICMP(q, netip.Addr{}, k)
}

// sendICMP sends the client whose packet is quoted in q the ICMP error k,
// from from, or from the packet's destination if from is the zero Addr.
func (s *Stack) sendICMP(q []byte, from netip.Addr, k icmpKind) {
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
	if !from.IsValid() {
		from = dst
	}
	if !s.icmpLimit.Allow() {
		return
	}

	r, err := s.route(from, src)
	if err != nil {
		return
	}
	defer r.Release()

	var msg []byte
	var proto tcpip.TransportProtocolNumber
	if src.Is4() {
		proto = header.ICMPv4ProtocolNumber
		// RFC 1812: quote as much as fits in 576 bytes.
		q = q[:min(len(q), 576-20-8)]
		msg = make([]byte, 8+len(q))
		msg[0], msg[1] = k.type4, k.code4
		binary.BigEndian.PutUint32(msg[4:8], k.info)
		copy(msg[8:], q)
		binary.BigEndian.PutUint16(msg[2:4], ^checksum.Checksum(msg, 0))
	} else {
		proto = header.ICMPv6ProtocolNumber
		q = q[:min(len(q), header.IPv6MinimumMTU-40-8)]
		msg = make([]byte, 8+len(q))
		msg[0], msg[1] = k.type6, k.code6
		binary.BigEndian.PutUint32(msg[4:8], k.info)
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

// udpQuote rebuilds the start of a datagram a client sent, from client to
// remote with payload, as an ICMP error quotes it: the client's stack
// matches the error to its socket by the addresses and ports.
func udpQuote(client, remote netip.AddrPort, payload []byte) []byte {
	c, r := client.Addr().Unmap(), remote.Addr().Unmap()
	if c.Is4() != r.Is4() {
		return nil
	}
	udpLen := 8 + len(payload)
	var q []byte
	if c.Is4() {
		q = make([]byte, 20, 20+udpLen)
		q[0] = 0x45
		binary.BigEndian.PutUint16(q[2:4], uint16(min(20+udpLen, 0xffff)))
		q[8], q[9] = 1, protoUDP // the TTL it had when it ran out, or one left
		copy(q[12:16], c.AsSlice())
		copy(q[16:20], r.AsSlice())
		binary.BigEndian.PutUint16(q[10:12], ^checksum.Checksum(q[:20], 0))
	} else {
		q = make([]byte, 40, 40+udpLen)
		q[0] = 0x60
		binary.BigEndian.PutUint16(q[4:6], uint16(min(udpLen, 0xffff)))
		q[6], q[7] = protoUDP, 1
		copy(q[8:24], c.AsSlice())
		copy(q[24:40], r.AsSlice())
	}
	q = binary.BigEndian.AppendUint16(q, client.Port())
	q = binary.BigEndian.AppendUint16(q, remote.Port())
	q = binary.BigEndian.AppendUint16(q, uint16(min(udpLen, 0xffff)))
	q = append(q, 0, 0) // no checksum: the quote is cut short anyway
	return append(q, payload[:min(len(payload), 512)]...)
}

// WriteUDPError tells a client that a datagram it sent from client to
// remote, of which payload is what came back, met err on the way: a
// closed port (syscall.ECONNREFUSED) is answered with port unreachable,
// the others as Classify says, from remote, as the host or the last
// router before it would. It is for errors that come back after the
// datagram left, such as an ICMP error on the egress socket. Errors are
// rate-limited like the stack's others.
func (s *Stack) WriteUDPError(client, remote netip.AddrPort, payload []byte, err error) {
	q := udpQuote(client, remote, payload)
	if q == nil {
		return
	}
	how := Classify(err)
	if how == RefuseDrop || how == RefuseTooBig {
		return
	}
	s.sendICMPError(q, how, 0)
}

// WriteTimeExceeded tells a client that a datagram it sent from client to
// remote ran out of TTL (hop limit) at the router hop, a traceroute's
// answer.
func (s *Stack) WriteTimeExceeded(hop netip.Addr, client, remote netip.AddrPort, payload []byte) {
	if q := udpQuote(client, remote, payload); q != nil {
		s.sendICMP(q, hop.Unmap(), timeExceeded)
	}
}

// echoQuote rebuilds the start of an echo request a client sent, as an
// ICMP error quotes it: the client matches the error to its ping by the
// identifier and sequence.
func echoQuote(client, dst netip.Addr, id, seq uint16, payload []byte) []byte {
	c, d := client.Unmap(), dst.Unmap()
	if c.Is4() != d.Is4() {
		return nil
	}
	payload = payload[:min(len(payload), 512)]
	echo := make([]byte, 8, 8+len(payload))
	echo[0] = icmpv4Echo
	binary.BigEndian.PutUint16(echo[4:6], id)
	binary.BigEndian.PutUint16(echo[6:8], seq)
	echo = append(echo, payload...)
	var q []byte
	if c.Is4() {
		q = make([]byte, 20, 20+len(echo))
		q[0] = 0x45
		binary.BigEndian.PutUint16(q[2:4], uint16(20+len(echo)))
		q[8], q[9] = 1, protoICMPv4
		copy(q[12:16], c.AsSlice())
		copy(q[16:20], d.AsSlice())
		binary.BigEndian.PutUint16(q[10:12], ^checksum.Checksum(q[:20], 0))
		binary.BigEndian.PutUint16(echo[2:4], ^checksum.Checksum(echo, 0))
	} else {
		q = make([]byte, 40, 40+len(echo))
		q[0] = 0x60
		binary.BigEndian.PutUint16(q[4:6], uint16(len(echo)))
		q[6], q[7] = protoICMPv6, 1
		copy(q[8:24], c.AsSlice())
		copy(q[24:40], d.AsSlice())
		echo[0] = icmpv6Echo
		binary.BigEndian.PutUint16(echo[2:4], ^checksum.Checksum(echo, header.PseudoHeaderChecksum(
			header.ICMPv6ProtocolNumber, tcpip.AddrFrom16(c.As16()), tcpip.AddrFrom16(d.As16()), uint16(len(echo)))))
	}
	return append(q, echo...)
}

// WriteEchoTimeExceeded tells a client that an echo request it sent to
// dst, with its identifier id and sequence seq (payload being what came
// back of it), ran out of TTL at the router hop: traceroute by ping.
func (s *Stack) WriteEchoTimeExceeded(hop, client, dst netip.Addr, id, seq uint16, payload []byte) {
	if q := echoQuote(client, dst, id, seq, payload); q != nil {
		s.sendICMP(q, hop.Unmap(), timeExceeded)
	}
}

// WriteEchoUnreachable tells a client that an echo request it sent to dst
// met err on the way (syscall.EHOSTUNREACH, ...), as Classify reads it,
// from dst as the last router before it would.
func (s *Stack) WriteEchoUnreachable(client, dst netip.Addr, id, seq uint16, payload []byte, err error) {
	q := echoQuote(client, dst, id, seq, payload)
	how := Classify(err)
	if q == nil || how == RefuseDrop || how == RefuseTooBig {
		return
	}
	s.sendICMPError(q, how, 0)
}
