package kerneltun

import (
	"encoding/binary"
	"fmt"
	"net/netip"
)

// checksum is the Internet checksum (RFC 1071) of b, folded, not inverted,
// continuing from sum.
func checksum(b []byte, sum uint32) uint32 {
	for len(b) >= 2 {
		sum += uint32(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		sum += uint32(b[0]) << 8
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return sum
}

// udpPseudoSum is the checksum of the IPv4 pseudo-header for a UDP segment.
func udpPseudoSum(src, dst netip.Addr, udpLen int) uint32 {
	var ph [12]byte
	s, d := src.As4(), dst.As4()
	copy(ph[0:4], s[:])
	copy(ph[4:8], d[:])
	ph[9] = 17
	binary.BigEndian.PutUint16(ph[10:], uint16(udpLen))
	return checksum(ph[:], 0)
}

// udp4 builds an IPv4 UDP packet with valid IP and UDP checksums.
func udp4(src, dst netip.AddrPort, payload []byte) []byte {
	const ipLen, udpLen = 20, 8
	p := make([]byte, ipLen+udpLen+len(payload))
	ip, udp := p[:ipLen], p[ipLen:]
	ip[0] = 4<<4 | ipLen/4
	binary.BigEndian.PutUint16(ip[2:], uint16(len(p)))
	binary.BigEndian.PutUint16(ip[4:], 0x5a5a) // identification
	ip[6] = 0x40                               // don't fragment
	ip[8] = 64                                 // TTL
	ip[9] = 17
	s, d := src.Addr().As4(), dst.Addr().As4()
	copy(ip[12:16], s[:])
	copy(ip[16:20], d[:])
	binary.BigEndian.PutUint16(ip[10:], ^uint16(checksum(ip, 0)))

	binary.BigEndian.PutUint16(udp[0:], src.Port())
	binary.BigEndian.PutUint16(udp[2:], dst.Port())
	binary.BigEndian.PutUint16(udp[4:], uint16(len(udp)))
	copy(udp[udpLen:], payload)
	sum := ^uint16(checksum(udp, udpPseudoSum(src.Addr(), dst.Addr(), len(udp))))
	if sum == 0 {
		sum = 0xffff // zero means "no checksum" in UDP over IPv4
	}
	binary.BigEndian.PutUint16(udp[6:], sum)
	return p
}

// udp4Packet is a parsed IPv4 UDP packet.
type udp4Packet struct {
	src, dst netip.AddrPort
	payload  []byte
}

// parseUDP4 parses p as an IPv4 UDP packet and checks its lengths and both
// checksums.
func parseUDP4(p []byte) (udp4Packet, error) {
	var u udp4Packet
	if len(p) < 20 || p[0]>>4 != 4 {
		return u, fmt.Errorf("not IPv4: % x", p[:min(len(p), 20)])
	}
	ihl := int(p[0]&0xf) * 4
	if ihl < 20 || len(p) < ihl+8 {
		return u, fmt.Errorf("bad IPv4 header length %d in %d bytes", ihl, len(p))
	}
	if total := int(binary.BigEndian.Uint16(p[2:])); total != len(p) {
		return u, fmt.Errorf("IPv4 total length %d, packet %d bytes", total, len(p))
	}
	if p[9] != 17 {
		return u, fmt.Errorf("IP protocol %d, not UDP", p[9])
	}
	if checksum(p[:ihl], 0) != 0xffff {
		return u, fmt.Errorf("bad IPv4 header checksum %#04x", binary.BigEndian.Uint16(p[10:]))
	}
	src := netip.AddrFrom4([4]byte(p[12:16]))
	dst := netip.AddrFrom4([4]byte(p[16:20]))
	udp := p[ihl:]
	if l := int(binary.BigEndian.Uint16(udp[4:])); l != len(udp) {
		return u, fmt.Errorf("UDP length %d, segment %d bytes", l, len(udp))
	}
	if binary.BigEndian.Uint16(udp[6:]) == 0 {
		return u, fmt.Errorf("UDP checksum missing")
	}
	if checksum(udp, udpPseudoSum(src, dst, len(udp))) != 0xffff {
		return u, fmt.Errorf("bad UDP checksum %#04x", binary.BigEndian.Uint16(udp[6:]))
	}
	u.src = netip.AddrPortFrom(src, binary.BigEndian.Uint16(udp[0:]))
	u.dst = netip.AddrPortFrom(dst, binary.BigEndian.Uint16(udp[2:]))
	u.payload = udp[8:]
	return u, nil
}
