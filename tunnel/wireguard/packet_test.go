package wireguard

import (
	"encoding/binary"
	"net/netip"
)

// Hand-built UDP packets: the device only looks at IP addresses and lengths,
// but the packets are well formed so that a failure is never the packet's.

func checksum(b []byte, sum uint32) uint16 {
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
	return ^uint16(sum)
}

func pseudoSum(src, dst netip.Addr, proto byte, length int) uint32 {
	var sum uint32
	for _, a := range [][]byte{src.AsSlice(), dst.AsSlice()} {
		for i := 0; i < len(a); i += 2 {
			sum += uint32(binary.BigEndian.Uint16(a[i:]))
		}
	}
	return sum + uint32(proto) + uint32(length)
}

// udpPacket returns an IPv4 or IPv6 UDP packet from src to dst (same family).
func udpPacket(src, dst netip.AddrPort, payload []byte) []byte {
	udpLen := 8 + len(payload)
	var ip []byte
	if src.Addr().Is4() {
		ip = make([]byte, 20, 20+udpLen)
		ip[0] = 0x45
		binary.BigEndian.PutUint16(ip[2:], uint16(20+udpLen))
		ip[8] = 64 // TTL
		ip[9] = 17 // UDP
		s, d := src.Addr().As4(), dst.Addr().As4()
		copy(ip[12:], s[:])
		copy(ip[16:], d[:])
		binary.BigEndian.PutUint16(ip[10:], checksum(ip, 0))
	} else {
		ip = make([]byte, 40, 40+udpLen)
		ip[0] = 0x60
		binary.BigEndian.PutUint16(ip[4:], uint16(udpLen))
		ip[6] = 17 // UDP
		ip[7] = 64 // hop limit
		s, d := src.Addr().As16(), dst.Addr().As16()
		copy(ip[8:], s[:])
		copy(ip[24:], d[:])
	}
	udp := make([]byte, udpLen)
	binary.BigEndian.PutUint16(udp[0:], src.Port())
	binary.BigEndian.PutUint16(udp[2:], dst.Port())
	binary.BigEndian.PutUint16(udp[4:], uint16(udpLen))
	copy(udp[8:], payload)
	sum := checksum(udp, pseudoSum(src.Addr(), dst.Addr(), 17, udpLen))
	if sum == 0 {
		sum = 0xffff
	}
	binary.BigEndian.PutUint16(udp[6:], sum)
	return append(ip, udp...)
}
