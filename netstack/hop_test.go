package netstack

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"syscall"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
)

// routerHandler is a refusingHandler that is a hop with its own
// addresses.
type routerHandler struct {
	refusingHandler
	own map[netip.Addr]bool
}

var (
	router4 = netip.MustParseAddr("100.96.0.1")
	router6 = netip.MustParseAddr("fd5c:1ce::1")
)

func (h *routerHandler) RouterAddr(src, dst netip.Addr) netip.Addr {
	if h.own[dst] {
		return netip.Addr{}
	}
	if src.Is4() {
		return router4
	}
	return router6
}

// withTTL sets a packet's TTL (hop limit), fixing the IPv4 checksum.
func withTTL(b []byte, ttl uint8) []byte {
	b = append([]byte(nil), b...)
	if b[0]>>4 == 4 {
		b[8] = ttl
		b[10], b[11] = 0, 0
		binary.BigEndian.PutUint16(b[10:12], ^checksum.Checksum(b[:20], 0))
	} else {
		b[7] = ttl
	}
	return b
}

// TestTTLExpiresAtTheGateway: a packet that arrives with TTL 1 or 0 goes
// no further, and its sender hears ICMP time exceeded from the gateway's
// address quoting it; with TTL 2, or to the gateway's own address, it is
// handled as usual.
func TestTTLExpiresAtTheGateway(t *testing.T) {
	h := &routerHandler{refusingHandler: refusingHandler{err: syscall.ECONNREFUSED}, own: map[netip.Addr]bool{}}
	s, err := New(Options{Handler: h})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, fam := range []int{4, 6} {
		syn := buildSYN(t, fam)
		hl, typ, from := 20, icmpv4TimeExceeded, router4
		if fam == 6 {
			hl, typ, from = 40, icmpv6TimeExceeded, router6
		}
		for _, ttl := range []uint8{0, 1} {
			pkt := withTTL(syn, ttl)
			before := h.calls.Load()
			s.Write([][]byte{pkt}, 0)
			got := readOne(t, s)
			if h.calls.Load() != before {
				t.Errorf("IPv%d TTL %d: the packet reached the handler", fam, ttl)
			}
			var src netip.Addr
			if fam == 4 {
				src = netip.AddrFrom4([4]byte(got[12:16]))
			} else {
				src = netip.AddrFrom16([16]byte(got[8:24]))
			}
			if int(got[hl]) != typ || got[hl+1] != 0 || src != from {
				t.Errorf("IPv%d TTL %d: got ICMP %d/%d from %s, want time exceeded from %s", fam, ttl, got[hl], got[hl+1], src, from)
			}
			if q := got[hl+8:]; len(q) < len(pkt) || !bytes.Equal(q[:len(pkt)], pkt) {
				t.Errorf("IPv%d TTL %d: the error does not quote the packet", fam, ttl)
			}
		}
	}

	// TTL 2 leaves with 1 to spare: the handler gets it (and refuses it,
	// so the client gets a RST).
	before := h.calls.Load()
	s.Write([][]byte{withTTL(buildSYN(t, 4), 2)}, 0)
	readOne(t, s)
	if h.calls.Load() != before+1 {
		t.Error("a SYN with TTL 2 did not reach the handler")
	}

	// The gateway's own address is where the packet ends: no hop.
	h.own[netip.MustParseAddr("2001:db8::1")] = true
	before = h.calls.Load()
	s.Write([][]byte{withTTL(buildSYN(t, 6), 1)}, 0)
	readOne(t, s)
	if h.calls.Load() != before+1 {
		t.Error("a SYN with TTL 1 to the gateway's own address did not reach the handler")
	}
}

