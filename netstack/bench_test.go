package netstack

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sluice-vpn/sluice/netstack/netstacktest"
	"github.com/sluice-vpn/sluice/tunnel/memtun"
)

// benchBatch is the number of packets per Write, as the gateway's pumps
// and wireguard-go hand them over.
const benchBatch = 128

// dropHandler counts every datagram and drops it; it refuses everything
// else.
type dropHandler struct{ datagrams atomic.Uint64 }

func (h *dropHandler) DialTCP(context.Context, netip.AddrPort, netip.AddrPort) (net.Conn, error) {
	return nil, Refuse(RefuseReset, errors.New("bench: no TCP"))
}

func (h *dropHandler) HandleUDP(netip.AddrPort, netip.AddrPort, []byte) error {
	h.datagrams.Add(1)
	return nil
}

func (h *dropHandler) HandleEcho(netip.Addr, netip.Addr, uint16, uint16, []byte) error {
	return Refuse(RefuseDrop, errors.New("bench: no echo"))
}

// BenchmarkStackWrite measures UDP datagrams going into the stack through
// Write, in batches of 128, to a handler that drops them: the cost of
// parsing, checksumming and demultiplexing on the way in. Each operation
// is one batch. The baseline, timed in the same run in alternating chunks,
// is the same batch written into one end of a memtun pair and read out of
// the other: what moving the packets costs with no stack at all. It is
// reported as memtun-pkts/s, and the stack's rate as a fraction of it as
// ratio.
func BenchmarkStackWrite(b *testing.B) {
	for _, payload := range []int{32, 1392} { // 1392: a full 1420-byte packet
		b.Run(fmt.Sprintf("udp-%d", payload), func(b *testing.B) {
			h := &dropHandler{}
			s, err := New(Options{Handler: h})
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { s.Close() })
			batch := make([][]byte, benchBatch)
			data := make([]byte, payload)
			size := 0
			for i := range batch {
				// Many flows, one destination: a different source port
				// per packet.
				src := netip.AddrPortFrom(clientV4, uint16(20000+i))
				batch[i] = buildUDP4(b, src, netip.MustParseAddrPort("127.0.0.1:9"), data)
				size += len(batch[i])
			}

			a, z, err := memtun.NewPair(memtun.Options{BatchSize: benchBatch})
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { a.Close(); z.Close() })
			bufs := make([][]byte, benchBatch)
			sizes := make([]int, benchBatch)
			for i := range bufs {
				bufs[i] = make([]byte, 65535)
			}
			pipe := func() {
				if _, err := a.Write(batch, 0); err != nil {
					b.Fatal(err)
				}
				for got := 0; got < benchBatch; {
					n, err := z.Read(bufs, sizes, 0)
					if err != nil {
						b.Fatal(err)
					}
					got += n
				}
			}
			write := func() {
				if _, err := s.Write(batch, 0); err != nil {
					b.Fatal(err)
				}
			}

			write()
			pipe()
			before := h.datagrams.Load()
			b.SetBytes(int64(size))
			b.ReportAllocs()
			b.ResetTimer()
			pipeTime := interleaved(b, write, pipe)
			b.StopTimer()

			// Every datagram reached the handler, none was dropped as
			// malformed: the figure is for the whole way in.
			want := before + uint64(b.N)*benchBatch
			deadline := time.Now().Add(5 * time.Second)
			for h.datagrams.Load() < want && time.Now().Before(deadline) {
				time.Sleep(time.Millisecond)
			}
			if got := h.datagrams.Load(); got != want {
				b.Fatalf("handler saw %d datagrams, want %d", got-before, want-before)
			}
			if st := s.Stats(); st.Malformed != 0 {
				b.Fatalf("%d packets counted malformed", st.Malformed)
			}
			pkts := float64(b.N) * benchBatch
			stackRate := pkts / b.Elapsed().Seconds()
			pipeRate := pkts / pipeTime.Seconds()
			b.ReportMetric(stackRate, "pkts/s")
			b.ReportMetric(pipeRate, "memtun-pkts/s")
			b.ReportMetric(stackRate/pipeRate, "ratio")
		})
	}
}

