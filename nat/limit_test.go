package nat

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// limitClock is a monotonic clock that moves only when told to. (The
// limiter's tests keep their own so that they do not depend on the table's.)
type limitClock struct {
	base time.Time
	off  atomic.Int64
}

func (c *limitClock) now() time.Time          { return c.base.Add(time.Duration(c.off.Load())) }
func (c *limitClock) advance(d time.Duration) { c.off.Add(int64(d)) }

func newTestLimiter(t testing.TB, opts LimiterOptions) (*Limiter, *limitClock) {
	t.Helper()
	c := &limitClock{base: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)}
	opts.clock = c.now
	l, err := NewLimiter(opts)
	if err != nil {
		t.Fatalf("NewLimiter: %v", err)
	}
	return l, c
}

// admitN admits n flows for peer, failing the test on any refusal, and
// returns their releases.
func admitN(t testing.TB, l *Limiter, peer string, n int) []func() {
	t.Helper()
	rels := make([]func(), 0, n)
	for i := range n {
		rel, err := l.Admit(peer)
		if err != nil {
			t.Fatalf("peer %q: Admit #%d: %v", peer, i+1, err)
		}
		rels = append(rels, rel)
	}
	return rels
}

// refused checks that the next Admit for peer fails with want.
func refused(t testing.TB, l *Limiter, peer string, want error) {
	t.Helper()
	rel, err := l.Admit(peer)
	if err == nil {
		rel()
		t.Fatalf("peer %q: Admit succeeded, want %v", peer, want)
	}
	if !errors.Is(err, want) {
		t.Fatalf("peer %q: Admit = %v, want %v", peer, err, want)
	}
	if !strings.Contains(err.Error(), fmt.Sprintf("peer %q", peer)) {
		t.Errorf("error %q does not name peer %q", err, peer)
	}
}

func peerStats(t testing.TB, l *Limiter, peer string) PeerLimitStats {
	t.Helper()
	for _, s := range l.Stats() {
		if s.Peer == peer {
			return s
		}
	}
	t.Fatalf("peer %q not in Stats %+v", peer, l.Stats())
	return PeerLimitStats{}
}

func TestLimiterRateBurstAndRefill(t *testing.T) {
	l, clock := newTestLimiter(t, LimiterOptions{Default: Limits{NewFlowsPerSecond: 10, Burst: 5, MaxFlows: -1}})
	// A fresh peer has a full bucket: the burst goes through at once.
	admitN(t, l, "laptop", 5)
	refused(t, l, "laptop", ErrRateLimited)
	// One token takes 100 ms to come back.
	clock.advance(99 * time.Millisecond)
	refused(t, l, "laptop", ErrRateLimited)
	clock.advance(time.Millisecond)
	admitN(t, l, "laptop", 1)
	refused(t, l, "laptop", ErrRateLimited)
	// Tokens accrue fractionally, and refusals in between neither spend
	// nor reset the partial token.
	for range 3 {
		clock.advance(25 * time.Millisecond)
		refused(t, l, "laptop", ErrRateLimited)
	}
	clock.advance(25 * time.Millisecond)
	admitN(t, l, "laptop", 1)
	// A long quiet spell fills the bucket to the burst and no further.
	clock.advance(time.Hour)
	admitN(t, l, "laptop", 5)
	refused(t, l, "laptop", ErrRateLimited)
	// Sustained, the rate is what is admitted: 10 per second over 3 s.
	admitted := 0
	for range 300 {
		clock.advance(10 * time.Millisecond)
		if _, err := l.Admit("laptop"); err == nil {
			admitted++
		}
	}
	if admitted != 30 {
		t.Errorf("admitted %d flows in 3 s at 10/s, want 30", admitted)
	}

	s := peerStats(t, l, "laptop")
	if want := uint64(5 + 1 + 1 + 5 + 30); s.Admitted != want || s.Flows != int(want) {
		t.Errorf("Admitted %d, Flows %d, want %d", s.Admitted, s.Flows, want)
	}
	if want := uint64(3 + 3 + 1 + 270); s.RateLimited != want || s.FlowLimited != 0 {
		t.Errorf("RateLimited %d, FlowLimited %d, want %d and 0", s.RateLimited, s.FlowLimited, want)
	}
}

