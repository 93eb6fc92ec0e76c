package nat

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/maphash"
	"math/bits"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// Errors returned by Table.Insert. They are wrapped with the flow's key;
// test for them with errors.Is.
var (
	// ErrTableFull means the table holds MaxFlows flows already.
	ErrTableFull = errors.New("nat: connection table full")
	// ErrFlowExists means a flow with the same key is in the table.
	ErrFlowExists = errors.New("nat: flow already in table")
	// ErrTableClosed means the table has been closed.
	ErrTableClosed = errors.New("nat: connection table closed")
)

// Timeouts are the idle timeouts of flows by protocol and state, after which
// the table ends a flow with ReasonTimeout. A zero field takes the default
// given in brackets; the defaults are those of Linux conntrack.
type Timeouts struct {
	TCPNew         time.Duration // [2m] the egress dial is in progress
	TCPEstablished time.Duration // [120h] both sides are open
	TCPClosing     time.Duration // [2m] at least one side has sent FIN
	UDPUnreplied   time.Duration // [30s] no datagram has come back yet
	UDPAssured     time.Duration // [2m] datagrams have gone both ways
	ICMP           time.Duration // [30s] echo flows, either state
}

func (t *Timeouts) setDefaults() {
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&t.TCPNew, 2*time.Minute)
	def(&t.TCPEstablished, 120*time.Hour)
	def(&t.TCPClosing, 2*time.Minute)
	def(&t.UDPUnreplied, 30*time.Second)
	def(&t.UDPAssured, 2*time.Minute)
	def(&t.ICMP, 30*time.Second)
}

func (t *Timeouts) validate() error {
	for _, f := range []struct {
		name string
		d    time.Duration
	}{
		{"TCPNew", t.TCPNew},
		{"TCPEstablished", t.TCPEstablished},
		{"TCPClosing", t.TCPClosing},
		{"UDPUnreplied", t.UDPUnreplied},
		{"UDPAssured", t.UDPAssured},
		{"ICMP", t.ICMP},
	} {
		if f.d < 0 {
			return fmt.Errorf("nat: TableOptions.Timeouts.%s is negative (%v)", f.name, f.d)
		}
	}
	return nil
}

// TableOptions configure a Table. The zero value is a usable configuration.
type TableOptions struct {
	// MaxFlows is the most flows the table holds at once [65536]. Inserts
	// beyond it fail with ErrTableFull.
	MaxFlows int
	// Timeouts are the idle timeouts per protocol and state.
	Timeouts Timeouts
	// Shards is the number of independently locked parts of the table [64].
	// It is rounded up to a power of two.
	Shards int
	// ScanInterval is how often the janitor looks for idle flows [1s]. A
	// flow lives at most this much longer than its timeout.
	ScanInterval time.Duration
	// Logger receives the table's rare, flow-level messages. Nil means none.
	Logger *zap.Logger

	// clock replaces time.Now in tests. It must be monotonic.
	clock func() time.Time
}

// TableStats are cumulative counters of a table's activity.
type TableStats struct {
	Flows         int    // flows in the table now
	Inserted      uint64 // flows inserted
	Refused       uint64 // inserts refused because the table was full
	Ended         uint64 // flows ended, for any reason
	Expired       uint64 // flows ended by an idle timeout
	Evicted       uint64 // flows ended by Evict
	EventsDropped uint64 // events not delivered because a subscriber was slow
}

// Table is the connection table: one Flow per proxied TCP connection, UDP
// mapping destination or ICMP echo identifier. It replaces the kernel's
// conntrack: it counts traffic, expires idle flows, bounds how many flows
// exist, and reports new and ended flows to subscribers.
//
// The table is sharded by a hash of the flow key so that inserts and
// removals on different shards never contend. A flow's ID encodes its shard,
// so that Get and Evict find it without a second index.
type Table struct {
	maxFlows  int64
	timeouts  [3][5]int64 // nanoseconds, by protocol index and State
	scanEvery time.Duration
	log       *zap.Logger
	clock     func() time.Time
	epoch     time.Time // clock() at NewTable; flow times are offsets from it

	seed      maphash.Seed
	shards    []shard
	shardMask uint64
	shardBits uint

	count  atomic.Int64 // flows in the table, or reserved by an Insert under way
	nextID atomic.Uint64
	closed atomic.Bool
	full   atomic.Bool // whether the last insert was refused, to log transitions only

	inserted, refused, ended, expired, evicted, eventsDropped atomic.Uint64
	totals                                                    peerTotals // of ended flows

	subMu   sync.RWMutex
	subs    map[*subscriber]struct{}
	nsubs   atomic.Int32
	subsEnd bool // set by Close: no further subscriptions

	startOnce sync.Once
	closeOnce sync.Once
	cancel    context.CancelFunc // stops the janitor; set by Start
	janitor   sync.WaitGroup
	lifeMu    sync.Mutex // orders Start against Close
}

