package netstack

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// handleICMPv4 sees ICMPv4 messages addressed to the destinations the
// stack stands in for. gVisor does not answer echo requests for addresses
// it accepted only through promiscuous mode; they come here, reassembled.
func (s *Stack) handleICMPv4(id stack.TransportEndpointID, pkt *stack.PacketBuffer) bool {
	h := header.ICMPv4(pkt.TransportHeader().Slice())
	if len(h) < header.ICMPv4MinimumSize || h.Type() != header.ICMPv4Echo {
		return true
	}
	data := pkt.Data()
	if checksum.Checksum(h, data.Checksum()) != 0xffff || h.Code() != 0 {
		s.malformed.Add(1)
		return true
	}
	// The payload is only lent to the handler: a view of the packet,
	// not a copy, when it is contiguous (it nearly always is).
	payload, ok := data.PullUp(data.Size())
	if !ok {
		payload = data.AsRange().ToSlice()
	}
	src, dst := addrFrom(id.RemoteAddress), addrFrom(id.LocalAddress)
	if err := s.handleEcho(src, dst, ttlOf(pkt.NetworkHeader().Slice()), h.Ident(), h.Sequence(), payload); err != nil {
		s.refuse(quote(pkt), err, RefuseDrop)
	}
	return true
}

// interceptICMPv6 takes IPv6 echo requests out of the path into gVisor,
// which would otherwise answer them itself. It reports whether it consumed
// the packet. Fragmented ICMPv6 is reassembled here, for the same reason.
func (s *Stack) interceptICMPv6(b []byte, pi packetInfo) bool {
	off, nh := 40, pi.proto
	for {
		switch nh {
		case 0, 43, 60: // hop-by-hop, routing, destination options
			if len(b) < off+8 {
				s.malformed.Add(1)
				return true
			}
			nh, off = b[off], off+8+int(b[off+1])*8
			continue
		case 44: // fragment
			if len(b) < off+8 {
				s.malformed.Add(1)
				return true
			}
			if b[off] != protoICMPv6 {
				return false
			}
			msg, ok := s.frag6.add(pi.src, pi.dst, b[off:], time.Now())
			if !ok {
				// Counted where gVisor counts the fragments it rejects
				// (Stats.Malformed): the packet itself parsed.
				s.stack.Stats().IP.MalformedFragmentsReceived.Increment()
				return true
			}
			if msg == nil {
				return true // more to come
			}
			if len(msg) < header.ICMPv6EchoMinimumSize || msg[0] != icmpv6Echo {
				// Only echo requests are ours; gVisor would take the
				// rest whole, not in fragments.
				s.unsupported.Add(1)
				return true
			}
			// What an error quotes: the header as if unfragmented.
			q := make([]byte, 40, 48)
			copy(q, b[:40])
			binary.BigEndian.PutUint16(q[4:6], uint16(len(msg)))
			q[6] = protoICMPv6
			s.echoV6(msg, pi, ttlOf(b), append(q, msg[:8]...))
			return true
		case protoICMPv6:
		default:
			return false
		}
		break
	}
	if len(b) < off+header.ICMPv6EchoMinimumSize || b[off] != icmpv6Echo {
		return false
	}
	s.echoV6(b[off:], pi, ttlOf(b), b[:min(len(b), off+8)])
	return true
}

// echoV6 hands a client's ICMPv6 echo request, msg, which came with hop
// limit ttl, to the handler; q is what an error about it quotes.
func (s *Stack) echoV6(msg []byte, pi packetInfo, ttl uint8, q []byte) {
	srcA, dstA := tcpip.AddrFrom16(pi.src.As16()), tcpip.AddrFrom16(pi.dst.As16())
	if checksum.Checksum(msg, header.PseudoHeaderChecksum(header.ICMPv6ProtocolNumber, srcA, dstA, uint16(len(msg)))) != 0xffff || msg[1] != 0 {
		s.malformed.Add(1)
		return
	}
	if pi.dst.IsMulticast() {
		// The gateway stands in for unicast destinations only.
		s.unsupported.Add(1)
		return
	}
	ident := binary.BigEndian.Uint16(msg[4:6])
	seq := binary.BigEndian.Uint16(msg[6:8])
	if err := s.handleEcho(pi.src, pi.dst, ttl, ident, seq, msg[8:]); err != nil {
		s.refuse(q, err, RefuseDrop)
	}
}

// WriteEchoReply sends an echo reply to a client: src is the destination
// that answered, dst the client, id and seq the client's own.
func (s *Stack) WriteEchoReply(src, dst netip.Addr, id, seq uint16, payload []byte) error {
	r, err := s.route(src, dst)
	if err != nil {
		return err
	}
	defer r.Release()
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
		ReserveHeaderBytes: int(r.MaxHeaderLength()) + header.ICMPv4MinimumSize,
		Payload:            buffer.MakeWithData(payload),
	})
	defer pkt.DecRef()

	var proto tcpip.TransportProtocolNumber
	if r.NetProto() == header.IPv4ProtocolNumber {
		proto = header.ICMPv4ProtocolNumber
		h := header.ICMPv4(pkt.TransportHeader().Push(header.ICMPv4MinimumSize))
		h.SetType(header.ICMPv4EchoReply)
		h.SetCode(0)
		h.SetIdent(id)
		h.SetSequence(seq)
		h.SetChecksum(0)
		h.SetChecksum(^checksum.Checksum(h, pkt.Data().Checksum()))
	} else {
		proto = header.ICMPv6ProtocolNumber
		h := header.ICMPv6(pkt.TransportHeader().Push(header.ICMPv6MinimumSize))
		h.SetType(header.ICMPv6EchoReply)
		h.SetCode(0)
		h.SetIdent(id)
		h.SetSequence(seq)
		h.SetChecksum(0)
		h.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{
			Header: h, Src: r.LocalAddress(), Dst: r.RemoteAddress(),
			PayloadCsum: pkt.Data().Checksum(), PayloadLen: pkt.Data().Size(),
		}))
	}
	pkt.TransportProtocolNumber = proto
	if terr := r.WritePacket(stack.NetworkHeaderParams{Protocol: proto, TTL: r.DefaultTTL()}, pkt); terr != nil {
		return fmt.Errorf("netstack: write echo reply %s->%s: %s", src, dst, terr)
	}
	return nil
}
