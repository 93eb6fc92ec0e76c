package nat

import (
	"context"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"
)

// BenchmarkEgressDialTCP measures Egress.DialTCP plus Close to a loopback
// listener, with the kernel picking the port inside the slice
// (IP_LOCAL_PORT_RANGE) and with the pool's own allocator (ExplicitBind).
// Each run also times the same number of plain net.Dialer dials to the same
// listener and reports them as plain-ns/op, and the pool's cost as a
// multiple of it as ratio (1.0: the pool adds nothing).
//
// Connections are closed with a RST, as the gateway does on abort, so that
// no TIME_WAIT state builds up on the slice's ports and every iteration
// finds the same free slice.
func BenchmarkEgressDialTCP(b *testing.B) {
	for _, m := range []struct {
		name     string
		explicit bool
		ports    PortRange
	}{
		// Inside Linux's default ephemeral range, where the kernel honours
		// IP_LOCAL_PORT_RANGE; away from the test's windows.
		{"kernel", false, PortRange{Lo: 45000, Hi: 45999}},
		{"explicit", true, PortRange{Lo: 46000, Hi: 46999}},
	} {
		b.Run(m.name, func(b *testing.B) {
			e, err := NewEgress(EgressOptions{Ports: m.ports, ExplicitBind: m.explicit})
			if err != nil {
				b.Fatal(err)
			}
			if !m.explicit && !e.Stats().KernelPorts {
				b.Skip("the kernel cannot pick ports inside the slice here (no IP_LOCAL_PORT_RANGE, or the slice is outside the ephemeral range)")
			}
			dst := benchAcceptor(b)
			ctx := context.Background()

			pool := func() {
				c, err := e.DialTCP(ctx, dst)
				if err != nil {
					b.Fatal(err)
				}
				if p := c.LocalAddr().(*net.TCPAddr).Port; !m.ports.Contains(uint16(p)) {
					b.Fatalf("pool dialled from port %d, outside its slice %s", p, m.ports)
				}
				c.SetLinger(0)
				c.Close()
			}
			var d net.Dialer
			plain := func() {
				c, err := d.DialContext(ctx, "tcp4", dst.String())
				if err != nil {
					b.Fatal(err)
				}
				c.(*net.TCPConn).SetLinger(0)
				c.Close()
			}

			pool() // warm up: the listener's accept loop, the pool's maps
			plain()
			b.ReportAllocs()
			b.ResetTimer()
			plainTime := interleaved(b, pool, plain)
			b.StopTimer()

			if st := e.Stats(); st.DialErrors != 0 || st.Exhausted != 0 {
				b.Fatalf("pool counted %d dial errors and %d exhausted slices", st.DialErrors, st.Exhausted)
			}
			b.ReportMetric(float64(plainTime.Nanoseconds())/float64(b.N), "plain-ns/op")
			b.ReportMetric(float64(b.Elapsed())/float64(plainTime), "ratio")
		})
	}
}

// interleaved runs op b.N times under the benchmark's timer and base b.N
// times with the timer stopped, in alternating chunks so that both see the
// same machine (frequency, other load, cache state), and returns the time
// base took.
func interleaved(b *testing.B, op, base func()) time.Duration {
	const chunk = 64
	var baseTime time.Duration
	for done := 0; done < b.N; {
		n := min(chunk, b.N-done)
		for range n {
			op()
		}
		b.StopTimer()
		start := time.Now()
		for range n {
			base()
		}
		baseTime += time.Since(start)
		b.StartTimer()
		done += n
	}
	return baseTime
}

// benchAcceptor listens on 127.0.0.1 below the ephemeral range, so that it
// cannot take a port of a slice under test, and closes whatever it
// accepts.
func benchAcceptor(b *testing.B) netip.AddrPort {
	b.Helper()
	var ln *net.TCPListener
	for port := 29000; ln == nil; port++ {
		var err error
		ln, err = net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port})
		if err != nil && port == 29999 {
			b.Fatalf("no free port for a listener in 29000-29999: %v", err)
		}
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	})
	b.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	return ln.Addr().(*net.TCPAddr).AddrPort()
}