type shard struct {
	mu    sync.Mutex
	byKey map[Key]*Flow
	byID  map[uint64]*Flow
	_     [40]byte // keep neighbouring shards' locks off one cache line
}

type subscriber struct {
	ch      chan Event
	dropped atomic.Uint64
	once    sync.Once
}

// NewTable returns an empty table. Call Start to have idle flows expire.
func NewTable(opts TableOptions) (*Table, error) {
	if opts.MaxFlows < 0 {
		return nil, fmt.Errorf("nat: TableOptions.MaxFlows is negative (%d)", opts.MaxFlows)
	}
	if opts.MaxFlows == 0 {
		opts.MaxFlows = 65536
	}
	if opts.Shards < 0 {
		return nil, fmt.Errorf("nat: TableOptions.Shards is negative (%d)", opts.Shards)
	}
	if opts.Shards == 0 {
		opts.Shards = 64
	}
	if opts.Shards > 1<<16 {
		return nil, fmt.Errorf("nat: TableOptions.Shards is too large (%d, at most 65536)", opts.Shards)
	}
	if opts.ScanInterval < 0 {
		return nil, fmt.Errorf("nat: TableOptions.ScanInterval is negative (%v)", opts.ScanInterval)
	}
	if opts.ScanInterval == 0 {
		opts.ScanInterval = time.Second
	}
	opts.Timeouts.setDefaults()
	if err := opts.Timeouts.validate(); err != nil {
		return nil, err
	}
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	if opts.clock == nil {
		opts.clock = time.Now
	}

	shardBits := uint(bits.Len(uint(opts.Shards - 1)))
	t := &Table{
		maxFlows:  int64(opts.MaxFlows),
		scanEvery: opts.ScanInterval,
		log:       opts.Logger.Named("table"),
		clock:     opts.clock,
		epoch:     opts.clock(),
		seed:      maphash.MakeSeed(),
		shards:    make([]shard, 1<<shardBits),
		shardMask: 1<<shardBits - 1,
		shardBits: shardBits,
		subs:      make(map[*subscriber]struct{}),
	}
	for i := range t.shards {
		t.shards[i].byKey = make(map[Key]*Flow)
		t.shards[i].byID = make(map[uint64]*Flow)
	}
	to := opts.Timeouts
	t.timeouts = [3][5]int64{
		protoTCP: {
			StateNew:         int64(to.TCPNew),
			StateEstablished: int64(to.TCPEstablished),
			StateClosing:     int64(to.TCPClosing),
			// A TCP flow should not be in a datagram state; give it the
			// shortest TCP timeout rather than keep it forever.
			StateUnreplied: int64(to.TCPNew),
			StateAssured:   int64(to.TCPNew),
		},
		protoUDP: {
			StateNew:         int64(to.UDPUnreplied),
			StateEstablished: int64(to.UDPAssured),
			StateClosing:     int64(to.UDPUnreplied),
			StateUnreplied:   int64(to.UDPUnreplied),
			StateAssured:     int64(to.UDPAssured),
		},
		protoICMP: {
			int64(to.ICMP), int64(to.ICMP), int64(to.ICMP), int64(to.ICMP), int64(to.ICMP),
		},
	}
	return t, nil
}

// Protocol indexes of Table.timeouts.
const (
	protoTCP = iota
	protoUDP
	protoICMP
)

func protoIndex(p Proto) int {
	switch p {
	case TCP:
		return protoTCP
	case ICMP:
		return protoICMP
	}
	return protoUDP
}

// Start starts the janitor, which ends flows that have been idle for longer
// than their state's timeout. It runs until ctx is done or Close is called.
// Calls after the first, or after Close, do nothing.
func (t *Table) Start(ctx context.Context) {
	t.lifeMu.Lock()
	defer t.lifeMu.Unlock()
	if t.closed.Load() {
		return
	}
	t.startOnce.Do(func() {
		ctx, t.cancel = context.WithCancel(ctx)
		t.janitor.Add(1)
		go t.runJanitor(ctx)
	})
}

