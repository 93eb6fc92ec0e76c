package netstack

import (
	"errors"
	"fmt"
	"net/netip"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
)

// handleUDP sees every UDP datagram (already reassembled by the IP layer).
// No gVisor endpoint is ever created for UDP: the handler's egress mapping
// is the only state, so a client can talk to any number of destinations
// from one port at the cost of one table entry each.
func (s *Stack) handleUDP(id stack.TransportEndpointID, pkt *stack.PacketBuffer) bool {
	uh := header.UDP(pkt.TransportHeader().Slice())
	data := pkt.Data()
	if len(uh) < header.UDPMinimumSize || int(uh.Length()) < header.UDPMinimumSize ||
		int(uh.Length())-header.UDPMinimumSize > data.Size() {
		s.malformed.Add(1)
		return true
	}
	data.CapLength(int(uh.Length()) - header.UDPMinimumSize)
	_, csumValid := header.UDPValid(uh, func() uint16 { return data.Checksum() },
		uint16(data.Size()), pkt.NetworkProtocolNumber, id.RemoteAddress, id.LocalAddress, pkt.RXChecksumValidated)
	if !csumValid {
		s.malformed.Add(1)
		return true
	}
	// The payload is only lent to the handler: a view of the packet,
	// not a copy, when it is contiguous (it nearly always is).
	payload, ok := data.PullUp(data.Size())
	if !ok {
		payload = data.AsRange().ToSlice()
	}

	src := addrPortFrom(id.RemoteAddress, id.RemotePort)
	dst := addrPortFrom(id.LocalAddress, id.LocalPort)
	var err error
	if th, ok := s.opts.Handler.(TTLHandler); ok {
		err = th.HandleUDPTTL(src, dst, ttlOf(pkt.NetworkHeader().Slice()), payload)
	} else {
		err = s.opts.Handler.HandleUDP(src, dst, payload)
	}
	if err != nil {
		s.refuse(quote(pkt), err, RefuseReset)
	}
	return true
}

// ttlOf returns the TTL (hop limit) in an IP header.
func ttlOf(nh []byte) uint8 {
	switch {
	case len(nh) >= 20 && nh[0]>>4 == 4:
		return nh[8]
	case len(nh) >= 40 && nh[0]>>4 == 6:
		return nh[7]
	}
	return 0
}

// refuse answers a refused packet, quoted in q, with the ICMP error that
// the handler's error calls for.
func (s *Stack) refuse(q []byte, err error, fallback Refusal) {
	s.refused.Add(1)
	how := Classify(err)
	if how == RefuseDrop {
		return
	}
	mtu := 0
	if re := (*RefusalError)(nil); errors.As(err, &re) {
		mtu = re.MTU
	}
	s.sendICMPError(q, how, mtu)
}

// WriteUDP sends a datagram to a client, from src (the remote the client
// talks to) to dst (the client's address and port). A datagram larger than
// the MTU is fragmented, for IPv6 too: the stack is the datagram's source
// on the tunnel side, so nothing is lost to the tunnel's smaller MTU.
func (s *Stack) WriteUDP(src, dst netip.AddrPort, payload []byte) error {
	if len(payload) > 0xffff-header.UDPMinimumSize {
		return fmt.Errorf("netstack: UDP payload of %d bytes is too large", len(payload))
	}
	r, err := s.route(src.Addr(), dst.Addr())
	if err != nil {
		return err
	}
	defer r.Release()

	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
		ReserveHeaderBytes: int(r.MaxHeaderLength()) + header.UDPMinimumSize,
		Payload:            buffer.MakeWithData(payload),
	})
	defer pkt.DecRef()
	pkt.TransportProtocolNumber = udp.ProtocolNumber
	length := uint16(pkt.Size() + header.UDPMinimumSize)
	uh := header.UDP(pkt.TransportHeader().Push(header.UDPMinimumSize))
	uh.Encode(&header.UDPFields{SrcPort: src.Port(), DstPort: dst.Port(), Length: length})
	xsum := uh.CalculateChecksum(checksum.Combine(
		header.PseudoHeaderChecksum(udp.ProtocolNumber, r.LocalAddress(), r.RemoteAddress(), length),
		pkt.Data().Checksum()))
	if xsum != 0xffff {
		xsum = ^xsum
	}
	uh.SetChecksum(xsum)

	if terr := r.WritePacket(stack.NetworkHeaderParams{Protocol: udp.ProtocolNumber, TTL: r.DefaultTTL()}, pkt); terr != nil {
		return fmt.Errorf("netstack: write UDP %s->%s: %s", src, dst, terr)
	}
	return nil
}

// route finds the stack's route from a spoofed source to a client.
func (s *Stack) route(src, dst netip.Addr) (*stack.Route, error) {
	src, dst = src.Unmap(), dst.Unmap()
	if src.Is4() != dst.Is4() || !src.IsValid() || !dst.IsValid() {
		return nil, fmt.Errorf("netstack: no route from %s to %s: address families differ", src, dst)
	}
	proto := header.IPv6ProtocolNumber
	if dst.Is4() {
		proto = header.IPv4ProtocolNumber
	}
	r, err := s.stack.FindRoute(nicID, tcpip.AddrFromSlice(src.AsSlice()), tcpip.AddrFromSlice(dst.AsSlice()), proto, false)
	if err != nil {
		return nil, fmt.Errorf("netstack: no route from %s to %s: %s", src, dst, err)
	}
	return r, nil
}
