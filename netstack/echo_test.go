package netstack

import (
	"bytes"
	"context"
	"encoding/binary"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
)

// buildEcho builds an echo request from src to dst.
func buildEcho(t *testing.T, src, dst netip.Addr, payload []byte) []byte {
	t.Helper()
	m := icmp.Message{Type: ipv4.ICMPTypeEcho, Body: &icmp.Echo{ID: 7, Seq: 1, Data: payload}}
	var psh []byte
	if src.Is6() {
		m.Type = ipv6.ICMPTypeEchoRequest
		psh = icmp.IPv6PseudoHeader(src.AsSlice(), dst.AsSlice())
	}
	msg, err := m.Marshal(psh)
	if err != nil {
		t.Fatal(err)
	}
	if src.Is4() {
		b := make([]byte, 20, 20+len(msg))
		b[0], b[8], b[9] = 0x45, 64, protoICMPv4
		binary.BigEndian.PutUint16(b[2:4], uint16(20+len(msg)))
		copy(b[12:16], src.AsSlice())
		copy(b[16:20], dst.AsSlice())
		binary.BigEndian.PutUint16(b[10:12], ^checksum.Checksum(b, 0))
		return append(b, msg...)
	}
	b := make([]byte, 40, 40+len(msg))
	b[0], b[6], b[7] = 0x60, protoICMPv6, 64
	binary.BigEndian.PutUint16(b[4:6], uint16(len(msg)))
	copy(b[8:24], src.AsSlice())
	copy(b[24:40], dst.AsSlice())
	return append(b, msg...)
}

// readNone checks that the stack sends nothing for a while.
func readNone(t *testing.T, s *Stack, wait time.Duration) {
	t.Helper()
	got := make(chan []byte, 1)
	go func() {
		bufs, sizes := [][]byte{make([]byte, 65535)}, []int{0}
		if n, err := s.Read(bufs, sizes, 0); err == nil && n == 1 {
			got <- bufs[0][:sizes[0]]
		}
	}()
	select {
	case b := <-got:
		t.Errorf("the stack sent %x", b[:min(len(b), 48)])
	case <-time.After(wait):
	}
}

// TestBroadcastAndMulticastEchoDropped: pings to a broadcast or multicast
// address are neither passed on nor answered, only counted: there is no
// one destination whose answer the gateway could hand back.
func TestBroadcastAndMulticastEchoDropped(t *testing.T) {
	h := &refusingHandler{}
	s, err := New(Options{Handler: h})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	c4, c6 := netip.MustParseAddr("100.96.0.2"), netip.MustParseAddr("fd5c:1ce::2")
	dsts := []netip.Addr{
		netip.MustParseAddr("255.255.255.255"), netip.MustParseAddr("224.0.0.1"),
		netip.MustParseAddr("239.1.2.3"), netip.MustParseAddr("ff02::1"), netip.MustParseAddr("ff0e::1"),
	}
	for _, dst := range dsts {
		src := c4
		if dst.Is6() {
			src = c6
		}
		s.Write([][]byte{buildEcho(t, src, dst, []byte("all of you"))}, 0)
	}
	readNone(t, s, 200*time.Millisecond)
	if n := h.calls.Load(); n != 0 {
		t.Errorf("the handler saw %d of the pings", n)
	}
	if got := s.Stats().Unsupported; got != uint64(len(dsts)) {
		t.Errorf("Unsupported = %d, want %d", got, len(dsts))
	}
}

// TestEchoNeedingFragments: pings larger than the tunnel's MTU cross it
// in fragments both ways, over IPv4 and IPv6: the client fragments the
// request, the stack reassembles it, and fragments the reply.
func TestEchoNeedingFragments(t *testing.T) {
	dsts := []netip.Addr{netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8::1")}
	f := newFixture(t, func(o *Options, h *dialHandler) {
		for _, a := range dsts {
			h.echoFor[a] = true
		}
	})
	for _, dst := range dsts {
		for _, size := range []int{1400, 3000, 9000} {
			payload := make([]byte, size)
			for i := range payload {
				payload[i] = byte(i * 7)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			reply, err := f.client.Ping(ctx, dst, uint16(size), payload)
			cancel()
			if err != nil {
				t.Errorf("ping %s with %d bytes: %v", dst, size, err)
				continue
			}
			if !bytes.Equal(reply, payload) {
				t.Errorf("ping %s with %d bytes: reply of %d bytes does not match", dst, size, len(reply))
			}
		}
	}
}