// TestLimiterRealClock runs a bucket on the real clock over short
// intervals.
func TestLimiterRealClock(t *testing.T) {
	l, err := NewLimiter(LimiterOptions{Default: Limits{NewFlowsPerSecond: 50, Burst: 2}})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	admitN(t, l, "", 2)
	if _, err := l.Admit(""); !errors.Is(err, ErrRateLimited) {
		if time.Since(start) < 15*time.Millisecond {
			t.Fatalf("third Admit within %v at 50/s, burst 2: %v, want ErrRateLimited", time.Since(start), err)
		}
		t.Skipf("machine too slow: %v between admissions", time.Since(start))
	}
	time.Sleep(25 * time.Millisecond) // a token comes back every 20 ms
	admitN(t, l, "", 1)
}

func TestLimiterMaxFlows(t *testing.T) {
	l, _ := newTestLimiter(t, LimiterOptions{Default: Limits{NewFlowsPerSecond: -1, MaxFlows: 3}})
	rels := admitN(t, l, "laptop", 3)
	refused(t, l, "laptop", ErrPeerFlowLimit)
	refused(t, l, "laptop", ErrPeerFlowLimit)
	rels[1]()
	if s := peerStats(t, l, "laptop"); s.Flows != 2 {
		t.Errorf("Flows after one release = %d, want 2", s.Flows)
	}
	rels = append(rels, admitN(t, l, "laptop", 1)...)
	refused(t, l, "laptop", ErrPeerFlowLimit)

	// Releasing twice frees one slot, not two.
	rels[0]()
	rels[0]()
	rels[1]()
	admitN(t, l, "laptop", 1)
	refused(t, l, "laptop", ErrPeerFlowLimit)

	s := peerStats(t, l, "laptop")
	if s.Flows != 3 || s.Admitted != 5 || s.FlowLimited != 4 || s.RateLimited != 0 {
		t.Errorf("stats %+v, want 3 flows, 5 admitted, 4 flow-limited", s)
	}
	// A flow refused by the flow limit costs no token.
	l2, _ := newTestLimiter(t, LimiterOptions{Default: Limits{NewFlowsPerSecond: 1, Burst: 2, MaxFlows: 1}})
	rel := admitN(t, l2, "p", 1)[0]
	for range 10 {
		refused(t, l2, "p", ErrPeerFlowLimit)
	}
	rel()
	admitN(t, l2, "p", 1)
}

func TestLimiterDefaults(t *testing.T) {
	l, _ := newTestLimiter(t, LimiterOptions{})
	admitN(t, l, "", 200)
	refused(t, l, "", ErrRateLimited)
	s := peerStats(t, l, "")
	if want := (Limits{NewFlowsPerSecond: 100, Burst: 200, MaxFlows: 4096, MaxHandshakes: 128}); s.Limits != want {
		t.Errorf("default limits %+v, want %+v", s.Limits, want)
	}

	l, _ = newTestLimiter(t, LimiterOptions{Default: Limits{NewFlowsPerSecond: -1}})
	admitN(t, l, "a", 4096)
	refused(t, l, "a", ErrPeerFlowLimit)

	// The default burst is twice the rate, rounded up, and at least 1.
	for _, tc := range []struct {
		rate  float64
		burst int
	}{{0.1, 1}, {0.5, 1}, {0.7, 2}, {2.5, 5}, {1000, 2000}, {1e12, math.MaxInt32}, {-1, 0}} {
		l, _ := newTestLimiter(t, LimiterOptions{Default: Limits{NewFlowsPerSecond: tc.rate}})
		admitN(t, l, "x", 1)
		if got := peerStats(t, l, "x").Limits.Burst; got != tc.burst {
			t.Errorf("rate %v: burst %d, want %d", tc.rate, got, tc.burst)
		}
	}
}