func (t *Table) runJanitor(ctx context.Context) {
	defer t.janitor.Done()
	tick := time.NewTicker(t.scanEvery)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			if n := t.expire(); n > 0 {
				t.log.Debug("expired idle flows", zap.Int("flows", n), zap.Int("remaining", t.Len()))
			}
		}
	}
}

// expire ends every flow that has been idle for longer than its timeout and
// returns how many it ended.
func (t *Table) expire() int {
	now := t.now()
	var idle []*Flow
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.Lock()
		for _, f := range s.byKey {
			if now-f.lastSeen.Load() > t.timeouts[protoIndex(f.key.Proto)][f.State()] {
				idle = append(idle, f)
			}
		}
		s.mu.Unlock()
	}
	n := 0
	for _, f := range idle {
		// Traffic may have arrived since the scan; a flow that is no longer
		// idle lives on.
		if t.now()-f.lastSeen.Load() <= t.timeouts[protoIndex(f.key.Proto)][f.State()] {
			continue
		}
		if f.finish(ReasonTimeout, true) {
			t.expired.Add(1)
			n++
		}
	}
	return n
}

// Close stops the janitor, ends every flow with ReasonShutdown (calling each
// flow's closer) and closes every subscriber's channel. Inserts fail with
// ErrTableClosed afterwards. Close is idempotent.
func (t *Table) Close() {
	t.closeOnce.Do(func() {
		t.lifeMu.Lock()
		t.closed.Store(true)
		cancel := t.cancel
		t.lifeMu.Unlock()
		if cancel != nil {
			cancel()
		}
		t.janitor.Wait()

		// Inserts check closed under the shard lock, so after this pass
		// no flow can enter the table.
		var all []*Flow
		for i := range t.shards {
			s := &t.shards[i]
			s.mu.Lock()
			for _, f := range s.byKey {
				all = append(all, f)
			}
			s.mu.Unlock()
		}
		for _, f := range all {
			f.finish(ReasonShutdown, true)
		}
		if len(all) > 0 {
			t.log.Debug("closed flows at shutdown", zap.Int("flows", len(all)))
		}

		t.subMu.Lock()
		t.subsEnd = true
		for s := range t.subs {
			delete(t.subs, s)
			s.once.Do(func() { close(s.ch) })
		}
		t.nsubs.Store(0)
		t.subMu.Unlock()
	})
}

// now is the table's coarse monotonic time: nanoseconds since NewTable.
func (t *Table) now() int64 {
	return int64(t.clock().Sub(t.epoch))
}

func (t *Table) shardOf(key Key) uint64 {
	var b [1 + 2*(16+2)]byte
	b[0] = byte(key.Proto)
	a := key.Client.Addr().As16()
	copy(b[1:17], a[:])
	binary.BigEndian.PutUint16(b[17:19], key.Client.Port())
	a = key.Dest.Addr().As16()
	copy(b[19:35], a[:])
	binary.BigEndian.PutUint16(b[35:37], key.Dest.Port())
	return maphash.Bytes(t.seed, b[:]) & t.shardMask
}

// Insert adds a flow for key, owned by peer, and emits EventNew. TCP flows
// start in StateNew, UDP and ICMP flows in StateUnreplied.
//
// closer is how the table ends the flow on its own initiative (idle timeout,
// Evict, Close): it is called once, outside the table's locks, with the
// reason, and should release whatever carries the flow (for TCP, close both
// sockets). It may be nil. The owner ends the flow itself with Flow.End,
// which does not call closer.
//
// Insert fails with ErrTableFull, ErrFlowExists or ErrTableClosed.
func (t *Table) Insert(key Key, peer string, closer func(Reason)) (*Flow, error) {
	if t.count.Add(1) > t.maxFlows {
		t.count.Add(-1)
		t.refused.Add(1)
		if !t.full.Swap(true) {
			t.log.Warn("connection table full, refusing new flows", zap.Int64("max_flows", t.maxFlows))
		}
		return nil, fmt.Errorf("%w (%d flows): %s", ErrTableFull, t.maxFlows, key)
	}
	if t.full.Load() {
		t.full.Store(false)
	}

	si := t.shardOf(key)
	now := t.now()
	f := &Flow{
		t:       t,
		id:      t.nextID.Add(1)<<t.shardBits | si,
		key:     key,
		peer:    peer,
		created: now,
		closer:  closer,
	}
	f.lastSeen.Store(now)
	if key.Proto == TCP {
		f.state.Store(uint32(StateNew))
	} else {
		f.state.Store(uint32(StateUnreplied))
	}

	s := &t.shards[si]
	s.mu.Lock()
	if t.closed.Load() {
		s.mu.Unlock()
		t.count.Add(-1)
		return nil, fmt.Errorf("%w: %s", ErrTableClosed, key)
	}
	if _, ok := s.byKey[key]; ok {
		s.mu.Unlock()
		t.count.Add(-1)
		return nil, fmt.Errorf("%w: %s", ErrFlowExists, key)
	}
	s.byKey[key] = f
	s.byID[f.id] = f
	s.mu.Unlock()

	t.inserted.Add(1)
	t.emit(EventNew, f, 0)
	return f, nil
}

