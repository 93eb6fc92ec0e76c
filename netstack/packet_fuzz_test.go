package netstack

import (
	"bytes"
	"net/netip"
	"testing"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// FuzzInspect checks the first parser every client packet meets: inspect
// never panics, and what it accepts is consistent with the bytes: the
// length it trims to lies between the header and the buffer, and the
// addresses are the ones in the header.
func FuzzInspect(f *testing.F) {
	for _, seed := range seedPackets(f) {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		pi, ok := inspect(b)
		if !ok {
			return
		}
		n := ipLen(b, pi)
		if n < pi.hdrLen || n > len(b) || pi.hdrLen < 20 {
			t.Fatalf("accepted: header %d, IP length %d, buffer %d", pi.hdrLen, n, len(b))
		}
		switch pi.version {
		case 4:
			if pi.src != netip.AddrFrom4([4]byte(b[12:16])) || pi.dst != netip.AddrFrom4([4]byte(b[16:20])) || pi.proto != b[9] {
				t.Fatalf("v4 fields differ from the header: %+v", pi)
			}
		case 6:
			if pi.hdrLen != 40 || pi.proto != b[6] || pi.src != netip.AddrFrom16([16]byte(b[8:24])) {
				t.Fatalf("v6 fields differ from the header: %+v", pi)
			}
		default:
			t.Fatalf("accepted version %d", pi.version)
		}
		// What the stack is handed (b[:n]) must itself pass, or a
		// packet could change meaning on its way in.
		pi2, ok := inspect(b[:n])
		if !ok || pi2 != pi || ipLen(b[:n], pi2) != n {
			t.Fatalf("trimmed packet inspects differently: %+v %v, was %+v", pi2, ok, pi)
		}
	})
}

// FuzzVirtioHeader checks the virtio-net header that a TUN device puts in
// front of each packet: decode and encode round-trip, and checkVirtio
// never panics and only lets through GSO types that match the packet.
func FuzzVirtioHeader(f *testing.F) {
	for _, seed := range seedPackets(f) {
		f.Add([]byte{virtioNeedsCsum, virtioGSOTCPv4, 40, 0, 100, 0, 20, 0, 16, 0}, seed)
		f.Add([]byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, seed)
		f.Add([]byte{virtioDataValid, virtioGSOTCPv6 | virtioGSOECN, 60, 0, 0xa0, 5, 40, 0, 16, 0}, seed)
	}
	f.Fuzz(func(t *testing.T, hdr, pkt []byte) {
		if len(hdr) < VirtioNetHdrLen {
			return
		}
		var h virtioHdr
		h.decode(hdr)
		out := make([]byte, VirtioNetHdrLen)
		h.encode(out)
		if !bytes.Equal(out, hdr[:VirtioNetHdrLen]) {
			t.Fatalf("encode(decode(%x)) = %x", hdr[:VirtioNetHdrLen], out)
		}
		pi, ok := inspect(pkt)
		if !ok {
			return
		}
		pkt = pkt[:ipLen(pkt, pi)]
		if !checkVirtio(&h, pkt, pi) {
			return
		}
		switch h.gsoType &^ virtioGSOECN {
		case virtioGSONone:
		case virtioGSOTCPv4:
			if pi.version != 4 || pi.proto != protoTCP {
				t.Fatalf("TCPv4 GSO accepted for version %d proto %d", pi.version, pi.proto)
			}
		case virtioGSOTCPv6:
			if pi.version != 6 || pi.proto != protoTCP {
				t.Fatalf("TCPv6 GSO accepted for version %d proto %d", pi.version, pi.proto)
			}
		default:
			t.Fatalf("GSO type %d accepted", h.gsoType)
		}
		if segs := gsoSegments(&h, len(pkt)); segs < 1 {
			t.Fatalf("%d segments", segs)
		}
	})
}

