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

// gsoPacket builds what gVisor's TCP hands a GSO link: one IP packet with
// a large payload and a partial (pseudo-header) TCP checksum.
func gsoPacket(t *testing.T, v6 bool, payload []byte, flags header.TCPFlags) *stack.PacketBuffer {
	t.Helper()
	var l3 int
	var src, dst tcpip.Address
	if v6 {
		l3 = header.IPv6MinimumSize
		src = tcpip.AddrFrom16(netip.MustParseAddr("2001:db8::1").As16())
		dst = tcpip.AddrFrom16(netip.MustParseAddr("fd5c:1ce::2").As16())
	} else {
		l3 = header.IPv4MinimumSize
		src, dst = tcpip.AddrFrom4([4]byte{192, 0, 2, 1}), tcpip.AddrFrom4([4]byte{100, 96, 0, 2})
	}
	b := make([]byte, l3+header.TCPMinimumSize+len(payload))
	if v6 {
		header.IPv6(b).Encode(&header.IPv6Fields{PayloadLength: uint16(len(b) - l3), TransportProtocol: 6, HopLimit: 64, SrcAddr: src, DstAddr: dst})
	} else {
		ip := header.IPv4(b)
		ip.Encode(&header.IPv4Fields{TotalLength: uint16(len(b)), ID: 1000, TTL: 64, Protocol: 6, SrcAddr: src, DstAddr: dst})
		ip.SetChecksum(^ip.CalculateChecksum())
	}
	tcp := header.TCP(b[l3:])
	tcp.Encode(&header.TCPFields{SrcPort: 443, DstPort: 40000, SeqNum: 0xfffff000, AckNum: 7, DataOffset: 20, Flags: flags, WindowSize: 1000})
	copy(b[l3+20:], payload)
	tcp.SetChecksum(header.PseudoHeaderChecksum(6, src, dst, uint16(len(b)-l3)))
	// In odd pieces, as a packet's buffer may be: the headers and the
	// payload span chunks.
	var buf buffer.Buffer
	for off, i := 0, 0; off < len(b); i++ {
		n := min([]int{7, 50, 777}[min(i, 2)], len(b)-off)
		buf.Append(buffer.NewViewWithData(b[off : off+n]))
		off += n
	}
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buf})
	pkt.GSOOptions = stack.GSO{Type: stack.GSOTCPv4, NeedsCsum: true, CsumOffset: 16, MSS: 1000, L3HdrLen: uint16(l3)}
	if v6 {
		pkt.GSOOptions.Type = stack.GSOTCPv6
	}
	return pkt
}

func TestSegmenter(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		payload := make([]byte, 3500)
		for i := range payload {
			payload[i] = byte(i)
		}
		pkt := gsoPacket(t, v6, payload, header.TCPFlagAck|header.TCPFlagPsh|header.TCPFlagFin)
		var sg segmenter
		if !sg.load(pkt) {
			t.Fatal("load refused a well-formed GSO packet")
		}
		pkt.DecRef()
		var got []byte
		for i := 0; sg.busy; i++ {
			dst := make([]byte, 1500)
			n, ok := sg.next(dst)
			if !ok {
				t.Fatal("next failed")
			}
			p := dst[:n]
			l3 := header.IPv4MinimumSize
			var src, dstA tcpip.Address
			if v6 {
				l3 = header.IPv6MinimumSize
				ip := header.IPv6(p)
				if int(ip.PayloadLength()) != n-l3 {
					t.Fatalf("segment %d: payload length %d, packet %d", i, ip.PayloadLength(), n)
				}
				src, dstA = ip.SourceAddress(), ip.DestinationAddress()
			} else {
				ip := header.IPv4(p)
				if !ip.IsChecksumValid() || int(ip.TotalLength()) != n || ip.ID() != uint16(1000+i) {
					t.Fatalf("segment %d: bad IPv4 header %x", i, p[:20])
				}
				src, dstA = ip.SourceAddress(), ip.DestinationAddress()
			}
			tcp := header.TCP(p[l3:])
			if checksum.Checksum(p[l3:], header.PseudoHeaderChecksum(6, src, dstA, uint16(n-l3))) != 0xffff {
				t.Fatalf("segment %d: bad TCP checksum", i)
			}
			if tcp.SequenceNumber() != 0xfffff000+uint32(i*1000) {
				t.Fatalf("segment %d: seq %#x", i, tcp.SequenceNumber())
			}
			last := !sg.busy
			if fin := tcp.Flags().Contains(header.TCPFlagFin); fin != last {
				t.Fatalf("segment %d: FIN %v, last %v", i, fin, last)
			}
			if want := min(1000, 3500-i*1000); len(tcp.Payload()) != want {
				t.Fatalf("segment %d: %d bytes of payload, want %d", i, len(tcp.Payload()), want)
			}
			got = append(got, tcp.Payload()...)
		}
		if !bytes.Equal(got, payload) {
			t.Fatal("the segments do not carry the payload in order")
		}
	}
}

// TestSegmenterPureACK: a GSO packet without payload (an ACK) still goes
// out once, with its checksum completed.
func TestSegmenterPureACK(t *testing.T) {
	pkt := gsoPacket(t, false, nil, header.TCPFlagAck)
	defer pkt.DecRef()
	var sg segmenter
	if !sg.load(pkt) {
		t.Fatal("load refused an ACK")
	}
	dst := make([]byte, 1500)
	n, ok := sg.next(dst)
	if !ok || n != 40 || sg.busy {
		t.Fatalf("ACK: %d bytes, ok %v, busy %v", n, ok, sg.busy)
	}
	ip := header.IPv4(dst[:n])
	if checksum.Checksum(dst[20:n], header.PseudoHeaderChecksum(6, ip.SourceAddress(), ip.DestinationAddress(), 20)) != 0xffff {
		t.Fatal("ACK checksum not completed")
	}
}
