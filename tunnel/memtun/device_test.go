package memtun

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/tun"
)

// blockWait is how long a test waits to decide that a call is blocked.
const blockWait = 50 * time.Millisecond

func newPair(t testing.TB, opts Options) (a, b *Device) {
	t.Helper()
	a, b, err := NewPair(opts)
	if err != nil {
		t.Fatalf("NewPair: %v", err)
	}
	t.Cleanup(func() {
		a.Close()
		b.Close()
	})
	return a, b
}

// pkt builds a packet of size bytes that carries seq in its first 8 bytes
// and a pattern derived from seq after that, so that mixing up or corrupting
// packets shows.
func pkt(seq uint64, size int) []byte {
	p := make([]byte, size)
	binary.BigEndian.PutUint64(p, seq)
	for i := 8; i < size; i++ {
		p[i] = byte(seq) + byte(i)
	}
	return p
}

func checkPkt(t testing.TB, got []byte, seq uint64, size int) {
	t.Helper()
	if want := pkt(seq, size); !bytes.Equal(got, want) {
		gotSeq := uint64(0)
		if len(got) >= 8 {
			gotSeq = binary.BigEndian.Uint64(got)
		}
		t.Fatalf("packet %d: got %d bytes (seq %d), want %d bytes", seq, len(got), gotSeq, size)
	}
}

func makeBufs(n, size int) ([][]byte, []int) {
	bufs := make([][]byte, n)
	for i := range bufs {
		bufs[i] = make([]byte, size)
	}
	return bufs, make([]int, n)
}

// async runs f in a goroutine and returns a channel that yields its result.
func async[T any](f func() T) <-chan T {
	ch := make(chan T, 1)
	go func() { ch <- f() }()
	return ch
}

type result struct {
	n   int
	err error
}

func TestOptions(t *testing.T) {
	a, b := newPair(t, Options{})
	for _, d := range []*Device{a, b} {
		if mtu, err := d.MTU(); mtu != DefaultMTU || err != nil {
			t.Errorf("MTU() = %d, %v; want %d", mtu, err, DefaultMTU)
		}
		if name, err := d.Name(); name != DefaultName || err != nil {
			t.Errorf("Name() = %q, %v; want %q", name, err, DefaultName)
		}
		if bs := d.BatchSize(); bs != DefaultBatchSize {
			t.Errorf("BatchSize() = %d; want %d", bs, DefaultBatchSize)
		}
		if d.File() != nil {
			t.Errorf("File() is not nil")
		}
	}
	if got := len(a.out.ring); got != DefaultQueueLen {
		t.Errorf("queue length %d; want %d", got, DefaultQueueLen)
	}

	c, _ := newPair(t, Options{MTU: 9000, BatchSize: 7, QueueLen: 3, Name: "x0"})
	if mtu, _ := c.MTU(); mtu != 9000 {
		t.Errorf("MTU() = %d; want 9000", mtu)
	}
	if name, _ := c.Name(); name != "x0" {
		t.Errorf("Name() = %q; want x0", name)
	}
	if c.BatchSize() != 7 {
		t.Errorf("BatchSize() = %d; want 7", c.BatchSize())
	}

	for _, tc := range []struct {
		opts  Options
		field string
	}{
		{Options{MTU: -1}, "MTU"},
		{Options{MTU: MaxPacketSize + 1}, "MTU"},
		{Options{BatchSize: -1}, "BatchSize"},
		{Options{QueueLen: -5}, "QueueLen"},
	} {
		_, _, err := NewPair(tc.opts)
		if err == nil || !strings.Contains(err.Error(), "Options."+tc.field) {
			t.Errorf("NewPair(%+v) = %v; want an error naming Options.%s", tc.opts, err, tc.field)
		}
	}
}

var _ tun.Device = (*Device)(nil)

