package nat

import (
	"errors"
	"fmt"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fakeClock is a monotonic clock that moves only when told to.
type fakeClock struct {
	base time.Time
	off  atomic.Int64
}

func newFakeClock() *fakeClock {
	return &fakeClock{base: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)}
}

func (c *fakeClock) now() time.Time          { return c.base.Add(time.Duration(c.off.Load())) }
func (c *fakeClock) advance(d time.Duration) { c.off.Add(int64(d)) }

func newTestTable(t testing.TB, opts TableOptions) (*Table, *fakeClock) {
	t.Helper()
	clk := newFakeClock()
	if opts.clock == nil {
		opts.clock = clk.now
	}
	tab, err := NewTable(opts)
	if err != nil {
		t.Fatalf("NewTable: %v", err)
	}
	t.Cleanup(tab.Close)
	return tab, clk
}

func testKey(proto Proto, n int) Key {
	return Key{
		Proto:  proto,
		Client: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(n >> 16), byte(n >> 8), byte(n)}), uint16(40000+n%20000)),
		Dest:   netip.MustParseAddrPort("192.0.2.80:443"),
	}
}

// closerLog records the reasons a closer was called with.
type closerLog struct {
	mu      sync.Mutex
	reasons []Reason
}

func (c *closerLog) closer(r Reason) {
	c.mu.Lock()
	c.reasons = append(c.reasons, r)
	c.mu.Unlock()
}

func (c *closerLog) get() []Reason {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Reason(nil), c.reasons...)
}

func TestNewTableValidates(t *testing.T) {
	for _, tc := range []struct {
		name  string
		opts  TableOptions
		field string
	}{
		{"MaxFlows", TableOptions{MaxFlows: -1}, "MaxFlows"},
		{"Shards", TableOptions{Shards: -2}, "Shards"},
		{"ShardsHuge", TableOptions{Shards: 1 << 20}, "Shards"},
		{"ScanInterval", TableOptions{ScanInterval: -time.Second}, "ScanInterval"},
		{"Timeout", TableOptions{Timeouts: Timeouts{UDPAssured: -1}}, "Timeouts.UDPAssured"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := NewTable(tc.opts)
			if err == nil {
				t.Fatal("NewTable accepted bad options")
			}
			if !strings.Contains(err.Error(), tc.field) {
				t.Errorf("error %q does not name field %s", err, tc.field)
			}
		})
	}
	tab, err := NewTable(TableOptions{Shards: 5})
	if err != nil {
		t.Fatal(err)
	}
	defer tab.Close()
	if len(tab.shards) != 8 {
		t.Errorf("Shards 5 gave %d shards, want 8", len(tab.shards))
	}
	if tab.maxFlows != 65536 {
		t.Errorf("default MaxFlows = %d, want 65536", tab.maxFlows)
	}
}