// FuzzSegmenter cuts GSO packets as gVisor's TCP hands them to the link
// (a well-formed IP header of L3HdrLen bytes, a TCP header with options,
// any payload, any MSS, in buffers split anywhere) and checks the
// segments: each within MSS, together the payload in order, with
// sequence numbers that follow it and valid checksums. The segmenter
// takes no input from outside the process; this holds its arithmetic to
// account over sizes the unit tests do not try.
func FuzzSegmenter(f *testing.F) {
	f.Add(false, uint16(1000), uint8(0), uint16(7), uint16(3600), uint8(header.TCPFlagAck|header.TCPFlagFin))
	f.Add(true, uint16(1440), uint8(3), uint16(50), uint16(4000), uint8(header.TCPFlagAck|header.TCPFlagPsh))
	f.Add(false, uint16(1), uint8(10), uint16(1), uint16(3), uint8(header.TCPFlagAck))
	f.Add(true, uint16(536), uint8(0), uint16(0), uint16(0), uint8(header.TCPFlagAck|header.TCPFlagCwr))
	// The payload's bytes steer nothing, only its length does: a pattern
	// stands for them, which keeps inputs small for the fuzzer to minimise.
	f.Fuzz(func(t *testing.T, v6 bool, mss uint16, optWords uint8, chunk uint16, size uint16, flags uint8) {
		if mss == 0 {
			return // gVisor never hands the link a GSO packet without an MSS
		}
		optWords %= 11 // a TCP header is at most 60 bytes
		payload := make([]byte, min(int(size), gsoMaxSize))
		for i := range payload {
			payload[i] = byte(i*7 + i>>8)
		}
		l3 := header.IPv4MinimumSize
		src, dst := tcpip.AddrFrom4([4]byte{192, 0, 2, 1}), tcpip.AddrFrom4([4]byte{100, 96, 0, 2})
		if v6 {
			l3 = header.IPv6MinimumSize
			src = tcpip.AddrFrom16(netip.MustParseAddr("2001:db8::1").As16())
			dst = tcpip.AddrFrom16(netip.MustParseAddr("fd5c:1ce::2").As16())
		}
		tl := header.TCPMinimumSize + 4*int(optWords)
		b := make([]byte, l3+tl+len(payload))
		if v6 {
			header.IPv6(b).Encode(&header.IPv6Fields{PayloadLength: uint16(len(b) - l3), TransportProtocol: 6, HopLimit: 64, SrcAddr: src, DstAddr: dst})
		} else {
			ip := header.IPv4(b)
			ip.Encode(&header.IPv4Fields{TotalLength: uint16(len(b)), ID: 65530, TTL: 64, Protocol: 6, SrcAddr: src, DstAddr: dst})
			ip.SetChecksum(^ip.CalculateChecksum())
		}
		const seq = 0xffffff00
		tcp := header.TCP(b[l3:])
		tcp.Encode(&header.TCPFields{SrcPort: 443, DstPort: 40000, SeqNum: seq, AckNum: 7, DataOffset: uint8(tl), Flags: header.TCPFlags(flags), WindowSize: 1000})
		for i := l3 + header.TCPMinimumSize; i < l3+tl; i++ {
			b[i] = 1 // NOP options
		}
		copy(b[l3+tl:], payload)
		tcp.SetChecksum(header.PseudoHeaderChecksum(6, src, dst, uint16(len(b)-l3)))

		var buf buffer.Buffer
		step := max(1, int(chunk))
		for off := 0; off < len(b); off += step {
			buf.Append(buffer.NewViewWithData(b[off:min(off+step, len(b))]))
		}
		pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buf})
		pkt.GSOOptions = stack.GSO{Type: stack.GSOTCPv4, NeedsCsum: true, CsumOffset: 16, MSS: mss, L3HdrLen: uint16(l3)}
		if v6 {
			pkt.GSOOptions.Type = stack.GSOTCPv6
		}
		defer pkt.DecRef()

		var sg segmenter
		if !sg.load(pkt) {
			t.Fatal("load refused a well-formed GSO packet")
		}
		want := sg.segments()
		var got []byte
		seg := 0
		out := make([]byte, l3+tl+int(mss))
		for sg.busy {
			n, ok := sg.next(out)
			if !ok {
				t.Fatalf("segment %d: next failed with a buffer of header+MSS", seg)
			}
			p := out[:n]
			var s, d tcpip.Address
			if v6 {
				ip := header.IPv6(p)
				if int(ip.PayloadLength()) != n-l3 {
					t.Fatalf("segment %d: payload length %d in a %d-byte packet", seg, ip.PayloadLength(), n)
				}
				s, d = ip.SourceAddress(), ip.DestinationAddress()
			} else {
				ip := header.IPv4(p)
				if !ip.IsChecksumValid() || int(ip.TotalLength()) != n || ip.ID() != uint16(65530+seg) {
					t.Fatalf("segment %d: bad IPv4 header %x", seg, p[:l3])
				}
				s, d = ip.SourceAddress(), ip.DestinationAddress()
			}
			if checksum.Checksum(p[l3:], header.PseudoHeaderChecksum(6, s, d, uint16(n-l3))) != 0xffff {
				t.Fatalf("segment %d: bad TCP checksum", seg)
			}
			th := header.TCP(p[l3:])
			if th.SequenceNumber() != seq+uint32(len(got)) {
				t.Fatalf("segment %d: seq %#x, want %#x", seg, th.SequenceNumber(), seq+uint32(len(got)))
			}
			if len(th.Payload()) > int(mss) {
				t.Fatalf("segment %d: %d bytes, MSS %d", seg, len(th.Payload()), mss)
			}
			fin := th.Flags().Contains(header.TCPFlagFin)
			if fin && sg.busy {
				t.Fatalf("segment %d of %d carries FIN", seg, want)
			}
			got = append(got, th.Payload()...)
			seg++
		}
		if seg != want {
			t.Fatalf("%d segments, segments() said %d", seg, want)
		}
		if !bytes.Equal(got, payload) {
			t.Fatalf("the segments carry %d bytes, not the %d-byte payload in order", len(got), len(payload))
		}
	})
}

