package netstack

import (
	"encoding/binary"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// VirtioNetHdrLen is the length of the virtio_net_hdr (linux/virtio_net.h)
// that precedes every packet when Options.VirtioNetHdr is set: the header a
// Linux TUN device opened with IFF_VNET_HDR reads and writes.
const VirtioNetHdrLen = 10

// virtio_net_hdr flags and GSO types.
const (
	virtioNeedsCsum = 1 // the transport checksum holds only the pseudo-header sum
	virtioDataValid = 2 // the sender has checked the checksums

	virtioGSONone  = 0
	virtioGSOTCPv4 = 1
	virtioGSOTCPv6 = 4
	virtioGSOECN   = 0x80
)

// virtioHdr is a decoded virtio_net_hdr. Its fields are little-endian on
// the wire: a TUN device uses the host's order, and Linux on every
// architecture Go's TUN users care about is little-endian; TUNSETVNETLE is
// the default there.
type virtioHdr struct {
	flags      uint8
	gsoType    uint8
	hdrLen     uint16
	gsoSize    uint16
	csumStart  uint16
	csumOffset uint16
}

func (h *virtioHdr) decode(b []byte) {
	h.flags, h.gsoType = b[0], b[1]
	h.hdrLen = binary.LittleEndian.Uint16(b[2:])
	h.gsoSize = binary.LittleEndian.Uint16(b[4:])
	h.csumStart = binary.LittleEndian.Uint16(b[6:])
	h.csumOffset = binary.LittleEndian.Uint16(b[8:])
}

func (h *virtioHdr) encode(b []byte) {
	b[0], b[1] = h.flags, h.gsoType
	binary.LittleEndian.PutUint16(b[2:], h.hdrLen)
	binary.LittleEndian.PutUint16(b[4:], h.gsoSize)
	binary.LittleEndian.PutUint16(b[6:], h.csumStart)
	binary.LittleEndian.PutUint16(b[8:], h.csumOffset)
}

// virtioHdrFor describes a packet the stack sends. A GSO packet goes out
// whole, with its TCP checksum left as gVisor leaves it for host GSO (the
// pseudo-header sum) and the kernel told to finish it and to cut the
// packet into MSS-sized segments; fdbased does the same for a virtio NIC.
func virtioHdrFor(pkt *stack.PacketBuffer) virtioHdr {
	g := pkt.GSOOptions
	var h virtioHdr
	switch g.Type {
	case stack.GSOTCPv4:
		h.gsoType = virtioGSOTCPv4
	case stack.GSOTCPv6:
		h.gsoType = virtioGSOTCPv6
	default:
		return h
	}
	if g.NeedsCsum {
		h.flags = virtioNeedsCsum
		h.csumStart = g.L3HdrLen
		h.csumOffset = g.CsumOffset
	}
	// gVisor marks every segment of a GSO-capable connection as GSO. The
	// kernel does not take one that fits a single packet for GSO either,
	// yet on Linux 6.18 such packets, marked as GSO, were lost between
	// the TUN device and the next hop; say what they are.
	if pkt.Data().Size() <= int(g.MSS) {
		h.gsoType = virtioGSONone
		return h
	}
	h.hdrLen = uint16(pkt.HeaderSize())
	h.gsoSize = g.MSS
	return h
}

// checkVirtio decides whether a packet that came with header h may enter
// the stack, which then skips checksum checks (the link offloads them):
// the kernel's own packets are trusted, as a NIC trusts its driver, and
// everything else has its checksums verified here. Only the offloads the
// device was set up for (TCP segmentation) may appear.
func checkVirtio(h *virtioHdr, b []byte, pi packetInfo) bool {
	switch h.gsoType &^ virtioGSOECN {
	case virtioGSONone:
	case virtioGSOTCPv4:
		if pi.version != 4 || pi.proto != protoTCP {
			return false
		}
	case virtioGSOTCPv6:
		if pi.version != 6 || pi.proto != protoTCP {
			return false
		}
	default:
		return false
	}
	if h.flags&(virtioNeedsCsum|virtioDataValid) != 0 {
		return true
	}
	return checksumsValid(b, pi)
}

// checksumsValid verifies the IPv4 header checksum and the TCP or UDP
// checksum of an unfragmented packet; other protocols are left to gVisor,
// which checks ICMP whatever the link says.
func checksumsValid(b []byte, pi packetInfo) bool {
	var src, dst tcpip.Address
	if pi.version == 4 {
		if header.IPv4(b).CalculateChecksum() != 0xffff {
			return false
		}
		src, dst = tcpip.AddrFrom4Slice(b[12:16]), tcpip.AddrFrom4Slice(b[16:20])
	} else {
		src, dst = tcpip.AddrFrom16Slice(b[8:24]), tcpip.AddrFrom16Slice(b[24:40])
	}
	if pi.fragment {
		return true
	}
	l4 := b[pi.hdrLen:]
	var proto tcpip.TransportProtocolNumber
	switch {
	case pi.proto == protoTCP && len(l4) >= header.TCPMinimumSize:
		proto = header.TCPProtocolNumber
	case pi.proto == protoUDP && len(l4) >= header.UDPMinimumSize:
		if pi.version == 4 && binary.BigEndian.Uint16(l4[6:]) == 0 {
			return true // no checksum, which IPv4 allows
		}
		proto = header.UDPProtocolNumber
	default:
		return true
	}
	sum := header.PseudoHeaderChecksum(proto, src, dst, uint16(len(l4)))
	return checksum.Checksum(l4, sum) == 0xffff
}