func TestLimiterPerPeerLimits(t *testing.T) {
	l, _ := newTestLimiter(t, LimiterOptions{
		Default: Limits{NewFlowsPerSecond: 10, MaxFlows: 5},
		Peers: map[string]Limits{
			"laptop": {MaxFlows: 2},                         // rate and burst from Default
			"server": {NewFlowsPerSecond: 1},                // burst from its own rate
			"bulk":   {NewFlowsPerSecond: -1, MaxFlows: -1}, // no limits at all
			"":       {Burst: 3},                            // the unnamed peer is a peer
		},
	})
	for _, tc := range []struct {
		peer string
		want Limits
	}{
		{"laptop", Limits{NewFlowsPerSecond: 10, Burst: 20, MaxFlows: 2, MaxHandshakes: 128}},
		{"server", Limits{NewFlowsPerSecond: 1, Burst: 2, MaxFlows: 5, MaxHandshakes: 128}},
		{"bulk", Limits{NewFlowsPerSecond: -1, Burst: 0, MaxFlows: -1, MaxHandshakes: 128}},
		{"", Limits{NewFlowsPerSecond: 10, Burst: 3, MaxFlows: 5, MaxHandshakes: 128}},
		{"phone", Limits{NewFlowsPerSecond: 10, Burst: 20, MaxFlows: 5, MaxHandshakes: 128}},
	} {
		admitN(t, l, tc.peer, 1)
		if got := peerStats(t, l, tc.peer).Limits; got != tc.want {
			t.Errorf("peer %q: limits %+v, want %+v", tc.peer, got, tc.want)
		}
	}
	admitN(t, l, "laptop", 1)
	refused(t, l, "laptop", ErrPeerFlowLimit)
	admitN(t, l, "server", 1)
	refused(t, l, "server", ErrRateLimited)
	admitN(t, l, "", 2)
	refused(t, l, "", ErrRateLimited)
	admitN(t, l, "phone", 4)
	refused(t, l, "phone", ErrPeerFlowLimit)
	admitN(t, l, "bulk", 10000)

	// A Burst set in Default is what a peer with its own rate inherits.
	l, _ = newTestLimiter(t, LimiterOptions{
		Default: Limits{Burst: 7},
		Peers:   map[string]Limits{"p": {NewFlowsPerSecond: 1}},
	})
	admitN(t, l, "p", 7)
	refused(t, l, "p", ErrRateLimited)

	// Stats lists configured peers that have not opened a flow yet.
	l, _ = newTestLimiter(t, LimiterOptions{Peers: map[string]Limits{"quiet": {MaxFlows: 9}}})
	if s := peerStats(t, l, "quiet"); s.Limits.MaxFlows != 9 || s.Admitted != 0 || s.Flows != 0 {
		t.Errorf("quiet peer: %+v", s)
	}
}