// Lookup returns the flow with key, or nil.
func (t *Table) Lookup(key Key) *Flow {
	s := &t.shards[t.shardOf(key)]
	s.mu.Lock()
	f := s.byKey[key]
	s.mu.Unlock()
	return f
}

// Get returns the flow with the given ID, or nil.
func (t *Table) Get(id uint64) *Flow {
	s := &t.shards[id&t.shardMask]
	s.mu.Lock()
	f := s.byID[id]
	s.mu.Unlock()
	return f
}

// Evict ends the flow with the given ID on an operator's request: its
// closer is called with ReasonEvicted. It reports whether this call ended
// the flow (false if there was no such flow or it was ending already).
func (t *Table) Evict(id uint64) bool {
	f := t.Get(id)
	if f == nil || !f.finish(ReasonEvicted, true) {
		return false
	}
	t.evicted.Add(1)
	t.log.Debug("evicted flow", zap.Uint64("id", id), zap.Stringer("key", f.key), zap.String("peer", f.peer))
	return true
}

// Len returns the number of flows in the table.
func (t *Table) Len() int {
	n := 0
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.Lock()
		n += len(s.byKey)
		s.mu.Unlock()
	}
	return n
}

// Snapshot returns a copy of every flow, sorted by ID (which is creation
// order). Each shard is copied at a different instant; the result is not
// an atomic picture of the whole table.
func (t *Table) Snapshot() []Entry {
	var flows []*Flow
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.Lock()
		for _, f := range s.byKey {
			flows = append(flows, f)
		}
		s.mu.Unlock()
	}
	entries := make([]Entry, len(flows))
	for i, f := range flows {
		entries[i] = f.Entry()
	}
	slices.SortFunc(entries, func(a, b Entry) int {
		switch {
		case a.ID < b.ID:
			return -1
		case a.ID > b.ID:
			return 1
		}
		return 0
	})
	return entries
}

// Subscribe returns a channel of events for flows inserted and ended from
// now on, buffered to hold buffer events, and a function that cancels the
// subscription and closes the channel. A subscriber that falls behind loses
// events (counted in TableStats.EventsDropped) rather than slow the table.
// Close closes every subscriber's channel; on a closed table the channel is
// returned closed.
func (t *Table) Subscribe(buffer int) (<-chan Event, func()) {
	if buffer < 0 {
		buffer = 0
	}
	s := &subscriber{ch: make(chan Event, buffer)}
	t.subMu.Lock()
	if t.subsEnd {
		t.subMu.Unlock()
		close(s.ch)
		return s.ch, func() {}
	}
	t.subs[s] = struct{}{}
	t.nsubs.Add(1)
	t.subMu.Unlock()
	cancel := func() {
		t.subMu.Lock()
		if _, ok := t.subs[s]; ok {
			delete(t.subs, s)
			t.nsubs.Add(-1)
		}
		t.subMu.Unlock()
		// Senders hold subMu for reading while they send, so once s is out
		// of the set under the write lock nobody can send on it.
		s.once.Do(func() { close(s.ch) })
	}
	return s.ch, cancel
}

func (t *Table) emit(typ EventType, f *Flow, reason Reason) {
	if t.nsubs.Load() == 0 {
		return
	}
	ev := Event{Type: typ, Entry: f.Entry(), Reason: reason}
	t.subMu.RLock()
	for s := range t.subs {
		select {
		case s.ch <- ev:
		default:
			s.dropped.Add(1)
			t.eventsDropped.Add(1)
		}
	}
	t.subMu.RUnlock()
}

// Stats returns the table's counters.
func (t *Table) Stats() TableStats {
	return TableStats{
		Flows:         t.Len(),
		Inserted:      t.inserted.Load(),
		Refused:       t.refused.Load(),
		Ended:         t.ended.Load(),
		Expired:       t.expired.Load(),
		Evicted:       t.evicted.Load(),
		EventsDropped: t.eventsDropped.Load(),
	}
}

