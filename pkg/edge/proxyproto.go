package edge

import (
	"encoding/binary"
	"net/netip"
)

// proxyV2Signature opens every PROXY protocol v2 header (the PROXY
// protocol specification, section 2.2).
var proxyV2Signature = [12]byte{0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A}

// PROXY v2 header fields that the edge sends.
const (
	proxyV2Proxy  = 0x21 // version 2, command PROXY
	proxyV2Local  = 0x20 // version 2, command LOCAL
	proxyV2Unspec = 0x00 // AF_UNSPEC, UNSPEC
	proxyV2TCP4   = 0x11 // AF_INET, STREAM
	proxyV2TCP6   = 0x21 // AF_INET6, STREAM
)

// appendProxyV2 appends a PROXY protocol v2 header for a TCP connection
// from src to dst (the client, and the edge address it connected to).
// When one of them is IPv6 both are sent as IPv6, IPv4 addresses mapped,
// since a header has one family.
func appendProxyV2(b []byte, src, dst netip.AddrPort) []byte {
	b = append(b, proxyV2Signature[:]...)
	b = append(b, proxyV2Proxy)
	s, d := src.Addr().Unmap(), dst.Addr().Unmap()
	if s.Is4() && d.Is4() {
		b = append(b, proxyV2TCP4)
		b = binary.BigEndian.AppendUint16(b, 4+4+2+2)
		s4, d4 := s.As4(), d.As4()
		b = append(b, s4[:]...)
		b = append(b, d4[:]...)
	} else {
		b = append(b, proxyV2TCP6)
		b = binary.BigEndian.AppendUint16(b, 16+16+2+2)
		s16, d16 := s.As16(), d.As16()
		b = append(b, s16[:]...)
		b = append(b, d16[:]...)
	}
	b = binary.BigEndian.AppendUint16(b, src.Port())
	b = binary.BigEndian.AppendUint16(b, dst.Port())
	return b
}

// appendProxyV2Local appends a PROXY protocol v2 LOCAL header, which
// carries no addresses. The edge sends it when it cannot tell who the
// client is: an origin set up for PROXY then reads the header it expects
// and uses the connection's own addresses, instead of taking the
// client's first bytes as a header (a client could forge one there).
func appendProxyV2Local(b []byte) []byte {
	b = append(b, proxyV2Signature[:]...)
	return append(b, proxyV2Local, proxyV2Unspec, 0, 0)
}

// proxyHeader is the PROXY protocol v2 header for a connection from
// client to local: a PROXY header when both addresses are known, else a
// LOCAL one.
func proxyHeader(client, local netip.AddrPort) []byte {
	b := make([]byte, 0, 52)
	if !client.IsValid() || !local.IsValid() {
		return appendProxyV2Local(b)
	}
	return appendProxyV2(b, client, local)
}