// TestWriteUDPError: errors that come back after a datagram left are
// told to the client quoting a datagram its stack recognises: its
// addresses and ports.
func TestWriteUDPError(t *testing.T) {
	s, err := New(Options{Handler: &refusingHandler{}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, tc := range []struct {
		client, remote string
		hl, typ, code  int
		hop            string
	}{
		{"100.96.0.2:5000", "198.51.100.7:33434", 20, 3, 3, ""},
		{"[fd5c:1ce::2]:5000", "[2001:db8::7]:33434", 40, 1, 4, ""},
		{"100.96.0.2:5000", "198.51.100.7:33435", 20, 11, 0, "203.0.113.1"},
		{"[fd5c:1ce::2]:5000", "[2001:db8::7]:33435", 40, 3, 0, "2001:db8:1::1"},
	} {
		client, remote := netip.MustParseAddrPort(tc.client), netip.MustParseAddrPort(tc.remote)
		from := remote.Addr()
		if tc.hop != "" {
			from = netip.MustParseAddr(tc.hop)
			s.WriteTimeExceeded(from, client, remote, []byte("probe"))
		} else {
			s.WriteUDPError(client, remote, []byte("probe"), syscall.ECONNREFUSED)
		}
		got := readOne(t, s)
		hl := tc.hl
		var src, dst netip.Addr
		if hl == 20 {
			src, dst = netip.AddrFrom4([4]byte(got[12:16])), netip.AddrFrom4([4]byte(got[16:20]))
		} else {
			src, dst = netip.AddrFrom16([16]byte(got[8:24])), netip.AddrFrom16([16]byte(got[24:40]))
		}
		if src != from || dst != client.Addr() || int(got[hl]) != tc.typ || int(got[hl+1]) != tc.code {
			t.Errorf("%v->%v: ICMP %d/%d %s->%s, want %d/%d from %s", client, remote, got[hl], got[hl+1], src, dst, tc.typ, tc.code, from)
			continue
		}
		q := got[hl+8:]
		qsrc, qdst := netip.AddrFrom4([4]byte(q[12:16])), netip.AddrFrom4([4]byte(q[16:20]))
		if hl == 40 {
			qsrc, qdst = netip.AddrFrom16([16]byte(q[8:24])), netip.AddrFrom16([16]byte(q[24:40]))
		}
		udp := q[hl:]
		if qsrc != client.Addr() || qdst != remote.Addr() || binary.BigEndian.Uint16(udp[0:2]) != client.Port() ||
			binary.BigEndian.Uint16(udp[2:4]) != remote.Port() || string(udp[8:]) != "probe" {
			t.Errorf("%v->%v: quoted %x", client, remote, q)
		}
	}
}

// TestWriteEchoErrors: errors for a client's ping quote an echo request
// with its identifier and sequence, so that ping and traceroute match them.
func TestWriteEchoErrors(t *testing.T) {
	s, err := New(Options{Handler: &refusingHandler{}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, tc := range []struct {
		client, dst, hop string
		hl, typ, code    int
		echo             byte
	}{
		{"100.96.0.2", "198.51.100.7", "203.0.113.1", 20, 11, 0, icmpv4Echo},
		{"fd5c:1ce::2", "2001:db8::7", "2001:db8:1::1", 40, 3, 0, icmpv6Echo},
		{"100.96.0.2", "198.51.100.7", "", 20, 3, 1, icmpv4Echo},
		{"fd5c:1ce::2", "2001:db8::7", "", 40, 1, 3, icmpv6Echo},
	} {
		client, dst := netip.MustParseAddr(tc.client), netip.MustParseAddr(tc.dst)
		from := dst
		if tc.hop != "" {
			from = netip.MustParseAddr(tc.hop)
			s.WriteEchoTimeExceeded(from, client, dst, 0x1234, 9, []byte("probe"))
		} else {
			s.WriteEchoUnreachable(client, dst, 0x1234, 9, []byte("probe"), syscall.EHOSTUNREACH)
		}
		got := readOne(t, s)
		hl := tc.hl
		src := netip.AddrFrom4([4]byte(got[12:16]))
		if hl == 40 {
			src = netip.AddrFrom16([16]byte(got[8:24]))
		}
		if src != from || int(got[hl]) != tc.typ || int(got[hl+1]) != tc.code {
			t.Errorf("%v->%v: ICMP %d/%d from %s, want %d/%d from %s", client, dst, got[hl], got[hl+1], src, tc.typ, tc.code, from)
			continue
		}
		echo := got[hl+8+hl:]
		if echo[0] != tc.echo || binary.BigEndian.Uint16(echo[4:6]) != 0x1234 || binary.BigEndian.Uint16(echo[6:8]) != 9 || string(echo[8:]) != "probe" {
			t.Errorf("%v->%v: quoted echo %x", client, dst, echo)
		}
	}
}
