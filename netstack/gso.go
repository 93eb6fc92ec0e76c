package netstack

import (
	"encoding/binary"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// gsoMaxSize is the largest TCP segment the stack hands the link. A link
// of our own is not held to link/channel's 32 KiB; 64 KiB less the headers
// keeps the IPv4 total length in range.
const gsoMaxSize = 1<<16 - 1 - header.IPv4MaximumHeaderSize - header.TCPHeaderMaximumSize

// GSOMaxSize implements stack.GSOEndpoint.
func (l *link) GSOMaxSize() uint32 { return gsoMaxSize }

// SupportedGSO implements stack.GSOEndpoint: TCP hands the link segments
// of up to gsoMaxSize, which the link cuts into MSS-sized packets on their
// way out (segment). One pass through gVisor's TCP and IP layers then
// carries up to 64 KiB instead of one MSS.
func (l *link) SupportedGSO() stack.SupportedGSO { return stack.HostGSOSupported }

// segmenter cuts one GSO packet into MTU-sized packets, as many at a time
// as the reader has buffers for.
type segmenter struct {
	pkt  []byte // the whole GSO packet: IP header, TCP header, payload
	gso  stack.GSO
	off  int // payload offset of the next segment
	seg  int // index of the next segment
	busy bool
}

// load takes a GSO packet; it returns false for one that does not parse
// as the TCP segment gVisor produces, which is then dropped.
func (sg *segmenter) load(pkt *stack.PacketBuffer, buf []byte) bool {
	n := 0
	for _, s := range pkt.AsSlices() {
		n += copy(buf[n:], s)
	}
	sg.pkt, sg.gso, sg.off, sg.seg = buf[:n], pkt.GSOOptions, 0, 0
	l3 := int(sg.gso.L3HdrLen)
	if n < l3+header.TCPMinimumSize || sg.gso.MSS == 0 {
		return false
	}
	if tl := int(header.TCP(sg.pkt[l3:]).DataOffset()); tl < header.TCPMinimumSize || n < l3+tl {
		return false
	}
	sg.busy = true
	return true
}

// next writes the next segment into dst and reports its size; busy turns
// false after the last one.
func (sg *segmenter) next(dst []byte) (int, bool) {
	l3 := int(sg.gso.L3HdrLen)
	tcpLen := int(header.TCP(sg.pkt[l3:]).DataOffset())
	hdrs := l3 + tcpLen
	payload := sg.pkt[hdrs:]
	chunk := min(int(sg.gso.MSS), len(payload)-sg.off)
	last := sg.off+chunk >= len(payload)
	size := hdrs + chunk
	if size > len(dst) {
		sg.busy = false
		return 0, false
	}
	copy(dst, sg.pkt[:hdrs])
	copy(dst[hdrs:], payload[sg.off:sg.off+chunk])

	tcp := header.TCP(dst[l3:size])
	tcp.SetSequenceNumber(header.TCP(sg.pkt[l3:]).SequenceNumber() + uint32(sg.off))
	flags := tcp.Flags()
	if !last {
		flags &^= header.TCPFlagFin | header.TCPFlagPsh
	}
	if sg.seg > 0 {
		flags &^= header.TCPFlagCwr
	}
	tcp.SetFlags(uint8(flags))

	var src, dstAddr tcpip.Address
	if sg.gso.Type == stack.GSOTCPv4 {
		ip := header.IPv4(dst[:size])
		ip.SetTotalLength(uint16(size))
		ip.SetID(ip.ID() + uint16(sg.seg))
		ip.SetChecksum(0)
		ip.SetChecksum(^ip.CalculateChecksum())
		src, dstAddr = ip.SourceAddress(), ip.DestinationAddress()
	} else {
		ip := header.IPv6(dst[:size])
		binary.BigEndian.PutUint16(dst[4:6], uint16(size-header.IPv6MinimumSize))
		src, dstAddr = ip.SourceAddress(), ip.DestinationAddress()
	}
	tcp.SetChecksum(0)
	xsum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, src, dstAddr, uint16(tcpLen+chunk))
	tcp.SetChecksum(^checksum.Checksum(dst[l3:size], xsum))

	sg.off += chunk
	sg.seg++
	sg.busy = !last
	return size, true
}