func TestTableCountersAndSnapshot(t *testing.T) {
	tab, clk := newTestTable(t, TableOptions{})
	start := clk.now()

	kt, ku, ki := testKey(TCP, 1), testKey(UDP, 2), testKey(ICMP, 3)
	ft, err := tab.Insert(kt, "alice", nil)
	if err != nil {
		t.Fatal(err)
	}
	clk.advance(time.Second)
	fu, err := tab.Insert(ku, "bob", nil)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := tab.Insert(ki, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tab.Insert(ku, "bob", nil); !errors.Is(err, ErrFlowExists) {
		t.Fatalf("duplicate insert: err = %v, want ErrFlowExists", err)
	}

	if ft.State() != StateNew || fu.State() != StateUnreplied || fi.State() != StateUnreplied {
		t.Fatalf("initial states tcp=%v udp=%v icmp=%v, want new, unreplied, unreplied", ft.State(), fu.State(), fi.State())
	}
	if got := tab.Lookup(ku); got != fu {
		t.Errorf("Lookup(%v) = %v, want the inserted flow", ku, got)
	}
	if got := tab.Get(fi.ID()); got != fi {
		t.Errorf("Get(%d) = %v, want the inserted flow", fi.ID(), got)
	}
	if got := tab.Lookup(testKey(UDP, 99)); got != nil {
		t.Errorf("Lookup of absent key = %v", got)
	}
	if got := tab.Get(ft.ID() + 1<<tab.shardBits*1000); got != nil {
		t.Errorf("Get of absent ID = %v", got)
	}

	egress := netip.MustParseAddrPort("198.51.100.7:61000")
	ft.SetEgress(egress)
	ft.SetState(StateEstablished)
	clk.advance(2 * time.Second)
	ft.CountOrig(1000, 2)
	ft.CountOrig(500, 1)
	ft.CountReply(7000, 5)
	fu.CountOrig(100, 1)
	fu.CountReply(40, 1)
	fi.CountOrig(64, 1)

	if ft.State() != StateEstablished {
		t.Errorf("a TCP reply changed the state to %v", ft.State())
	}
	if fu.State() != StateAssured {
		t.Errorf("UDP after a reply is %v, want assured", fu.State())
	}
	if fi.State() != StateUnreplied {
		t.Errorf("ICMP without a reply is %v, want unreplied", fi.State())
	}

	snap := tab.Snapshot()
	if len(snap) != 3 || tab.Len() != 3 {
		t.Fatalf("Snapshot has %d entries, Len %d; want 3", len(snap), tab.Len())
	}
	for i := 1; i < len(snap); i++ {
		if snap[i-1].ID >= snap[i].ID {
			t.Fatalf("snapshot not sorted by ID: %d before %d", snap[i-1].ID, snap[i].ID)
		}
	}
	want := Entry{
		ID: ft.ID(), Key: kt, Peer: "alice", State: StateEstablished, Egress: egress,
		OrigBytes: 1500, OrigPackets: 3, ReplyBytes: 7000, ReplyPackets: 5,
	}
	got := snap[0]
	wantCreated, wantSeen := start, start.Add(3*time.Second)
	if !got.Created.Equal(wantCreated) || !got.LastSeen.Equal(wantSeen) {
		t.Errorf("tcp times: created %v last seen %v; want %v and %v", got.Created, got.LastSeen, wantCreated, wantSeen)
	}
	got.Created, got.LastSeen = time.Time{}, time.Time{}
	if got != want {
		t.Errorf("tcp entry\n got %+v\nwant %+v", got, want)
	}
	if e := snap[1]; e.Key != ku || e.Peer != "bob" || e.OrigBytes != 100 || e.ReplyPackets != 1 || e.State != StateAssured ||
		!e.Created.Equal(start.Add(time.Second)) {
		t.Errorf("udp entry %+v", e)
	}
	if e := snap[2]; e.Key != ki || e.OrigPackets != 1 || e.ReplyPackets != 0 || e.Egress.IsValid() {
		t.Errorf("icmp entry %+v", e)
	}

	st := tab.Stats()
	if st.Flows != 3 || st.Inserted != 3 || st.Ended != 0 {
		t.Errorf("stats %+v", st)
	}
}

func TestTableExpiryPerState(t *testing.T) {
	to := Timeouts{
		TCPNew:         10 * time.Second,
		TCPEstablished: 100 * time.Second,
		TCPClosing:     20 * time.Second,
		UDPUnreplied:   30 * time.Second,
		UDPAssured:     40 * time.Second,
		ICMP:           50 * time.Second,
	}
	for _, tc := range []struct {
		name    string
		proto   Proto
		prepare func(f *Flow)
		timeout time.Duration
	}{
		{"tcp-new", TCP, func(*Flow) {}, to.TCPNew},
		{"tcp-established", TCP, func(f *Flow) { f.SetState(StateEstablished) }, to.TCPEstablished},
		{"tcp-closing", TCP, func(f *Flow) { f.SetState(StateClosing) }, to.TCPClosing},
		{"udp-unreplied", UDP, func(f *Flow) { f.CountOrig(10, 1) }, to.UDPUnreplied},
		{"udp-assured", UDP, func(f *Flow) { f.CountReply(10, 1) }, to.UDPAssured},
		{"icmp-unreplied", ICMP, func(*Flow) {}, to.ICMP},
		{"icmp-assured", ICMP, func(f *Flow) { f.CountReply(10, 1) }, to.ICMP},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tab, clk := newTestTable(t, TableOptions{Timeouts: to})
			events, cancel := tab.Subscribe(8)
			defer cancel()
			var log closerLog
			f, err := tab.Insert(testKey(tc.proto, 1), "p", log.closer)
			if err != nil {
				t.Fatal(err)
			}
			<-events // EventNew
			tc.prepare(f)

			clk.advance(tc.timeout)
			if n := tab.expire(); n != 0 || tab.Lookup(f.Key()) == nil {
				t.Fatalf("expired after exactly its timeout %v (n=%d)", tc.timeout, n)
			}
			// Traffic resets the idle clock.
			f.CountOrig(1, 1)
			clk.advance(tc.timeout)
			if n := tab.expire(); n != 0 {
				t.Fatalf("expired %v after its last packet, timeout %v", tc.timeout, tc.timeout)
			}
			clk.advance(time.Second)
			if n := tab.expire(); n != 1 {
				t.Fatalf("expire ended %d flows, want 1", n)
			}
			if tab.Lookup(f.Key()) != nil || tab.Get(f.ID()) != nil || tab.Len() != 0 {
				t.Error("expired flow still in table")
			}
			if got := log.get(); len(got) != 1 || got[0] != ReasonTimeout {
				t.Errorf("closer calls %v, want [timeout]", got)
			}
			ev := <-events
			if ev.Type != EventEnded || ev.Reason != ReasonTimeout || ev.Entry.ID != f.ID() {
				t.Errorf("event %+v, want ended/timeout", ev)
			}
			if st := tab.Stats(); st.Expired != 1 || st.Ended != 1 {
				t.Errorf("stats %+v", st)
			}
			// The owner reacting to the closer must not end it twice.
			f.End(ReasonClosed)
			select {
			case ev := <-events:
				t.Errorf("second event after End: %+v", ev)
			default:
			}
		})
	}
}

