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
// as the reader has buffers for. It copies the payload once, from the
// packet's own buffers into each segment, and holds a reference to the
// packet until the last segment is out.
type segmenter struct {
	pkt     *stack.PacketBuffer
	hdr     []byte   // IP and TCP headers, a copy in hdrBuf
	payload [][]byte // the payload not yet sent, as views of pkt
	size    int      // payload bytes in all
	gso     stack.GSO
	off     int // payload offset of the next segment
	seg     int // index of the next segment
	busy    bool

	hdrBuf [header.IPv4MaximumHeaderSize + header.TCPHeaderMaximumSize]byte
}

// load takes a GSO packet, with a reference of its own; it returns false
// for one that does not parse as the TCP segment gVisor produces, which
// is then dropped.
func (sg *segmenter) load(pkt *stack.PacketBuffer) bool {
	sg.release()
	sg.gso, sg.off, sg.seg = pkt.GSOOptions, 0, 0
	l3 := int(sg.gso.L3HdrLen)
	slices := pkt.AsSlices()
	// The headers may span slices; copy them out.
	n := 0
	for _, sl := range slices {
		n += copy(sg.hdrBuf[n:min(len(sg.hdrBuf), l3+header.TCPHeaderMaximumSize)], sl)
	}
	if n < l3+header.TCPMinimumSize || sg.gso.MSS == 0 {
		return false
	}
	tl := int(header.TCP(sg.hdrBuf[l3:n]).DataOffset())
	if tl < header.TCPMinimumSize || n < l3+tl {
		return false
	}
	sg.hdr = sg.hdrBuf[:l3+tl]
	skip := len(sg.hdr)
	sg.payload, sg.size = sg.payload[:0], 0
	for _, sl := range slices {
		if skip >= len(sl) {
			skip -= len(sl)
			continue
		}
		sl = sl[skip:]
		skip = 0
		sg.payload = append(sg.payload, sl)
		sg.size += len(sl)
	}
	pkt.IncRef()
	sg.pkt = pkt
	sg.busy = true
	return true
}

// release lets go of the packet in hand.
func (sg *segmenter) release() {
	if sg.pkt != nil {
		sg.pkt.DecRef()
		sg.pkt = nil
	}
	clear(sg.payload)
	sg.busy = false
}

// segments is how many packets the loaded GSO packet becomes.
func (sg *segmenter) segments() int {
	return max(1, (sg.size+int(sg.gso.MSS)-1)/int(sg.gso.MSS))
}

// next writes the next segment into dst and reports its size; busy turns
// false after the last one.
func (sg *segmenter) next(dst []byte) (int, bool) {
	l3 := int(sg.gso.L3HdrLen)
	hdrs := len(sg.hdr)
	tcpLen := hdrs - l3
	chunk := min(int(sg.gso.MSS), sg.size-sg.off)
	last := sg.off+chunk >= sg.size
	size := hdrs + chunk
	if size > len(dst) {
		sg.release()
		return 0, false
	}
	copy(dst, sg.hdr)
	for n := hdrs; n < size; {
		c := copy(dst[n:size], sg.payload[0])
		n += c
		if sg.payload[0] = sg.payload[0][c:]; len(sg.payload[0]) == 0 {
			sg.payload = sg.payload[1:]
		}
	}

	tcp := header.TCP(dst[l3:size])
	tcp.SetSequenceNumber(header.TCP(sg.hdr[l3:]).SequenceNumber() + uint32(sg.off))
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
	if last {
		sg.release()
	}
	return size, true
}