func TestEvents(t *testing.T) {
	a, b := newPair(t, Options{})
	for _, d := range []*Device{a, b} {
		select {
		case ev := <-d.Events():
			if ev != tun.EventUp {
				t.Fatalf("first event %v; want EventUp", ev)
			}
		case <-time.After(time.Second):
			t.Fatal("no EventUp")
		}
		select {
		case ev := <-d.Events():
			t.Fatalf("second event %v before Close", ev)
		default:
		}
	}
	a.Close()
	if _, ok := <-a.Events(); ok {
		t.Fatal("Events channel still open after Close")
	}
	select {
	case ev, ok := <-b.Events():
		t.Fatalf("peer's Events yielded %v, %v after the other end closed", ev, ok)
	default:
	}
}

func TestOrderBothDirections(t *testing.T) {
	a, b := newPair(t, Options{QueueLen: 4096})
	const total = 1000
	for _, dir := range []struct {
		name     string
		from, to *Device
	}{{"a->b", a, b}, {"b->a", b, a}} {
		t.Run(dir.name, func(t *testing.T) {
			// Write in batches of varying size and packets of varying length.
			var seq uint64
			for batch := 1; seq < total; batch = batch%17 + 1 {
				var bufs [][]byte
				for i := 0; i < batch && seq < total; i++ {
					bufs = append(bufs, pkt(seq, 8+int(seq%1400)))
					seq++
				}
				if n, err := dir.from.Write(bufs, 0); n != len(bufs) || err != nil {
					t.Fatalf("Write = %d, %v; want %d, nil", n, err, len(bufs))
				}
			}
			bufs, sizes := makeBufs(13, 1500)
			for want := uint64(0); want < total; {
				n, err := dir.to.Read(bufs, sizes, 0)
				if err != nil || n < 1 {
					t.Fatalf("Read = %d, %v", n, err)
				}
				for i := 0; i < n; i++ {
					checkPkt(t, bufs[i][:sizes[i]], want, 8+int(want%1400))
					want++
				}
			}
		})
	}
}

func TestOffset(t *testing.T) {
	a, b := newPair(t, Options{})
	const off = 16
	in := make([]byte, off+100)
	copy(in[:off], bytes.Repeat([]byte{0xee}, off)) // must not travel
	copy(in[off:], pkt(42, 100))
	if n, err := a.Write([][]byte{in}, off); n != 1 || err != nil {
		t.Fatalf("Write = %d, %v", n, err)
	}
	bufs, sizes := makeBufs(1, off+100)
	if n, err := b.Read(bufs, sizes, off); n != 1 || err != nil {
		t.Fatalf("Read = %d, %v", n, err)
	}
	if sizes[0] != 100 {
		t.Fatalf("size %d; want 100", sizes[0])
	}
	checkPkt(t, bufs[0][off:off+sizes[0]], 42, 100)
	if !bytes.Equal(bufs[0][:off], make([]byte, off)) {
		t.Fatal("Read wrote before offset")
	}

	if _, err := a.Write([][]byte{make([]byte, 4)}, 5); err == nil {
		t.Error("Write with offset beyond the buffer succeeded")
	}
	a.Write([][]byte{pkt(1, 10)}, 0)
	if _, err := b.Read(bufs, sizes, off+101); err == nil {
		t.Error("Read with offset beyond the buffer succeeded")
	}
}