// TestLimiterFloodIsolated is the case: one peer opens flows as
// fast as it can, and is held to its limits while the others go on as
// before.
func TestLimiterFloodIsolated(t *testing.T) {
	l, clock := newTestLimiter(t, LimiterOptions{Default: Limits{NewFlowsPerSecond: 100, MaxFlows: 50}})
	var flood []func()
	others := make(map[string][]func())
	refusedFlood := 0
	for step := range 1000 { // 1 s of 1 ms steps
		for range 20 { // 20,000 attempts per second
			if rel, err := l.Admit("flooder"); err == nil {
				flood = append(flood, rel)
			} else {
				refusedFlood++
			}
		}
		clock.advance(time.Millisecond)
		// The flooder's flows end after a while, like half-open flows
		// timing out.
		if len(flood) > 40 {
			flood[0]()
			flood = flood[1:]
		}
		// Every 10 ms each other peer opens a flow, and closes it 200 ms
		// later.
		if step%10 == 0 {
			for _, p := range []string{"a", "b", "c"} {
				rel, err := l.Admit(p)
				if err != nil {
					t.Fatalf("step %d: peer %s refused during the flood: %v", step, p, err)
				}
				others[p] = append(others[p], rel)
				if len(others[p]) > 20 {
					others[p][0]()
					others[p] = others[p][1:]
				}
			}
		}
	}
	s := peerStats(t, l, "flooder")
	// At 100/s with a burst of 200, attempts from 0 to 999 ms get the
	// burst and the 99 tokens that came back in that time.
	if s.Admitted != 299 {
		t.Errorf("flooder admitted %d flows in 1 s at 100/s, burst 200; want 299", s.Admitted)
	}
	if s.FlowLimited == 0 || s.RateLimited == 0 {
		t.Errorf("flooder did not reach both limits: %+v", s)
	}
	if s.Admitted+s.RateLimited+s.FlowLimited != 20000 || int(s.RateLimited+s.FlowLimited) != refusedFlood {
		t.Errorf("flooder stats %+v do not add up to 20000 attempts, %d refused", s, refusedFlood)
	}
	if s.Flows != len(flood) {
		t.Errorf("flooder Flows %d, holding %d", s.Flows, len(flood))
	}
	for _, p := range []string{"a", "b", "c"} {
		if s := peerStats(t, l, p); s.Admitted != 100 || s.RateLimited != 0 || s.FlowLimited != 0 {
			t.Errorf("peer %s: %+v", p, s)
		}
	}
}

func TestLimiterUpdate(t *testing.T) {
	l, clock := newTestLimiter(t, LimiterOptions{Default: Limits{NewFlowsPerSecond: 10, Burst: 10, MaxFlows: 5}})
	rels := admitN(t, l, "laptop", 5)
	refused(t, l, "laptop", ErrPeerFlowLimit)

	// Lowering MaxFlows below the live count refuses new flows and leaves
	// the live ones alone.
	if err := l.Update(LimiterOptions{Default: Limits{NewFlowsPerSecond: 10, Burst: 10, MaxFlows: 2}}); err != nil {
		t.Fatal(err)
	}
	if s := peerStats(t, l, "laptop"); s.Flows != 5 || s.Limits.MaxFlows != 2 {
		t.Fatalf("after lowering MaxFlows: %+v", s)
	}
	refused(t, l, "laptop", ErrPeerFlowLimit)
	for _, rel := range rels[:3] {
		rel()
	}
	refused(t, l, "laptop", ErrPeerFlowLimit) // 2 live, limit 2
	rels[3]()
	rels = append(rels[4:], admitN(t, l, "laptop", 1)...)
	refused(t, l, "laptop", ErrPeerFlowLimit)

	// A per-peer entry added by a reload applies at once; live flows are
	// still counted.
	if err := l.Update(LimiterOptions{
		Default: Limits{NewFlowsPerSecond: 10, Burst: 10, MaxFlows: 2},
		Peers:   map[string]Limits{"laptop": {MaxFlows: 4, Burst: 3}},
	}); err != nil {
		t.Fatal(err)
	}
	// The bucket kept its tokens (10 - 6 = 4), now clamped to the new
	// burst of 3; 2 live flows leave room for 2 more.
	rels = append(rels, admitN(t, l, "laptop", 2)...)
	refused(t, l, "laptop", ErrPeerFlowLimit)
	rels[0]()
	rels[1]()
	rels = append(rels[2:], admitN(t, l, "laptop", 1)...) // the last token
	refused(t, l, "laptop", ErrRateLimited)

	// Raising the rate takes effect on the next refill.
	if err := l.Update(LimiterOptions{Peers: map[string]Limits{"laptop": {NewFlowsPerSecond: 1000, MaxFlows: -1}}}); err != nil {
		t.Fatal(err)
	}
	clock.advance(10 * time.Millisecond) // 10 tokens at 1000/s
	rels = append(rels, admitN(t, l, "laptop", 10)...)
	refused(t, l, "laptop", ErrRateLimited)

	// A bad update changes nothing.
	if err := l.Update(LimiterOptions{Peers: map[string]Limits{"laptop": {Burst: -1}}}); err == nil {
		t.Fatal("Update with a negative burst succeeded")
	}
	if s := peerStats(t, l, "laptop"); s.Limits.NewFlowsPerSecond != 1000 || s.Flows != len(rels) {
		t.Errorf("after a failed Update: %+v, holding %d", s, len(rels))
	}
	for _, rel := range rels {
		rel()
	}
	if s := peerStats(t, l, "laptop"); s.Flows != 0 {
		t.Errorf("Flows %d after releasing every flow", s.Flows)
	}
}