func TestTableJanitor(t *testing.T) {
	tab, err := NewTable(TableOptions{
		Timeouts:     Timeouts{UDPUnreplied: 30 * time.Millisecond, UDPAssured: time.Hour},
		ScanInterval: 5 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer tab.Close()
	tab.Start(t.Context())
	tab.Start(t.Context()) // second Start is a no-op

	events, cancel := tab.Subscribe(16)
	defer cancel()
	idle, _ := tab.Insert(testKey(UDP, 1), "", nil)
	busy, _ := tab.Insert(testKey(UDP, 2), "", nil)
	busy.CountReply(1, 1) // assured: an hour

	deadline := time.After(3 * time.Second)
	for {
		select {
		case ev := <-events:
			if ev.Type != EventEnded {
				continue
			}
			if ev.Entry.ID != idle.ID() || ev.Reason != ReasonTimeout {
				t.Fatalf("janitor ended %+v", ev)
			}
			if tab.Lookup(busy.Key()) == nil {
				t.Fatal("janitor ended the assured flow too")
			}
			return
		case <-deadline:
			t.Fatal("janitor did not expire an idle flow")
		}
	}
}

func TestTableFull(t *testing.T) {
	tab, _ := newTestTable(t, TableOptions{MaxFlows: 3, Shards: 2})
	var flows []*Flow
	for i := range 3 {
		f, err := tab.Insert(testKey(UDP, i), "", nil)
		if err != nil {
			t.Fatalf("insert %d: %v", i, err)
		}
		flows = append(flows, f)
	}
	for i := 3; i < 6; i++ {
		if _, err := tab.Insert(testKey(UDP, i), "", nil); !errors.Is(err, ErrTableFull) {
			t.Fatalf("insert %d into a full table: err = %v, want ErrTableFull", i, err)
		}
	}
	if st := tab.Stats(); st.Refused != 3 || st.Flows != 3 {
		t.Errorf("stats %+v, want 3 refused and 3 flows", st)
	}
	// A refused duplicate must not leak a slot.
	if _, err := tab.Insert(testKey(UDP, 0), "", nil); err == nil {
		t.Fatal("duplicate accepted")
	}
	flows[1].End(ReasonClosed)
	if _, err := tab.Insert(testKey(UDP, 10), "", nil); err != nil {
		t.Fatalf("insert after a flow ended: %v", err)
	}
	if _, err := tab.Insert(testKey(UDP, 11), "", nil); !errors.Is(err, ErrTableFull) {
		t.Fatalf("table over its limit: err = %v", err)
	}
}

func TestTableEvents(t *testing.T) {
	tab, _ := newTestTable(t, TableOptions{})
	events, cancel := tab.Subscribe(16)

	var log closerLog
	key := testKey(TCP, 1)
	f, err := tab.Insert(key, "alice", log.closer)
	if err != nil {
		t.Fatal(err)
	}
	ev := <-events
	if ev.Type != EventNew || ev.Entry.ID != f.ID() || ev.Entry.Key != key || ev.Entry.Peer != "alice" || ev.Entry.State != StateNew {
		t.Fatalf("new event %+v", ev)
	}
	f.SetState(StateEstablished)
	f.CountOrig(300, 3)
	f.CountReply(9000, 7)
	f.End(ReasonReset)
	ev = <-events
	if ev.Type != EventEnded || ev.Reason != ReasonReset || ev.Entry.ID != f.ID() {
		t.Fatalf("ended event %+v", ev)
	}
	if e := ev.Entry; e.OrigBytes != 300 || e.OrigPackets != 3 || e.ReplyBytes != 9000 || e.ReplyPackets != 7 || e.State != StateEstablished {
		t.Errorf("final counters %+v", e)
	}
	if len(log.get()) != 0 {
		t.Error("End called the closer")
	}

	// Evict: closer with ReasonEvicted, then the owner's End is a no-op.
	var log2 closerLog
	var g *Flow
	g, err = tab.Insert(testKey(UDP, 2), "bob", func(r Reason) {
		log2.closer(r)
		g.CountOrig(5, 1) // last bytes in flight while closing
		g.End(ReasonClosed)
	})
	if err != nil {
		t.Fatal(err)
	}
	<-events
	if !tab.Evict(g.ID()) {
		t.Fatal("Evict returned false for a live flow")
	}
	if tab.Evict(g.ID()) {
		t.Fatal("second Evict returned true")
	}
	if tab.Evict(12345678) {
		t.Fatal("Evict of an unknown ID returned true")
	}
	if got := log2.get(); len(got) != 1 || got[0] != ReasonEvicted {
		t.Errorf("closer calls %v, want [evicted]", got)
	}
	ev = <-events
	if ev.Type != EventEnded || ev.Reason != ReasonEvicted || ev.Entry.OrigBytes != 5 {
		t.Errorf("evict event %+v, want ended/evicted with the bytes counted by the closer", ev)
	}
	select {
	case ev := <-events:
		t.Errorf("unexpected event %+v", ev)
	default:
	}
	if st := tab.Stats(); st.Evicted != 1 || st.Ended != 2 || st.Flows != 0 {
		t.Errorf("stats %+v", st)
	}

	cancel()
	if _, ok := <-events; ok {
		t.Error("channel open after cancel")
	}
	cancel() // idempotent
	if _, err := tab.Insert(testKey(UDP, 3), "", nil); err != nil {
		t.Fatal(err) // no subscriber: must not block or panic
	}
}

func TestTableSlowSubscriber(t *testing.T) {
	tab, _ := newTestTable(t, TableOptions{})
	slow, cancelSlow := tab.Subscribe(2)
	defer cancelSlow()
	fast, cancelFast := tab.Subscribe(100)
	defer cancelFast()

	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range 10 {
			f, err := tab.Insert(testKey(UDP, i), "", nil)
			if err != nil {
				t.Error(err)
				return
			}
			f.End(ReasonClosed)
		}
	}()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		t.Fatal("a slow subscriber blocked the table")
	}
	if n := len(fast); n != 20 {
		t.Errorf("fast subscriber got %d events, want 20", n)
	}
	if n := len(slow); n != 2 {
		t.Errorf("slow subscriber holds %d events, want 2", n)
	}
	if st := tab.Stats(); st.EventsDropped != 18 {
		t.Errorf("EventsDropped = %d, want 18", st.EventsDropped)
	}
}