func TestBatching(t *testing.T) {
	a, b := newPair(t, Options{BatchSize: 8, QueueLen: 64})
	var bufs [][]byte
	for i := range 20 {
		bufs = append(bufs, pkt(uint64(i), 60))
	}
	if n, err := a.Write(bufs, 0); n != 20 || err != nil {
		t.Fatalf("Write = %d, %v", n, err)
	}
	rb, sizes := makeBufs(50, 100)
	var seq uint64
	// BatchSize caps a read, then what is left, then len(bufs) caps it.
	for _, tc := range []struct{ bufs, want int }{{50, 8}, {50, 8}, {3, 3}, {50, 1}} {
		n, err := b.Read(rb[:tc.bufs], sizes, 0)
		if n != tc.want || err != nil {
			t.Fatalf("Read(%d bufs) = %d, %v; want %d", tc.bufs, n, err, tc.want)
		}
		for i := range n {
			checkPkt(t, rb[i][:sizes[i]], seq, 60)
			seq++
		}
	}
	if n, err := b.Read(nil, nil, 0); n != 0 || err != nil {
		t.Fatalf("Read(no bufs) = %d, %v; want 0, nil", n, err)
	}

	// Packets queued while a Read is blocked come out together once it wakes,
	// or in the following read: none are lost.
	got := async(func() result { n, err := b.Read(rb, sizes, 0); return result{n, err} })
	time.Sleep(blockWait)
	a.Write([][]byte{pkt(100, 10), pkt(101, 10), pkt(102, 10)}, 0)
	r := <-got
	if r.err != nil || r.n < 1 {
		t.Fatalf("Read = %d, %v", r.n, r.err)
	}
	if r.n < 3 {
		n, err := b.Read(rb[r.n:], sizes[r.n:], 0)
		if err != nil || r.n+n != 3 {
			t.Fatalf("second Read = %d, %v after %d; want 3 in all", n, err, r.n)
		}
	}
	for i := range 3 {
		checkPkt(t, rb[i][:sizes[i]], uint64(100+i), 10)
	}
}

func TestReadBlocksUntilWrite(t *testing.T) {
	a, b := newPair(t, Options{})
	bufs, sizes := makeBufs(4, 100)
	got := async(func() result { n, err := b.Read(bufs, sizes, 0); return result{n, err} })
	select {
	case r := <-got:
		t.Fatalf("Read returned %d, %v with nothing written", r.n, r.err)
	case <-time.After(blockWait):
	}
	a.Write([][]byte{pkt(7, 20)}, 0)
	select {
	case r := <-got:
		if r.n != 1 || r.err != nil {
			t.Fatalf("Read = %d, %v", r.n, r.err)
		}
		checkPkt(t, bufs[0][:sizes[0]], 7, 20)
	case <-time.After(time.Second):
		t.Fatal("Read still blocked after Write")
	}
}

func TestEmptyPacketsDropped(t *testing.T) {
	a, b := newPair(t, Options{})
	in := [][]byte{make([]byte, 4), pkt(1, 9), make([]byte, 4), pkt(2, 9), make([]byte, 4)}
	if n, err := a.Write(in, 4); n != len(in) || err != nil {
		t.Fatalf("Write = %d, %v; want %d, nil", n, err, len(in))
	}
	// At offset 4 the 4-byte buffers are empty packets; the 9-byte ones carry
	// their last 5 bytes.
	bufs, sizes := makeBufs(8, 100)
	n, err := b.Read(bufs, sizes, 0)
	if n != 2 || err != nil {
		t.Fatalf("Read = %d, %v; want 2 packets", n, err)
	}
	if !bytes.Equal(bufs[0][:sizes[0]], pkt(1, 9)[4:]) || !bytes.Equal(bufs[1][:sizes[1]], pkt(2, 9)[4:]) {
		t.Fatalf("got %x and %x", bufs[0][:sizes[0]], bufs[1][:sizes[1]])
	}
}

func TestShortBuffer(t *testing.T) {
	a, b := newPair(t, Options{})
	a.Write([][]byte{pkt(1, 10), pkt(2, 100), pkt(3, 10)}, 0)
	bufs, sizes := makeBufs(3, 50)

	// The batch stops before the packet that does not fit ...
	if n, err := b.Read(bufs, sizes, 0); n != 1 || err != nil {
		t.Fatalf("first Read = %d, %v; want 1, nil", n, err)
	}
	checkPkt(t, bufs[0][:sizes[0]], 1, 10)
	// ... which is reported and dropped when it is first in line ...
	n, err := b.Read(bufs, sizes, 0)
	if n != 0 || err == nil || errors.Is(err, os.ErrClosed) {
		t.Fatalf("second Read = %d, %v; want a short-buffer error", n, err)
	}
	// ... and the link goes on.
	if n, err := b.Read(bufs, sizes, 0); n != 1 || err != nil {
		t.Fatalf("third Read = %d, %v; want 1, nil", n, err)
	}
	checkPkt(t, bufs[0][:sizes[0]], 3, 10)
}

