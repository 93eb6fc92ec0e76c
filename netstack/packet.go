package netstack

import (
	"encoding/binary"
	"net/netip"
)

// IP protocol numbers the stack looks at before gVisor does.
const (
	protoICMPv4 = 1
	protoTCP    = 6
	protoUDP    = 17
	protoICMPv6 = 58
)

// ICMP types.
const (
	icmpv4EchoReply    = 0
	icmpv4Unreachable  = 3
	icmpv4Echo         = 8
	icmpv4TimeExceeded = 11
	icmpv6Unreachable  = 1
	icmpv6TooBig       = 2
	icmpv6TimeExceeded = 3
	icmpv6Echo         = 128
	icmpv6EchoReply    = 129
)

// packetInfo is what inspect learns from a packet's fixed IP header.
type packetInfo struct {
	version  int
	proto    uint8 // upper-layer protocol; for IPv6 the fixed header's next header
	src, dst netip.Addr
	hdrLen   int  // length of the fixed IP header (with v4 options)
	fragment bool // a fragment, or (v6) an extension header chain we do not follow
}

// inspect validates the IP header of a packet coming from the tunnel. It
// accepts only what gVisor can parse without surprises: a known version, a
// header that fits, a length field that matches what was received (longer
// buffers are fine: link layers may pad). It never panics on any input.
func inspect(b []byte) (packetInfo, bool) {
	var pi packetInfo
	if len(b) == 0 {
		return pi, false
	}
	switch b[0] >> 4 {
	case 4:
		if len(b) < 20 {
			return pi, false
		}
		ihl := int(b[0]&0x0f) * 4
		total := int(binary.BigEndian.Uint16(b[2:4]))
		if ihl < 20 || total < ihl || total > len(b) {
			return pi, false
		}
		pi.version = 4
		pi.hdrLen = ihl
		pi.proto = b[9]
		pi.src = netip.AddrFrom4([4]byte(b[12:16]))
		pi.dst = netip.AddrFrom4([4]byte(b[16:20]))
		flagsFrag := binary.BigEndian.Uint16(b[6:8])
		pi.fragment = flagsFrag&0x3fff != 0 // MF set or a non-zero offset
		return pi, true
	case 6:
		if len(b) < 40 {
			return pi, false
		}
		payload := int(binary.BigEndian.Uint16(b[4:6]))
		if 40+payload > len(b) {
			return pi, false
		}
		pi.version = 6
		pi.hdrLen = 40
		pi.proto = b[6]
		pi.src = netip.AddrFrom16([16]byte(b[8:24]))
		pi.dst = netip.AddrFrom16([16]byte(b[24:40]))
		pi.fragment = pi.proto == 44
		return pi, true
	}
	return pi, false
}

// ipLen is the length the IP header claims for the whole packet.
func ipLen(b []byte, pi packetInfo) int {
	if pi.version == 4 {
		return int(binary.BigEndian.Uint16(b[2:4]))
	}
	return 40 + int(binary.BigEndian.Uint16(b[4:6]))
}