func TestTableClose(t *testing.T) {
	before := runtime.NumGoroutine()
	tab, err := NewTable(TableOptions{ScanInterval: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	tab.Start(t.Context())
	events, _ := tab.Subscribe(100)

	var log closerLog
	var flows []*Flow
	for i := range 5 {
		f, err := tab.Insert(testKey(TCP, i), "", log.closer)
		if err != nil {
			t.Fatal(err)
		}
		flows = append(flows, f)
	}
	flows[0].End(ReasonClosed)

	tab.Close()
	tab.Close()
	if got := log.get(); len(got) != 4 {
		t.Fatalf("Close called %d closers, want 4", len(got))
	} else {
		for _, r := range got {
			if r != ReasonShutdown {
				t.Errorf("closer reason %v, want shutdown", r)
			}
		}
	}
	var ended int
	for ev := range events { // Close closes the channel
		if ev.Type == EventEnded && ev.Reason == ReasonShutdown {
			ended++
		}
	}
	if ended != 4 {
		t.Errorf("%d shutdown events, want 4", ended)
	}
	if _, err := tab.Insert(testKey(TCP, 100), "", nil); !errors.Is(err, ErrTableClosed) {
		t.Errorf("Insert after Close: %v, want ErrTableClosed", err)
	}
	if tab.Len() != 0 {
		t.Errorf("Len after Close = %d", tab.Len())
	}
	ch, cancel := tab.Subscribe(1)
	if _, ok := <-ch; ok {
		t.Error("Subscribe after Close gave an open channel")
	}
	cancel()
	tab.Start(t.Context()) // after Close: must not start a janitor
	waitGoroutines(t, before)
}

// waitGoroutines fails the test if the goroutine count does not come back
// down to at most n.
func waitGoroutines(t *testing.T, n int) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for runtime.NumGoroutine() > n {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<16)
			t.Fatalf("%d goroutines, want at most %d:\n%s", runtime.NumGoroutine(), n, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestTableEndRace ends flows from the owner and the table at once: exactly
// one of them wins each time.
func TestTableEndRace(t *testing.T) {
	tab, _ := newTestTable(t, TableOptions{})
	events, cancel := tab.Subscribe(4096)
	defer cancel()
	const n = 500
	var closers, evictWins atomic.Int64
	for i := range n {
		f, err := tab.Insert(testKey(UDP, i), "", func(Reason) { closers.Add(1) })
		if err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		wg.Add(2)
		go func() { defer wg.Done(); f.End(ReasonClosed) }()
		go func() {
			defer wg.Done()
			if tab.Evict(f.ID()) {
				evictWins.Add(1)
			}
		}()
		wg.Wait()
	}
	var ended int
	for len(events) > 0 {
		if ev := <-events; ev.Type == EventEnded {
			ended++
		}
	}
	if ended != n {
		t.Errorf("%d ended events for %d flows", ended, n)
	}
	if closers.Load() != evictWins.Load() {
		t.Errorf("closer ran %d times, Evict won %d times", closers.Load(), evictWins.Load())
	}
	if st := tab.Stats(); st.Ended != n || st.Flows != 0 || int64(st.Evicted) != evictWins.Load() {
		t.Errorf("stats %+v", st)
	}
	t.Logf("Evict won %d of %d races", evictWins.Load(), n)
}

func TestTableConcurrent(t *testing.T) {
	tab, clk := newTestTable(t, TableOptions{MaxFlows: 1000, Shards: 8, Timeouts: Timeouts{UDPUnreplied: time.Second}})
	events, cancel := tab.Subscribe(64)
	defer cancel()
	go func() {
		for range events {
		}
	}()

	const workers, rounds = 8, 300
	var inserted, full atomic.Int64
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := range rounds {
				key := testKey(UDP, w*rounds+r)
				f, err := tab.Insert(key, fmt.Sprint(w), nil)
				if errors.Is(err, ErrTableFull) {
					full.Add(1)
					continue
				}
				if err != nil {
					t.Error(err)
					return
				}
				inserted.Add(1)
				f.CountOrig(100, 1)
				f.CountReply(50, 1)
				if tab.Lookup(key) != f && !f.Ended() {
					t.Error("Lookup lost a live flow")
				}
				if r%3 == 0 {
					f.End(ReasonClosed) // the rest expire or stay
				}
			}
		}()
	}
	// Readers and the janitor's work, racing with the writers.
	wg.Add(1)
	go func() {
		defer wg.Done()
		for range 50 {
			for _, e := range tab.Snapshot() {
				if f := tab.Get(e.ID); f != nil {
					f.CountOrig(1, 1)
				}
			}
			clk.advance(100 * time.Millisecond)
			tab.expire()
		}
	}()
	wg.Wait()
	clk.advance(time.Hour)
	tab.expire()
	st := tab.Stats()
	if st.Flows != 0 || tab.count.Load() != 0 {
		t.Errorf("%d flows (count %d) left after expiring all", st.Flows, tab.count.Load())
	}
	if int64(st.Inserted) != inserted.Load() || st.Ended != st.Inserted || int64(st.Refused) != full.Load() {
		t.Errorf("stats %+v; inserted %d refused %d", st, inserted.Load(), full.Load())
	}
}

func TestFlowCountDoesNotAllocate(t *testing.T) {
	tab, _ := newTestTable(t, TableOptions{})
	f, err := tab.Insert(testKey(UDP, 1), "", nil)
	if err != nil {
		t.Fatal(err)
	}
	if n := testing.AllocsPerRun(1000, func() {
		f.CountOrig(1400, 1)
		f.CountReply(1400, 1)
	}); n != 0 {
		t.Errorf("counting allocates %v times per call", n)
	}
	if n := testing.AllocsPerRun(1000, func() { tab.Lookup(f.Key()) }); n != 0 {
		t.Errorf("Lookup allocates %v times per call", n)
	}
}

func BenchmarkTableInsertEnd(b *testing.B) {
	tab, err := NewTable(TableOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer tab.Close()
	var next atomic.Int64
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		base := int(next.Add(1)) << 16
		i := 0
		for pb.Next() {
			f, err := tab.Insert(testKey(UDP, base+i%60000), "", nil)
			if err != nil {
				b.Error(err)
				return
			}
			f.End(ReasonClosed)
			i++
		}
	})
}

func BenchmarkFlowCountOrigParallel(b *testing.B) {
	tab, err := NewTable(TableOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer tab.Close()
	f, err := tab.Insert(testKey(TCP, 1), "", nil)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			f.CountOrig(1400, 1)
		}
	})
}