func TestLargePackets(t *testing.T) {
	a, b := newPair(t, Options{MTU: 1280})
	sizes := []int{1280, 1280 + packetSlack, 1280 + packetSlack + 1, 9000, MaxPacketSize}
	for round := range 3 { // twice more to take buffers back out of the pools
		var in [][]byte
		for i, size := range sizes {
			in = append(in, pkt(uint64(round*10+i), size))
		}
		if n, err := a.Write(in, 0); n != len(in) || err != nil {
			t.Fatalf("Write = %d, %v", n, err)
		}
		bufs, got := makeBufs(len(sizes), MaxPacketSize)
		for i := 0; i < len(sizes); {
			n, err := b.Read(bufs[i:], got[i:], 0)
			if err != nil {
				t.Fatalf("Read: %v", err)
			}
			i += n
		}
		for i, size := range sizes {
			checkPkt(t, bufs[i][:got[i]], uint64(round*10+i), size)
		}
	}

	// Over the ceiling: the packets before it go through, it does not.
	n, err := a.Write([][]byte{pkt(1, 10), make([]byte, MaxPacketSize+1), pkt(2, 10)}, 0)
	if n != 1 || err == nil {
		t.Fatalf("Write with an oversized packet = %d, %v; want 1 and an error", n, err)
	}
	bufs, got := makeBufs(4, 100)
	if n, err := b.Read(bufs, got, 0); n != 1 || err != nil {
		t.Fatalf("Read = %d, %v; want only the packet before the oversized one", n, err)
	}
	checkPkt(t, bufs[0][:got[0]], 1, 10)
}

func TestBackPressure(t *testing.T) {
	a, b := newPair(t, Options{QueueLen: 4})
	if n, err := a.Write([][]byte{pkt(0, 10), pkt(1, 10), pkt(2, 10)}, 0); n != 3 || err != nil {
		t.Fatalf("Write = %d, %v", n, err)
	}
	// Two more than fit: the first goes in, then Write waits for room.
	got := async(func() result { n, err := a.Write([][]byte{pkt(3, 10), pkt(4, 10)}, 0); return result{n, err} })
	select {
	case r := <-got:
		t.Fatalf("Write into a full queue returned %d, %v", r.n, r.err)
	case <-time.After(blockWait):
	}
	// The other direction is independent of the full one.
	if n, err := b.Write([][]byte{pkt(9, 10)}, 0); n != 1 || err != nil {
		t.Fatalf("reverse Write = %d, %v", n, err)
	}

	bufs, sizes := makeBufs(1, 100)
	if n, err := b.Read(bufs, sizes, 0); n != 1 || err != nil {
		t.Fatalf("Read = %d, %v", n, err)
	}
	checkPkt(t, bufs[0][:sizes[0]], 0, 10)
	select {
	case r := <-got:
		if r.n != 2 || r.err != nil {
			t.Fatalf("blocked Write = %d, %v; want 2, nil", r.n, r.err)
		}
	case <-time.After(time.Second):
		t.Fatal("Write still blocked after Read made room")
	}
	bufs, sizes = makeBufs(8, 100)
	n, err := b.Read(bufs, sizes, 0)
	if n != 4 || err != nil {
		t.Fatalf("Read = %d, %v; want 4 packets", n, err)
	}
	for i := range n {
		checkPkt(t, bufs[i][:sizes[i]], uint64(i+1), 10)
	}
}

