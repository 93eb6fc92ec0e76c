package nat

import (
	"bytes"
	"net"
	"net/netip"
	"testing"
	"time"
)

// rawSink is a loopback UDP socket that records the datagrams it gets.
type rawSink struct {
	conn *net.UDPConn
	addr netip.AddrPort
}

func newRawSink(t *testing.T, network, addr string) *rawSink {
	t.Helper()
	c, err := net.ListenUDP(network, net.UDPAddrFromAddrPort(netip.MustParseAddrPort(addr)))
	if err != nil {
		t.Skipf("%s: %v", network, err)
	}
	c.SetReadBuffer(4 << 20)
	t.Cleanup(func() { c.Close() })
	return &rawSink{conn: c, addr: c.LocalAddr().(*net.UDPAddr).AddrPort()}
}

// read returns the next datagram, or nil after wait.
func (s *rawSink) read(wait time.Duration) []byte {
	s.conn.SetReadDeadline(time.Now().Add(wait))
	b := make([]byte, 65535)
	n, err := s.conn.Read(b)
	if err != nil {
		return nil
	}
	return b[:n]
}

// TestSendLaterCoalesces holds datagrams until Flush, then sends runs of
// equal-sized datagrams to one destination in UDP GSO sends: each arrives
// as the datagram it was, in order, per destination.
func TestSendLaterCoalesces(t *testing.T) {
	for _, tc := range []struct{ network, addr string }{{"udp4", "127.0.0.1:0"}, {"udp6", "[::1]:0"}} {
		t.Run(tc.network, func(t *testing.T) {
			f := newUDPFixture(t, FilterAddressPortDependent, TableOptions{})
			a, b := newRawSink(t, tc.network, tc.addr), newRawSink(t, tc.network, tc.addr)
			src := client1
			if tc.network == "udp6" {
				src = client6
			}
			dgram := func(dst byte, i, size int) []byte {
				p := bytes.Repeat([]byte{dst}, size)
				p[0] = byte(i)
				return p
			}
			// To a: 20 of 1000 bytes and a short one; to b, in between: 3.
			var wantA, wantB [][]byte
			for i := range 20 {
				wantA = append(wantA, dgram('a', i, 1000))
				if i%7 == 3 {
					wantB = append(wantB, dgram('b', i, 700))
				}
			}
			wantA = append(wantA, dgram('a', 20, 10))
			ib := 0
			for i, p := range wantA {
				if err := f.udp.SendLater("peer", src, a.addr, p); err != nil {
					t.Fatal(err)
				}
				if i%7 == 3 {
					if err := f.udp.SendLater("peer", src, b.addr, wantB[ib]); err != nil {
						t.Fatal(err)
					}
					ib++
				}
			}
			// Held until Flush: a's last run (14..20) has not left yet.
			got := 0
			for a.read(100*time.Millisecond) != nil {
				got++
			}
			if got >= len(wantA) {
				t.Fatalf("all %d datagrams left before Flush", got)
			}
			f.udp.Flush()
			// Runs broken by b's datagrams left earlier; read what is left.
			rest := [][]byte{}
			for p := a.read(time.Second); p != nil; p = a.read(100 * time.Millisecond) {
				rest = append(rest, p)
			}
			if len(rest) != len(wantA)-got {
				t.Fatalf("after Flush, %d more datagrams to a; want %d (had %d before)", len(rest), len(wantA)-got, got)
			}
			for i, p := range rest {
				if !bytes.Equal(p, wantA[got+i]) {
					t.Fatalf("datagram %d to a: %d bytes starting %d; want %d bytes starting %d",
						got+i, len(p), p[0], len(wantA[got+i]), wantA[got+i][0])
				}
			}
			for i, want := range wantB {
				if p := b.read(time.Second); !bytes.Equal(p, want) {
					t.Fatalf("datagram %d to b: got %d bytes, want %d", i, len(p), len(want))
				}
			}
			st := f.udp.Stats()
			if st.Coalesced == 0 || st.SendErrors != 0 {
				t.Fatalf("stats %+v: want coalesced sends and no errors", st)
			}
			// The flows counted every datagram.
			var n uint64
			for _, e := range f.table.Snapshot() {
				n += e.OrigPackets
			}
			if want := uint64(len(wantA) + len(wantB)); n != want {
				t.Fatalf("flows counted %d datagrams, want %d", n, want)
			}
		})
	}
}

// TestSendLaterKeepsOrder: a datagram too large to join a batch leaves
// after the datagrams held before it, not ahead of them.
func TestSendLaterKeepsOrder(t *testing.T) {
	f := newUDPFixture(t, FilterAddressPortDependent, TableOptions{})
	a := newRawSink(t, "udp4", "127.0.0.1:0")
	small := bytes.Repeat([]byte{1}, 100)
	big := bytes.Repeat([]byte{2}, 3000) // above gsoMaxSegment: sent at once
	for _, p := range [][]byte{small, small, big} {
		if err := f.udp.SendLater("peer", client1, a.addr, p); err != nil {
			t.Fatal(err)
		}
	}
	f.udp.Flush()
	for i, want := range [][]byte{small, small, big} {
		if got := a.read(time.Second); !bytes.Equal(got, want) {
			t.Fatalf("datagram %d: %d bytes, want %d", i, len(got), len(want))
		}
	}
}

// TestSendLaterReportsSocketErrors: the first datagram of a batch leaves
// at once, so a socket error comes back to the caller, which answers the
// client with ICMP, as Send's do.
func TestSendLaterReportsSocketErrors(t *testing.T) {
	f := newUDPFixture(t, FilterAddressPortDependent, TableOptions{})
	bad := netip.MustParseAddrPort("127.0.0.1:0") // the kernel refuses port 0
	if err := f.udp.Send("peer", client1, bad, []byte("x")); err == nil {
		t.Skip("this kernel sends to port 0")
	}
	f.udp.Flush()
	if err := f.udp.SendLater("peer", client2, bad, []byte("x")); err == nil {
		t.Fatal("SendLater returned no error for a datagram the socket refused")
	}
}