func TestLimiterValidation(t *testing.T) {
	for _, tc := range []struct {
		opts LimiterOptions
		want string
	}{
		{LimiterOptions{Peers: map[string]Limits{"laptop": {Burst: -1}}}, "LimiterOptions.Peers[laptop].Burst: -1 is negative"},
		{LimiterOptions{Default: Limits{Burst: -5}}, "LimiterOptions.Default.Burst: -5 is negative"},
		{LimiterOptions{Default: Limits{NewFlowsPerSecond: math.NaN()}}, "Default.NewFlowsPerSecond: NaN"},
		{LimiterOptions{Peers: map[string]Limits{"x": {NewFlowsPerSecond: math.Inf(1)}}}, "Peers[x].NewFlowsPerSecond: +Inf is not finite"},
		{LimiterOptions{Peers: map[string]Limits{"x": {NewFlowsPerSecond: math.Inf(-1)}}}, "Peers[x].NewFlowsPerSecond: -Inf"},
	} {
		if _, err := NewLimiter(tc.opts); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("NewLimiter(%+v) = %v, want an error with %q", tc.opts, err, tc.want)
		}
		l, _ := newTestLimiter(t, LimiterOptions{})
		if err := l.Update(tc.opts); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Update(%+v) = %v, want an error with %q", tc.opts, err, tc.want)
		}
	}
}

// TestLimiterConcurrent admits and releases from many goroutines at once
// and checks that no peer ever holds more than its MaxFlows, that every
// attempt is counted once, and that the counts end exact.
func TestLimiterConcurrent(t *testing.T) {
	const (
		workers  = 16
		attempts = 2000
		maxFlows = 20
	)
	peers := []string{"", "a", "b", "c"}
	l, err := NewLimiter(LimiterOptions{Default: Limits{NewFlowsPerSecond: -1, MaxFlows: maxFlows}})
	if err != nil {
		t.Fatal(err)
	}
	var live [4]atomic.Int64    // flows held per peer, as the workers see it
	var highest [4]atomic.Int64 // the most seen at once
	var admitted, refusedN [4]atomic.Uint64
	kept := make([][]func(), workers) // flows left open at the end
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			type held struct {
				peer int
				rel  func()
			}
			var mine []held
			for range attempts {
				if len(mine) > 0 && rng.IntN(2) == 0 {
					i := rng.IntN(len(mine))
					h := mine[i]
					mine[i] = mine[len(mine)-1]
					mine = mine[:len(mine)-1]
					live[h.peer].Add(-1)
					h.rel()
					if rng.IntN(4) == 0 {
						h.rel() // a second release must change nothing
					}
					continue
				}
				p := rng.IntN(len(peers))
				rel, err := l.Admit(peers[p])
				if err != nil {
					if !errors.Is(err, ErrPeerFlowLimit) {
						t.Errorf("Admit: %v", err)
						return
					}
					refusedN[p].Add(1)
					continue
				}
				admitted[p].Add(1)
				n := live[p].Add(1)
				for {
					h := highest[p].Load()
					if n <= h || highest[p].CompareAndSwap(h, n) {
						break
					}
				}
				mine = append(mine, held{p, rel})
			}
			for _, h := range mine {
				kept[w] = append(kept[w], h.rel)
			}
		})
	}
	wg.Wait()
	for i, name := range peers {
		s := peerStats(t, l, name)
		// live counts after Admit and before release, so it can only
		// overstate what the limiter holds.
		if h := highest[i].Load(); h > maxFlows {
			t.Errorf("peer %q held %d flows at once, limit %d", name, h, maxFlows)
		}
		if s.Flows != int(live[i].Load()) || s.Admitted != admitted[i].Load() || s.FlowLimited != refusedN[i].Load() {
			t.Errorf("peer %q: stats %+v, want %d live, %d admitted, %d refused",
				name, s, live[i].Load(), admitted[i].Load(), refusedN[i].Load())
		}
		if s.FlowLimited == 0 {
			t.Errorf("peer %q never reached its limit; the test proves little", name)
		}
	}
	var wg2 sync.WaitGroup
	for _, rels := range kept {
		wg2.Go(func() {
			for _, rel := range rels {
				rel()
			}
		})
	}
	wg2.Wait()
	for _, s := range l.Stats() {
		if s.Flows != 0 {
			t.Errorf("peer %q: %d flows after releasing all", s.Peer, s.Flows)
		}
	}
}