func TestCloseUnblocksOwnRead(t *testing.T) {
	a, _ := newPair(t, Options{})
	bufs, sizes := makeBufs(1, 100)
	got := async(func() result { n, err := a.Read(bufs, sizes, 0); return result{n, err} })
	time.Sleep(blockWait)
	a.Close()
	select {
	case r := <-got:
		if r.n != 0 || r.err != os.ErrClosed {
			t.Fatalf("Read after Close = %d, %v; want 0, os.ErrClosed", r.n, r.err)
		}
	case <-time.After(time.Second):
		t.Fatal("Close did not unblock Read")
	}
	if n, err := a.Read(bufs, sizes, 0); n != 0 || err != os.ErrClosed {
		t.Fatalf("Read on a closed end = %d, %v", n, err)
	}
	if _, err := a.Write([][]byte{pkt(1, 10)}, 0); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("Write on a closed end: %v; want os.ErrClosed", err)
	}
	if err := a.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

func TestCloseUnblocksWrites(t *testing.T) {
	for _, closer := range []string{"writer", "reader"} {
		t.Run("close "+closer, func(t *testing.T) {
			a, b := newPair(t, Options{QueueLen: 2})
			a.Write([][]byte{pkt(0, 10), pkt(1, 10)}, 0)
			got := async(func() result { n, err := a.Write([][]byte{pkt(2, 10), pkt(3, 10)}, 0); return result{n, err} })
			time.Sleep(blockWait)
			if closer == "writer" {
				a.Close()
			} else {
				b.Close()
			}
			select {
			case r := <-got:
				if r.n != 0 || !errors.Is(r.err, os.ErrClosed) {
					t.Fatalf("blocked Write = %d, %v; want 0, os.ErrClosed", r.n, r.err)
				}
			case <-time.After(time.Second):
				t.Fatal("Close did not unblock Write")
			}
		})
	}
}

func TestPeerCloseDrains(t *testing.T) {
	a, b := newPair(t, Options{})
	a.Write([][]byte{pkt(0, 10), pkt(1, 10), pkt(2, 10)}, 0)
	b.Write([][]byte{pkt(5, 10)}, 0)
	a.Close()

	// b reads what a wrote before closing, then learns it is gone.
	bufs, sizes := makeBufs(2, 100)
	var seq uint64
	for seq < 3 {
		n, err := b.Read(bufs, sizes, 0)
		if err != nil {
			t.Fatalf("Read after peer Close with %d packets left: %v", 3-seq, err)
		}
		for i := range n {
			checkPkt(t, bufs[i][:sizes[i]], seq, 10)
			seq++
		}
	}
	if n, err := b.Read(bufs, sizes, 0); n != 0 || err != os.ErrClosed {
		t.Fatalf("Read after drain = %d, %v; want 0, os.ErrClosed", n, err)
	}
	if n, err := b.Write([][]byte{pkt(6, 10)}, 0); n != 0 || !errors.Is(err, os.ErrClosed) {
		t.Fatalf("Write to a closed peer = %d, %v; want 0, os.ErrClosed", n, err)
	}
	// a is closed: what b wrote earlier is gone with it.
	if n, err := a.Read(bufs, sizes, 0); err != os.ErrClosed {
		t.Fatalf("Read on the closed end = %d, %v", n, err)
	}
}

func TestPeerCloseUnblocksRead(t *testing.T) {
	a, b := newPair(t, Options{})
	bufs, sizes := makeBufs(1, 100)
	got := async(func() result { n, err := b.Read(bufs, sizes, 0); return result{n, err} })
	time.Sleep(blockWait)
	a.Close()
	select {
	case r := <-got:
		if r.n != 0 || r.err != os.ErrClosed {
			t.Fatalf("Read = %d, %v; want 0, os.ErrClosed", r.n, r.err)
		}
	case <-time.After(time.Second):
		t.Fatal("peer Close did not unblock Read")
	}
}

