package wireguard

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
)

// bindPair is a sending and a receiving bind on loopback with a reader
// that counts what arrives.
type bindPair struct {
	send     conn.Bind
	ep       conn.Endpoint
	received atomic.Int64 // datagrams
	last     atomic.Int64 // unix nanoseconds of the last arrival
}

func newBindPair(b *testing.B, mk func() conn.Bind) *bindPair {
	p := &bindPair{send: mk()}
	openBind(b, p.send)
	recv := mk()
	fns, port := openBind(b, recv)
	ep, err := p.send.ParseEndpoint(netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port).String())
	if err != nil {
		b.Fatal(err)
	}
	p.ep = ep
	var wg sync.WaitGroup
	for _, fn := range fns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			bufs := make([][]byte, recv.BatchSize())
			for i := range bufs {
				bufs[i] = make([]byte, device.MaxMessageSize)
			}
			sizes := make([]int, len(bufs))
			eps := make([]conn.Endpoint, len(bufs))
			for {
				n, err := fn(bufs, sizes, eps)
				if err != nil {
					return
				}
				p.received.Add(int64(n))
				p.last.Store(time.Now().UnixNano())
			}
		}()
	}
	b.Cleanup(func() { recv.Close(); wg.Wait() })
	return p
}

// run sends batches of batch and returns how long the receiver took to get
// what arrived and how many did: the wait for stragglers is not counted.
func (p *bindPair) run(b *testing.B, batches int, batch [][]byte) (time.Duration, int64) {
	before := p.received.Load()
	start := time.Now()
	for range batches {
		if err := p.send.Send(batch, p.ep); err != nil {
			b.Fatal(err)
		}
	}
	want := before + int64(batches*len(batch))
	for seen, idle := p.received.Load(), 0; seen < want && idle < 5; {
		time.Sleep(10 * time.Millisecond)
		if now := p.received.Load(); now == seen {
			idle++
		} else {
			seen, idle = now, 0
		}
	}
	got := p.received.Load() - before
	if got == 0 {
		return 0, 0 // all lost: the loss metric says so
	}
	return time.Unix(0, p.last.Load()).Sub(start), got
}

// BenchmarkBind moves WireGuard-sized datagrams between two binds on
// loopback, AddrBind and wireguard-go's default bind taking turns in the
// same run, and reports each one's delivered rate and AddrBind's share of
// the default's.
func BenchmarkBind(b *testing.B) {
	const size = 1452 // a full 1420-byte tunnel packet, encrypted
	batch := make([][]byte, conn.IdealBatchSize)
	for i := range batch {
		// With room behind it, as the device's buffers have: the default
		// bind coalesces a run into its first buffer.
		batch[i] = append(make([]byte, 0, device.MaxMessageSize), datagram(i, size)...)
	}
	addr := newBindPair(b, func() conn.Bind { return NewAddrBind(netip.MustParseAddr("127.0.0.1")) })
	std := newBindPair(b, conn.NewStdNetBind)
	var addrTime, stdTime time.Duration
	var addrGot, stdGot int64
	b.ResetTimer()
	for left := b.N; left > 0; {
		n := min(left, 64)
		left -= n
		d, got := addr.run(b, n, batch)
		addrTime, addrGot = addrTime+d, addrGot+got
		d, got = std.run(b, n, batch)
		stdTime, stdGot = stdTime+d, stdGot+got
	}
	b.StopTimer()
	gbps := func(got int64, d time.Duration) float64 { return float64(got*size*8) / d.Seconds() / 1e9 }
	sent := float64(b.N * len(batch))
	b.ReportMetric(gbps(addrGot, addrTime), "addr-Gbit/s")
	b.ReportMetric(gbps(stdGot, stdTime), "std-Gbit/s")
	b.ReportMetric(1-float64(addrGot)/sent, "addr-loss")
	b.ReportMetric(1-float64(stdGot)/sent, "std-loss")
	b.ReportMetric(gbps(addrGot, addrTime)/gbps(stdGot, stdTime), "addr/std")
}
