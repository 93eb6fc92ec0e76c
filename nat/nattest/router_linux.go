// Package nattest holds what the tests of several packages need of the
// network around a gateway's egress: hosts and routers played on
// loopback.
package nattest

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

// SendTimeExceeded plays a router at from (unbound if from is the zero
// Addr): it sends to, an IPv4 address of this host, the ICMP time
// exceeded that quotes quote, an IPv4 packet as the router saw it (its
// TTL spent, as a router's quote has it). It needs a raw socket: root.
func SendTimeExceeded(t testing.TB, from, to netip.Addr, quote []byte) {
	t.Helper()
	msg := append([]byte{11, 0, 0, 0, 0, 0, 0, 0}, quote...)
	binary.BigEndian.PutUint16(msg[2:4], checksum(msg))
	rs, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMP)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(rs)
	if from.IsValid() {
		if err := unix.Bind(rs, &unix.SockaddrInet4{Addr: from.As4()}); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Sendto(rs, msg, 0, &unix.SockaddrInet4{Addr: to.As4()}); err != nil {
		t.Fatal(err)
	}
}

// checksum is the Internet checksum (RFC 1071) of b.
func checksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}