// TestConcurrent runs several writers and readers on both ends at once. Each
// writer's packets must arrive intact and, with a single reader per
// direction, in the order that writer sent them.
func TestConcurrent(t *testing.T) {
	const (
		writers   = 4
		perWriter = 3000
	)
	for _, readers := range []int{1, 3} {
		t.Run(map[int]string{1: "one reader", 3: "three readers"}[readers], func(t *testing.T) {
			a, b := newPair(t, Options{QueueLen: 64, BatchSize: 16})
			var (
				wg       sync.WaitGroup
				finished atomic.Int32 // directions that got everything
			)
			type seen struct {
				mu    sync.Mutex
				count [writers]int
				last  [writers]int
			}
			for _, dir := range [][2]*Device{{a, b}, {b, a}} {
				from, to := dir[0], dir[1]
				for w := range writers {
					wg.Add(1)
					go func() {
						defer wg.Done()
						batch := make([][]byte, 0, 7)
						for i := 0; i < perWriter; {
							batch = batch[:0]
							for ; len(batch) < cap(batch) && i < perWriter; i++ {
								batch = append(batch, pkt(uint64(w)<<32|uint64(i), 16+i%300))
							}
							if n, err := from.Write(batch, 0); n != len(batch) || err != nil {
								t.Errorf("Write = %d, %v", n, err)
								return
							}
						}
					}()
				}
				s := new(seen)
				for i := range s.last {
					s.last[i] = -1
				}
				for range readers {
					wg.Add(1)
					go func() {
						defer wg.Done()
						bufs, sizes := makeBufs(16, 400)
						for {
							n, err := to.Read(bufs, sizes, 0)
							if err == os.ErrClosed {
								return
							}
							if err != nil {
								t.Errorf("Read: %v", err)
								return
							}
							s.mu.Lock()
							for i := range n {
								seq := binary.BigEndian.Uint64(bufs[i])
								w, k := int(seq>>32), int(seq&0xffffffff)
								if !bytes.Equal(bufs[i][:sizes[i]], pkt(seq, 16+k%300)) {
									t.Errorf("corrupt packet from writer %d seq %d", w, k)
								}
								if readers == 1 && k != s.last[w]+1 {
									t.Errorf("writer %d: packet %d after %d", w, k, s.last[w])
								}
								s.last[w] = k
								s.count[w]++
							}
							done := true
							for _, c := range s.count {
								done = done && c == perWriter
							}
							s.mu.Unlock()
							if done && finished.Add(1) == 2 {
								// Everything arrived both ways: wake the
								// readers still blocked.
								a.Close()
								b.Close()
							}
						}
					}()
				}
			}
			wg.Wait()
		})
	}
}

func TestSteadyStateDoesNotAllocate(t *testing.T) {
	if raceEnabled {
		t.Skip("sync.Pool drops items at random under -race; allocation counts are meaningless")
	}
	a, b := newPair(t, Options{})
	in := make([][]byte, 32)
	for i := range in {
		in[i] = pkt(uint64(i), 1400)
	}
	bufs, sizes := makeBufs(32, 1500)
	allocs := testing.AllocsPerRun(200, func() {
		a.Write(in, 0)
		for got := 0; got < len(in); {
			n, _ := b.Read(bufs, sizes, 0)
			got += n
		}
	})
	if allocs > 0.5 {
		t.Fatalf("%.1f allocations per 32-packet round trip; want none", allocs)
	}
}

// BenchmarkPair measures packets per second from one end to the other with
// one writer and one reader, both batching like wireguard-go does.
func BenchmarkPair(b *testing.B) {
	for _, size := range []int{64, 1420} {
		b.Run(map[int]string{64: "64B", 1420: "1420B"}[size], func(b *testing.B) {
			x, y := newPair(b, Options{})
			batch := make([][]byte, DefaultBatchSize)
			for i := range batch {
				batch[i] = pkt(uint64(i), size)
			}
			b.SetBytes(int64(size))
			b.ReportAllocs()
			done := make(chan error, 1)
			go func() {
				bufs, sizes := makeBufs(DefaultBatchSize, 1500)
				for got := 0; got < b.N; {
					n, err := y.Read(bufs, sizes, 0)
					if err != nil {
						done <- err
						return
					}
					got += n
				}
				done <- nil
			}()
			b.ResetTimer()
			for sent := 0; sent < b.N; {
				n, err := x.Write(batch[:min(len(batch), b.N-sent)], 0)
				if err != nil {
					b.Fatal(err)
				}
				sent += n
			}
			if err := <-done; err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "packets/s")
		})
	}
}
