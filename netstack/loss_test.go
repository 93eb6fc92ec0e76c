package netstack

import (
	"bytes"
	"context"
	"crypto/sha256"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/sluice-vpn/sluice/netstack/netstacktest"
)

// lossyWire is a Drop function for netstacktest.JoinWith.
type lossyWire func(toClient bool, i int, pkt []byte) bool

// randomLoss drops pct % of the packets each way, at random (seeded, so
// that a failure can be replayed).
func randomLoss(pct int) lossyWire {
	r := [2]*rand.Rand{rand.New(rand.NewPCG(1, 2)), rand.New(rand.NewPCG(3, 4))}
	return func(toClient bool, _ int, _ []byte) bool {
		d := 0
		if toClient {
			d = 1
		}
		return r[d].IntN(100) < pct
	}
}

// burstLoss loses, once every every packets toward the client, up to
// burst packets in a row of one batch: a GSO send lost whole, as when a
// queue overflows or a nftables rule drops a UDP GSO datagram.
func burstLoss(every, burst int) lossyWire {
	n, left := 0, 0
	return func(toClient bool, i int, pkt []byte) bool {
		if !toClient || len(pkt) < 1000 {
			return false
		}
		if i == 0 {
			left = 0 // a burst ends with its batch
		}
		if left > 0 {
			left--
			return true
		}
		if n++; n%every == 0 {
			left = burst - 1
			return true
		}
		return false
	}
}

// finLoss loses the first n segments toward the client that carry a FIN:
// the end of a transfer and the tail loss probe that repeats it.
func finLoss(n int) lossyWire {
	return func(toClient bool, _ int, pkt []byte) bool {
		if !toClient || n == 0 || len(pkt) < 20 || pkt[0]>>4 != 4 || pkt[9] != 6 {
			return false
		}
		ihl := int(pkt[0]&0xf) * 4
		if len(pkt) < ihl+14 || pkt[ihl+13]&0x01 == 0 {
			return false
		}
		n--
		return true
	}
}

// TestTCPRecoversFromLoss moves data each way between a client and a
// server through the stack over a wire that loses packets, and checks
// that every byte arrives and that the stack recovered by retransmitting
// what was lost, not by waiting for its retransmission timer: a gVisor
// that could not tell a burst lost inside one GSO send, or took a tail
// loss probe's SACK for a spurious one, spent nearly all of a lossy
// download in 200 ms timeouts, and cubic could shrink the window to 0 and
// stall for good.
func TestTCPRecoversFromLoss(t *testing.T) {
	const size = 8 << 20
	for _, tc := range []struct {
		name        string
		wire        func() lossyWire
		cc          string
		maxTimeouts uint64
	}{
		{"bursts/bbr", func() lossyWire { return burstLoss(400, 30) }, CongestionBBR, 3},
		{"bursts/cubic", func() lossyWire { return burstLoss(400, 30) }, CongestionCubic, 3},
		{"random2%/bbr", func() lossyWire { return randomLoss(2) }, CongestionBBR, 10},
		{"random2%/cubic", func() lossyWire { return randomLoss(2) }, CongestionCubic, 10},
		{"fin/bbr", func() lossyWire { return finLoss(3) }, CongestionBBR, 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := &dialHandler{udp: map[netip.AddrPort]*net.UDPConn{}, echoFor: map[netip.Addr]bool{}}
			s, err := New(Options{Handler: h, CongestionControl: tc.cc})
			if err != nil {
				t.Fatal(err)
			}
			h.s = s
			client, err := netstacktest.NewClient([]netip.Addr{clientV4, clientV6}, 1420)
			if err != nil {
				t.Fatal(err)
			}
			wire := tc.wire()
			wait := netstacktest.JoinWith(s, client, netstacktest.JoinOptions{
				Drop: wire, // a is the stack: aToB is toward the client
			})
			t.Cleanup(func() {
				client.Close()
				s.Close()
				wait()
				h.close()
			})

			up, down := pseudoRandom(size, 1), pseudoRandom(size, 2)
			srv := serveOnce(t, func(c net.Conn) {
				got := sha256.New()
				io.Copy(got, c)
				c.Write(got.Sum(nil))
				c.Write(down)
			})
			ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
			defer cancel()
			c, err := client.DialContext(ctx, "tcp", srv.String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(90 * time.Second))
			go func() {
				c.Write(up)
				c.(interface{ CloseWrite() error }).CloseWrite()
			}()
			got, err := io.ReadAll(c)
			if err != nil {
				t.Fatalf("after %d bytes back: %v", len(got), err)
			}
			sum := sha256.Sum256(up)
			if len(got) < len(sum) || !bytes.Equal(got[:len(sum)], sum[:]) {
				t.Fatalf("the server did not get the %d bytes sent intact", size)
			}
			if !bytes.Equal(got[len(sum):], down) {
				t.Fatalf("got %d bytes from the server, want the %d it sent", len(got)-len(sum), size)
			}
			st := s.Stats()
			t.Logf("%s: %d retransmissions, %d of them on timeouts", tc.name, st.Retransmits, st.Timeouts)
			if st.Timeouts > tc.maxTimeouts {
				t.Errorf("%d retransmission timeouts toward the client, want at most %d: recovery fell back to the timer", st.Timeouts, tc.maxTimeouts)
			}
		})
	}
}