// FuzzStackIngress writes arbitrary bytes into a gateway stack through
// its tun.Device face, the whole ingress path (virtio header, inspect,
// checksums, GRO, gVisor's protocols, the handler). One stack serves every
// input, as a gateway serves every packet: nothing may panic, each packet
// is counted as taken in or as malformed (only what inspect accepts is
// taken in), the malformed count never falls, and whatever the stack sends back is a well-formed packet.
func FuzzStackIngress(f *testing.F) {
	for _, seed := range seedPackets(f) {
		f.Add(seed, false)
		f.Add(append([]byte{virtioNeedsCsum, virtioGSOTCPv4, 40, 0, 100, 0, 20, 0, 16, 0}, seed...), true)
		f.Add(append([]byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, seed...), true)
	}
	f.Add([]byte{0x45, 0, 0, 20}, false)
	f.Add(bytes.Repeat([]byte{0xff}, 60), false)

	stacks := map[bool]*Stack{}
	for _, virtio := range []bool{false, true} {
		s, err := New(Options{Handler: &refusingHandler{err: Refuse(RefuseProhibited, nil)}, QueueLen: 64, VirtioNetHdr: virtio})
		if err != nil {
			f.Fatal(err)
		}
		f.Cleanup(func() { s.Close() })
		stacks[virtio] = s
	}
	f.Fuzz(func(t *testing.T, b []byte, virtio bool) {
		s := stacks[virtio]
		malformed, in := s.malformed.Load(), s.packetsIn.Load()
		reported := s.Stats().Malformed
		if n, err := s.Write([][]byte{b}, 0); n != 1 || err != nil {
			t.Fatalf("Write = %d, %v", n, err)
		}
		dm, di := s.malformed.Load()-malformed, s.packetsIn.Load()-in
		// A packet is taken in or dropped as malformed; one taken in
		// may still turn out malformed further in (an ICMPv6 echo
		// behind extension headers, say), as in gVisor's counters.
		if dm > 1 || di > 1 || dm+di == 0 {
			t.Fatalf("one packet counted %d times malformed and %d times taken in", dm, di)
		}
		if !virtio {
			if _, ok := inspect(b); ok != (di == 1) || (!ok && dm != 1) {
				t.Fatalf("inspect says %v, yet malformed went up by %d and taken in by %d", ok, dm, di)
			}
		} else if len(b) < VirtioNetHdrLen && dm != 1 {
			t.Fatal("a packet shorter than the virtio header was not counted malformed")
		}
		if now := s.Stats().Malformed; now < reported+dm {
			t.Fatalf("malformed went from %d to %d after %d more", reported, now, dm)
		}
		for {
			select {
			case pkt := <-s.link.out:
				out := make([]byte, pkt.Size())
				copyPacket(out, pkt)
				pkt.DecRef()
				if _, ok := inspect(out); !ok {
					t.Fatalf("stack sent a malformed packet %x", out)
				}
			default:
				return
			}
		}
	})
}
