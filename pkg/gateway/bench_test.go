package gateway

import (
	"context"
	"io"
	"net"
	"testing"
	"time"
)

// sink accepts connections and discards what they send, or sends n bytes
// to each when n > 0.
func sink(b testing.TB, n int64) net.Listener {
	ln := listenOutsideSlice(b)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				if n > 0 {
					io.CopyN(c, zeros{}, n)
					return
				}
				io.Copy(io.Discard, c)
			}()
		}
	}()
	return ln
}

// listenOutsideSlice listens on a loopback port outside the egress slice:
// a sink that the kernel happened to put on a port of the slice collided
// with the gateway's own egress binds ("address already in use").
func listenOutsideSlice(b testing.TB) net.Listener {
	b.Helper()
	for range 100 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		if !slice.Contains(uint16(ln.Addr().(*net.TCPAddr).Port)) {
			return ln
		}
		defer ln.Close() // held until a port outside is found
	}
	b.Fatal("no loopback port outside the egress slice")
	return nil
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) { clear(p); return len(p), nil }

// transfer moves size bytes over one connection made by dial, up or down,
// and returns how long it took.
func transfer(b testing.TB, dial func(ctx context.Context, network, addr string) (net.Conn, error), up bool, size int64) time.Duration {
	n := int64(0)
	if !up {
		n = size
	}
	ln := sink(b, n)
	defer ln.Close()
	start := time.Now()
	c, err := dial(context.Background(), "tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	if up {
		if _, err := io.CopyN(c, zeros{}, size); err != nil {
			b.Fatal(err)
		}
		c.(interface{ CloseWrite() error }).CloseWrite()
		io.Copy(io.Discard, c) // until the server's FIN: everything arrived
	} else if got, err := io.Copy(io.Discard, c); err != nil || got != size {
		b.Fatalf("received %d of %d bytes: %v", got, size, err)
	}
	return time.Since(start)
}

// benchmarkTCP measures one TCP stream through the in-process gateway
// (client stack, memtun, gateway, loopback server) and, in the same run,
// the same transfer over plain loopback; it reports both and their ratio.
func benchmarkTCP(b *testing.B, up bool) {
	const size = 64 << 20
	var d net.Dialer
	base := transfer(b, d.DialContext, up, size)

	h := start(b, nil)
	b.SetBytes(size)
	b.ResetTimer()
	var total time.Duration
	for range b.N {
		total += transfer(b, h.client.DialContext, up, size)
	}
	b.StopTimer()
	gw := float64(size) * float64(b.N) / total.Seconds() / 1e6
	lo := float64(size) / base.Seconds() / 1e6
	b.ReportMetric(gw, "gateway-MB/s")
	b.ReportMetric(lo, "loopback-MB/s")
	b.ReportMetric(gw/lo, "ratio")
}

func BenchmarkTCPUpload(b *testing.B)   { benchmarkTCP(b, true) }
func BenchmarkTCPDownload(b *testing.B) { benchmarkTCP(b, false) }

// benchmarkWireGuardTCP is benchmarkTCP with WireGuard in the path: the
// client stack sits behind a real wireguard-go device that talks to the
// gateway over UDP on loopback.
func benchmarkWireGuardTCP(b *testing.B, up bool) {
	const size = 64 << 20
	var d net.Dialer
	base := transfer(b, d.DialContext, up, size)

	srv := startWireGuardB(b)
	c := newWGClientB(b, srv, 2)
	if err := srv.AddPeer(Peer{Name: "bench", PublicKey: c.key.PublicKey(), Addrs: peerAddrs(2)}); err != nil {
		b.Fatal(err)
	}
	b.SetBytes(size)
	b.ResetTimer()
	var total time.Duration
	for range b.N {
		total += transfer(b, c.DialContext, up, size)
	}
	b.StopTimer()
	gw := float64(size) * float64(b.N) / total.Seconds() / 1e6
	lo := float64(size) / base.Seconds() / 1e6
	b.ReportMetric(gw, "gateway-MB/s")
	b.ReportMetric(lo, "loopback-MB/s")
	b.ReportMetric(gw/lo, "ratio")
}

func BenchmarkWireGuardTCPUpload(b *testing.B)   { benchmarkWireGuardTCP(b, true) }
func BenchmarkWireGuardTCPDownload(b *testing.B) { benchmarkWireGuardTCP(b, false) }