func pseudoRandom(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, seed))
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		v := r.Uint64()
		for j := range 8 {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

// serveOnce serves one connection on loopback with fn, which may take as
// long as it needs; the listener closes with the test.
func serveOnce(t *testing.T, fn func(net.Conn)) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		fn(c)
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// TestTCPManyTransfersUnderLoss runs transfers one after another, each
// ending with a FIN each way, over a wire that loses 3 % of the packets
// each way: a connection whose last segments are lost must still end. One
// transfer in a few hundred waited for good when the sender's pipe
// estimate had fallen to 0 with a FIN unacknowledged, since nothing armed
// the retransmission timer. SLUICE_LOSS_TRANSFERS sets the count (make
// soak runs 400); make test runs 30.
func TestTCPManyTransfersUnderLoss(t *testing.T) {
	n := 30
	if v := os.Getenv("SLUICE_LOSS_TRANSFERS"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil {
			t.Fatalf("SLUICE_LOSS_TRANSFERS: %v", err)
		}
	}
	h := &dialHandler{udp: map[netip.AddrPort]*net.UDPConn{}, echoFor: map[netip.Addr]bool{}}
	s, err := New(Options{Handler: h})
	if err != nil {
		t.Fatal(err)
	}
	h.s = s
	client, err := netstacktest.NewClient([]netip.Addr{clientV4, clientV6}, 1420)
	if err != nil {
		t.Fatal(err)
	}
	wait := netstacktest.JoinWith(s, client, netstacktest.JoinOptions{Drop: randomLoss(3)})
	t.Cleanup(func() {
		client.Close()
		s.Close()
		wait()
		h.close()
	})
	for i := range n {
		down := pseudoRandom(256<<10+i*37, uint64(i))
		srv := serveOnce(t, func(c net.Conn) {
			io.Copy(io.Discard, c)
			c.Write(down)
		})
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		c, err := client.DialContext(ctx, "tcp", srv.String())
		cancel()
		if err != nil {
			t.Fatalf("transfer %d: %v", i, err)
		}
		c.SetDeadline(time.Now().Add(30 * time.Second))
		c.Write([]byte("go"))
		c.(interface{ CloseWrite() error }).CloseWrite()
		got, err := io.ReadAll(c)
		c.Close()
		if err != nil {
			t.Fatalf("transfer %d: %d of %d bytes, then %v", i, len(got), len(down), err)
		}
		if !bytes.Equal(got, down) {
			t.Fatalf("transfer %d: got %d bytes, not the %d sent", i, len(got), len(down))
		}
	}
	st := s.Stats()
	t.Logf("%d transfers: %d retransmissions, %d on timeouts", n, st.Retransmits, st.Timeouts)
}