// TestLimiterConcurrentRate has many goroutines race for one bucket on a
// stopped clock: exactly the burst gets through.
func TestLimiterConcurrentRate(t *testing.T) {
	l, clock := newTestLimiter(t, LimiterOptions{Default: Limits{NewFlowsPerSecond: 1, Burst: 500, MaxFlows: -1}})
	var got atomic.Int64
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 200 {
				if _, err := l.Admit("p"); err == nil {
					got.Add(1)
				}
			}
		})
	}
	wg.Wait()
	if got.Load() != 500 {
		t.Errorf("%d admitted from a bucket of 500 on a stopped clock", got.Load())
	}
	clock.advance(3 * time.Second)
	admitN(t, l, "p", 3)
	refused(t, l, "p", ErrRateLimited)
}

func TestLimiterForgetsIdlePeers(t *testing.T) {
	l, clock := newTestLimiter(t, LimiterOptions{
		Default: Limits{NewFlowsPerSecond: 10, Burst: 2, MaxFlows: 2},
		Peers:   map[string]Limits{"slow": {NewFlowsPerSecond: 0.001, Burst: 1}},
	})
	for i := range 300 {
		rel := admitN(t, l, fmt.Sprint("gone-", i), 1)[0]
		rel()
	}
	holding := admitN(t, l, "holding", 1)
	admitN(t, l, "slow", 1)[0]() // released, but its bucket stays empty for ages
	clock.advance(2 * time.Minute)
	admitN(t, l, "trigger", 1)
	var names []string
	for _, s := range l.Stats() {
		names = append(names, s.Peer)
	}
	if got, want := strings.Join(names, " "), "holding slow trigger"; got != want {
		t.Errorf("peers remembered after 2 min: %s, want %s", got, want)
	}
	// A peer that comes back starts afresh, with its limits intact.
	admitN(t, l, "gone-7", 2)
	refused(t, l, "gone-7", ErrPeerFlowLimit)
	if s := peerStats(t, l, "holding"); s.Flows != 1 || s.Admitted != 1 {
		t.Errorf("peer with a live flow: %+v", s)
	}
	holding[0]()
	if s := peerStats(t, l, "holding"); s.Flows != 0 {
		t.Errorf("after release: %+v", s)
	}
}

// TestLimiterForgetWhileAdmitting forgets a peer between Admit finding its
// state and locking it, and admits a flow for the same peer in that window:
// the first Admit must see the successor state and its flow.
func TestLimiterForgetWhileAdmitting(t *testing.T) {
	l, clock := newTestLimiter(t, LimiterOptions{Default: Limits{NewFlowsPerSecond: -1, MaxFlows: 1}})
	admitN(t, l, "p", 1)[0]()
	clock.advance(2 * forgetAfter)
	var other func()
	once := true
	l.testAfterLoad = func() {
		if !once {
			return
		}
		once = false
		l.sweep(l.now())
		if _, ok := l.peers.Load("p"); ok {
			t.Error("sweep kept an idle peer")
		}
		other = admitN(t, l, "p", 1)[0]
	}
	refused(t, l, "p", ErrPeerFlowLimit)
	if other == nil {
		t.Fatal("hook did not run")
	}
	other()
	admitN(t, l, "p", 1)
	if s := peerStats(t, l, "p"); s.Flows != 1 || s.Admitted != 2 || s.FlowLimited != 1 {
		t.Errorf("stats %+v", s)
	}
}