// Flow is a handle on one entry of a Table. All its methods are safe for
// concurrent use; the counting methods take no locks and do not allocate,
// so they can be called per packet batch.
type Flow struct {
	// Counters first: they are what the data path writes.
	origBytes, origPackets   atomic.Uint64
	replyBytes, replyPackets atomic.Uint64
	lastSeen                 atomic.Int64 // Table.now() of the last count
	state                    atomic.Uint32
	ended                    atomic.Bool

	t       *Table
	id      uint64
	key     Key
	peer    string
	created int64 // Table.now() at insert
	closer  func(Reason)
	egress  atomic.Pointer[netip.AddrPort]
}

// ID returns the flow's identifier, unique within its table and increasing
// with creation time.
func (f *Flow) ID() uint64 { return f.id }

// Key returns the flow's key.
func (f *Flow) Key() Key { return f.key }

// Peer returns the tunnel peer the flow belongs to.
func (f *Flow) Peer() string { return f.peer }

// SetEgress records the local address and port of the flow's egress socket.
func (f *Flow) SetEgress(a netip.AddrPort) { f.egress.Store(&a) }

// SetState moves the flow to state s, which selects its idle timeout.
func (f *Flow) SetState(s State) { f.state.Store(uint32(s)) }

// State returns the flow's state.
func (f *Flow) State() State { return State(f.state.Load()) }

// Ended reports whether the flow has ended.
func (f *Flow) Ended() bool { return f.ended.Load() }

// CountOrig counts traffic from the client to the destination and marks
// the flow as seen now.
func (f *Flow) CountOrig(bytes, packets int) {
	f.origBytes.Add(uint64(bytes))
	f.origPackets.Add(uint64(packets))
	f.touch()
}

// CountReply counts traffic from the destination to the client and marks
// the flow as seen now. The first reply of a UDP or ICMP flow moves it from
// StateUnreplied to StateAssured.
func (f *Flow) CountReply(bytes, packets int) {
	f.replyBytes.Add(uint64(bytes))
	f.replyPackets.Add(uint64(packets))
	if f.key.Proto != TCP && f.state.Load() == uint32(StateUnreplied) {
		f.state.CompareAndSwap(uint32(StateUnreplied), uint32(StateAssured))
	}
	f.touch()
}

// touchGrain is how stale lastSeen may get before a count rewrites it. It
// spares many goroutines counting on one flow from writing one cache line
// on every call; timeouts are seconds, so a millisecond is plenty.
const touchGrain = int64(time.Millisecond)

func (f *Flow) touch() {
	now := f.t.now()
	if now-f.lastSeen.Load() >= touchGrain {
		f.lastSeen.Store(now)
	}
}

// End ends the flow on its owner's initiative: the flow leaves the table
// and EventEnded is emitted with reason. The closer given to Insert is not
// called. If the flow has ended already (for instance because the table's
// closer, which the owner reacts to, ended it) End does nothing.
func (f *Flow) End(reason Reason) {
	f.finish(reason, false)
}

// finish ends the flow once: whichever of the owner and the table gets here
// first does the work, and reports true.
func (f *Flow) finish(reason Reason, callCloser bool) bool {
	if !f.ended.CompareAndSwap(false, true) {
		return false
	}
	t := f.t
	s := &t.shards[f.id&t.shardMask]
	s.mu.Lock()
	delete(s.byKey, f.key)
	delete(s.byID, f.id)
	s.mu.Unlock()
	t.count.Add(-1)
	t.ended.Add(1)
	// Closing the flow's sockets first lets the final counts include what
	// was in flight, and keeps the event from announcing a flow whose
	// sockets are still open.
	if callCloser && f.closer != nil {
		f.closer(reason)
	}
	t.totals.add(f)
	t.emit(EventEnded, f, reason)
	return true
}

// Entry returns a copy of the flow's current state.
func (f *Flow) Entry() Entry {
	e := Entry{
		ID:           f.id,
		Key:          f.key,
		Peer:         f.peer,
		State:        f.State(),
		OrigBytes:    f.origBytes.Load(),
		OrigPackets:  f.origPackets.Load(),
		ReplyBytes:   f.replyBytes.Load(),
		ReplyPackets: f.replyPackets.Load(),
		Created:      f.t.epoch.Add(time.Duration(f.created)),
		LastSeen:     f.t.epoch.Add(time.Duration(f.lastSeen.Load())),
	}
	if a := f.egress.Load(); a != nil {
		e.Egress = *a
	}
	return e
}