// BenchmarkStackTCP measures one TCP stream through the stack: a client
// stack joined to it by memory, the stack relaying to a server on
// loopback through a handler that dials it directly. Each operation moves
// 16 MiB, client to server (upload) or back (download). The same transfer
// over plain loopback, timed in the same run after each operation, is the
// baseline: reported as loopback-MB/s, and the stack's throughput as a
// fraction of it as ratio.
func BenchmarkStackTCP(b *testing.B) {
	for _, up := range []bool{true, false} {
		name := "download"
		if up {
			name = "upload"
		}
		b.Run(name, func(b *testing.B) {
			const size = 16 << 20
			s, err := New(Options{Handler: loopbackDialer{}})
			if err != nil {
				b.Fatal(err)
			}
			client, err := netstacktest.NewClient([]netip.Addr{clientV4}, 1420)
			if err != nil {
				b.Fatal(err)
			}
			wait := netstacktest.Join(s, client)
			b.Cleanup(func() {
				client.Close()
				s.Close()
				wait()
			})
			srv := newBenchSink(b, up, size)
			var d net.Dialer

			b.SetBytes(size)
			b.ReportAllocs()
			b.ResetTimer()
			var base time.Duration
			for range b.N {
				benchTransfer(b, client.DialContext, srv, up, size)
				b.StopTimer()
				start := time.Now()
				benchTransfer(b, d.DialContext, srv, up, size)
				base += time.Since(start)
				b.StartTimer()
			}
			b.StopTimer()
			through := float64(size) * float64(b.N) / b.Elapsed().Seconds() / 1e6
			plain := float64(size) * float64(b.N) / base.Seconds() / 1e6
			b.ReportMetric(plain, "loopback-MB/s")
			b.ReportMetric(through/plain, "ratio")
		})
	}
}

// loopbackDialer is a Handler that dials every TCP destination directly;
// the benchmark only ever gives it loopback ones.
type loopbackDialer struct{}

func (loopbackDialer) DialTCP(ctx context.Context, _, dst netip.AddrPort) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "tcp", dst.String())
}

func (loopbackDialer) HandleUDP(netip.AddrPort, netip.AddrPort, []byte) error {
	return Refuse(RefuseReset, errors.New("bench: no UDP"))
}

func (loopbackDialer) HandleEcho(netip.Addr, netip.Addr, uint16, uint16, []byte) error {
	return Refuse(RefuseDrop, errors.New("bench: no echo"))
}

// newBenchSink listens on loopback. For an upload it reads each
// connection to its end and answers with the number of bytes it read; for
// a download it sends size bytes and closes.
func newBenchSink(b *testing.B, up bool, size int64) netip.AddrPort {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				if !up {
					io.CopyN(c, benchZeros{}, size)
					return
				}
				n, _ := io.Copy(io.Discard, c)
				fmt.Fprint(c, n)
			})
		}
	})
	b.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

type benchZeros struct{}

func (benchZeros) Read(p []byte) (int, error) { clear(p); return len(p), nil }

// benchTransfer moves size bytes over one connection made by dial, and
// checks that all of them arrived.
func benchTransfer(b *testing.B, dial func(ctx context.Context, network, addr string) (net.Conn, error), dst netip.AddrPort, up bool, size int64) {
	c, err := dial(context.Background(), "tcp4", dst.String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Minute))
	if !up {
		if got, err := io.Copy(io.Discard, c); err != nil || got != size {
			b.Fatalf("received %d of %d bytes: %v", got, size, err)
		}
		return
	}
	if n, err := io.CopyN(c, benchZeros{}, size); err != nil {
		b.Fatalf("upload stalled after %d of %d bytes: %v", n, size, err)
	}
	if err := c.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		b.Fatal(err)
	}
	count, err := io.ReadAll(c)
	if err != nil || string(count) != strconv.FormatInt(size, 10) {
		b.Fatalf("the server counted %q bytes of %d: %v", count, size, err)
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