// TestLimiterForgetRace sweeps while flows are admitted and released, on a
// clock that jumps forward, and checks that no flow is lost from the counts.
func TestLimiterForgetRace(t *testing.T) {
	l, clock := newTestLimiter(t, LimiterOptions{Default: Limits{NewFlowsPerSecond: -1, MaxFlows: 3}})
	stop := make(chan struct{})
	var ticker sync.WaitGroup
	ticker.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
				clock.advance(forgetAfter)
				time.Sleep(10 * time.Microsecond)
			}
		}
	})
	var wg sync.WaitGroup
	var over atomic.Int64
	var live [4]atomic.Int64
	for w := range 8 {
		wg.Go(func() {
			for i := range 3000 {
				p := (w + i) % 4
				rel, err := l.Admit(fmt.Sprint(p))
				if err != nil {
					continue
				}
				if live[p].Add(1) > 3 {
					over.Add(1)
				}
				live[p].Add(-1)
				rel()
			}
		})
	}
	wg.Wait()
	close(stop)
	ticker.Wait()
	if over.Load() != 0 {
		t.Errorf("a peer held more than MaxFlows %d times: a forgotten state let flows through", over.Load())
	}
	for _, s := range l.Stats() {
		if s.Flows != 0 {
			t.Errorf("peer %q: %d flows left", s.Peer, s.Flows)
		}
	}
}

func TestLimiterLogsRarely(t *testing.T) {
	core, logs := observer.New(zapcore.WarnLevel)
	l, clock := newTestLimiter(t, LimiterOptions{
		Default: Limits{NewFlowsPerSecond: 1, Burst: 1, MaxFlows: 1},
		Logger:  zap.New(core),
	})
	admitN(t, l, "a", 1)
	for range 1000 {
		l.Admit("a")
		l.Admit("b")
	}
	if n := logs.FilterField(zap.String("peer", "a")).Len(); n != 1 {
		t.Errorf("%d lines about peer a for 999 refusals within 10 s, want 1", n)
	}
	if n := logs.FilterField(zap.String("peer", "b")).Len(); n != 1 {
		t.Errorf("%d lines about peer b, want 1", n)
	}
	clock.advance(9 * time.Second)
	l.Admit("a")
	if n := logs.FilterField(zap.String("peer", "a")).Len(); n != 1 {
		t.Errorf("%d lines about peer a after 9 s, want 1", n)
	}
	clock.advance(time.Second)
	l.Admit("a")
	lines := logs.FilterField(zap.String("peer", "a")).AllUntimed()
	if len(lines) != 2 {
		t.Fatalf("%d lines about peer a after 10 s, want 2", len(lines))
	}
	if !strings.Contains(lines[0].Message, "concurrent flow limit") {
		t.Errorf("first line %q does not name the limit", lines[0].Message)
	}
	if got := lines[1].ContextMap()["suppressed"]; got != uint64(1000) {
		t.Errorf("second line says %v suppressed, want 1000 (999 + the one at 9 s)", got)
	}
}

func TestLimiterAllocations(t *testing.T) {
	l, _ := newTestLimiter(t, LimiterOptions{Default: Limits{NewFlowsPerSecond: 1, Burst: 1, MaxFlows: 1000}})
	admitN(t, l, "p", 1)
	if n := testing.AllocsPerRun(1000, func() {
		if _, err := l.Admit("p"); err == nil {
			t.Fatal("admitted")
		}
	}); n != 0 {
		t.Errorf("a refusal allocates %v times", n)
	}
	l, _ = newTestLimiter(t, LimiterOptions{Default: Limits{NewFlowsPerSecond: -1}})
	admitN(t, l, "p", 1)
	if n := testing.AllocsPerRun(1000, func() {
		rel, err := l.Admit("p")
		if err != nil {
			t.Fatal(err)
		}
		rel()
	}); n > 2 {
		t.Errorf("Admit and release allocate %v times, want at most 2 (the release)", n)
	}
}

func BenchmarkLimiterAdmitRelease(b *testing.B) {
	for _, bc := range []struct {
		name  string
		peers int
	}{{"OnePeer", 1}, {"ManyPeers", 256}} {
		b.Run(bc.name, func(b *testing.B) {
			l, err := NewLimiter(LimiterOptions{Default: Limits{NewFlowsPerSecond: 1e9, MaxFlows: -1}})
			if err != nil {
				b.Fatal(err)
			}
			names := make([]string, bc.peers)
			for i := range names {
				names[i] = fmt.Sprint("peer-", i)
			}
			var seq atomic.Uint64
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				name := names[seq.Add(1)%uint64(len(names))]
				for pb.Next() {
					rel, err := l.Admit(name)
					if err != nil {
						b.Error(err)
						return
					}
					rel()
				}
			})
		})
	}
}

// TestLimiterHandshakes: each peer has its own count of handshakes in
// flight, apart from its flows and its rate; a refusal is logged naming
// the peer, at most once per interval; a release frees the slot, once.
func TestLimiterHandshakes(t *testing.T) {
	core, logs := observer.New(zapcore.WarnLevel)
	l, clock := newTestLimiter(t, LimiterOptions{
		Default: Limits{NewFlowsPerSecond: 1, Burst: 1, MaxHandshakes: 3},
		Peers:   map[string]Limits{"big": {MaxHandshakes: -1}},
		Logger:  zap.New(core),
	})
	var rels []func()
	for i := range 3 {
		rel, err := l.AdmitHandshake("a")
		if err != nil {
			t.Fatalf("handshake %d: %v", i+1, err)
		}
		rels = append(rels, rel)
	}
	for range 5 {
		if _, err := l.AdmitHandshake("a"); !errors.Is(err, ErrHandshakeLimit) || !strings.Contains(err.Error(), `"a"`) {
			t.Fatalf("fourth handshake: %v; want ErrHandshakeLimit naming the peer", err)
		}
	}
	// Another peer, and one without a limit, are not held up.
	for _, peer := range []string{"b", "big", "big", "big", "big"} {
		if _, err := l.AdmitHandshake(peer); err != nil {
			t.Fatalf("peer %q: %v", peer, err)
		}
	}
	// Handshakes take no flow tokens: the peer's one flow is still there.
	admitN(t, l, "a", 1)
	if n := logs.FilterMessageSnippet("handshakes").Len(); n != 1 {
		t.Errorf("%d log lines for the refusals; want 1", n)
	}
	if got := logs.All()[0].ContextMap()["peer"]; got != "a" {
		t.Errorf("the log line names peer %v", got)
	}
	s := peerStats(t, l, "a")
	if s.Handshakes != 3 || s.HandshakeLimited != 5 {
		t.Errorf("stats %+v; want 3 handshakes, 5 refused", s)
	}
	rels[0]()
	rels[0]() // a second release does nothing
	if _, err := l.AdmitHandshake("a"); err != nil {
		t.Fatalf("after a release: %v", err)
	}
	if _, err := l.AdmitHandshake("a"); !errors.Is(err, ErrHandshakeLimit) {
		t.Fatalf("after one release, two handshakes: %v", err)
	}
	// A peer with handshakes in flight is not forgotten.
	clock.advance(2 * forgetAfter)
	admitN(t, l, "c", 1)
	if s := peerStats(t, l, "a"); s.Handshakes != 3 {
		t.Errorf("after a sweep: %+v", s)
	}
}
