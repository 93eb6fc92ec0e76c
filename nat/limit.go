package nat

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// Errors returned by Limiter.Admit, wrapped with the peer's name; test for
// them with errors.Is.
var (
	// ErrRateLimited means the peer has opened flows faster than its
	// NewFlowsPerSecond for longer than its Burst allows.
	ErrRateLimited = errors.New("nat: new-flow rate limit reached")
	// ErrPeerFlowLimit means the peer has MaxFlows flows open already.
	ErrPeerFlowLimit = errors.New("nat: peer's concurrent flow limit reached")
	// ErrHandshakeLimit means the peer has MaxHandshakes TCP handshakes
	// in flight already.
	ErrHandshakeLimit = errors.New("nat: peer's limit of TCP handshakes in flight reached")
)

// Default limits, for a Limits field left zero.
const (
	DefaultNewFlowsPerSecond = 100
	DefaultMaxFlowsPerPeer   = 4096
	// DefaultMaxHandshakesPerPeer is an eighth of the gateway's default
	// bound on all handshakes in flight (1024): it takes eight peers
	// flooding half-open handshakes to fill it.
	DefaultMaxHandshakesPerPeer = 128
)

// Limits bound how fast one peer opens flows and how many it holds open. A
// zero field takes the default given in brackets.
type Limits struct {
	// NewFlowsPerSecond is the rate at which the peer's token bucket
	// refills [100]. Each new flow takes one token. Negative means no
	// rate limit.
	NewFlowsPerSecond float64
	// Burst is the size of the bucket: how many flows the peer may open at
	// once after a quiet spell [twice the rate, at least 1].
	Burst int
	// MaxFlows is how many flows the peer may have open at once [4096].
	// Negative means no limit.
	MaxFlows int
	// MaxHandshakes is how many TCP handshakes the peer may have in
	// flight at once, from its SYN until its connection is relayed or
	// refused [128]; each holds a connection to its destination, and so
	// an egress port, once dialled. Negative means no limit.
	MaxHandshakes int
}

// LimiterOptions configure a Limiter. The zero value gives every peer the
// default limits.
type LimiterOptions struct {
	// Default applies to every peer without an entry in Peers.
	Default Limits
	// Peers holds per-peer limits by peer name, as Admit is given it. A
	// zero field of an entry takes Default's value; a zero Burst with a
	// rate of the peer's own is twice that rate unless Default sets Burst.
	Peers map[string]Limits
	// Logger receives a line when a peer reaches a limit: at most one per
	// peer every 10 seconds, saying how many refusals went unlogged since
	// the last. Nil means no logs. Update ignores it.
	Logger *zap.Logger

	// clock replaces time.Now in tests. It must be monotonic.
	clock func() time.Time
}

// PeerLimitStats describe one peer's use of its limits. The counters are
// cumulative for as long as the limiter remembers the peer: a peer with no
// open flows that has been quiet for a minute may be forgotten, and starts
// from zero when it returns.
type PeerLimitStats struct {
	Peer string
	// Limits are those in effect for the peer, defaults filled in.
	Limits Limits
	// Flows is the number of flows admitted and not yet released.
	Flows int
	// Admitted counts the flows admitted; RateLimited and FlowLimited the
	// flows refused with ErrRateLimited and ErrPeerFlowLimit.
	Admitted, RateLimited, FlowLimited uint64
	// Handshakes is the number of TCP handshakes in flight;
	// HandshakeLimited counts the SYNs refused with ErrHandshakeLimit.
	Handshakes       int
	HandshakeLimited uint64
}

const (
	// limitLogEvery is the shortest interval between two log lines about
	// one peer's refusals.
	limitLogEvery = 10 * time.Second
	// forgetAfter is how long a peer with no open flows stays remembered
	// after its last admission. Forgetting loses nothing but counters: by
	// then its bucket is full again, which is also where a new peer starts.
	forgetAfter = time.Minute
	// sweepEvery is the shortest interval between two looks for peers to
	// forget.
	sweepEvery = 10 * time.Second
)

// Limiter admits or refuses new flows per peer: a token bucket bounds the
// rate at which each peer opens flows, a counter the flows it holds open.
// It is safe for concurrent use. Peers share no lock: each has its own
// state, found in a sync.Map, and a flood from one peer contends only with
// that peer's other flows.
//
// The limiter does not bound the total number of flows; the Table does.
type Limiter struct {
	cfg   atomic.Pointer[limitConfig]
	peers sync.Map // string -> *peerLimit
	log   *zap.Logger
	clock func() time.Time
	epoch time.Time

	lastSweep atomic.Int64 // limiter time of the last sweep

	// testAfterLoad, if set, runs in lockedPeer between finding a peer's state
	// and locking it, so that tests can sweep in that window.
	testAfterLoad func()
}

// limitConfig is one generation of resolved limits; Update swaps in a new
// one.
type limitConfig struct {
	def   Limits
	peers map[string]Limits
}

func (c *limitConfig) limits(peer string) Limits {
	if l, ok := c.peers[peer]; ok {
		return l
	}
	return c.def
}

// peerLimit is one peer's state.
type peerLimit struct {
	name string
	// flows rises only under mu, so that a check against MaxFlows under mu
	// stays true until the increment; it falls without mu, which can only
	// make a refusal stale, never an admission wrong.
	flows                              atomic.Int64
	admitted, rateLimited, flowLimited atomic.Uint64
	// handshakes follows the same rule as flows.
	handshakes       atomic.Int64
	handshakeLimited atomic.Uint64
	// Prepared once, so that a refusal does not allocate.
	rateErr, flowErr, handshakeErr error

	mu         sync.Mutex
	tokens     float64 // clamped to the burst before use, so +Inf is full
	refilled   int64   // limiter time tokens were last brought up to date
	lastAdmit  int64
	lastLog    int64
	logged     bool
	suppressed uint64 // refusals not logged since lastLog
	dead       bool   // forgotten: removed from the map, use a fresh one
}

// NewLimiter returns a limiter with opts' limits and no flows.
func NewLimiter(opts LimiterOptions) (*Limiter, error) {
	cfg, err := newLimitConfig(opts)
	if err != nil {
		return nil, err
	}
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	if opts.clock == nil {
		opts.clock = time.Now
	}
	l := &Limiter{log: opts.Logger.Named("limit"), clock: opts.clock, epoch: opts.clock()}
	l.cfg.Store(cfg)
	return l, nil
}

func newLimitConfig(opts LimiterOptions) (*limitConfig, error) {
	if err := opts.Default.validate("Default"); err != nil {
		return nil, err
	}
	c := &limitConfig{def: opts.Default.withDefaults(Limits{
		NewFlowsPerSecond: DefaultNewFlowsPerSecond,
		MaxFlows:          DefaultMaxFlowsPerPeer,
		MaxHandshakes:     DefaultMaxHandshakesPerPeer,
	})}
	if len(opts.Peers) > 0 {
		c.peers = make(map[string]Limits, len(opts.Peers))
		// A peer's zero Burst follows its own rate unless Default set one.
		base := c.def
		if opts.Default.Burst == 0 {
			base.Burst = 0
		}
		for name, pl := range opts.Peers {
			if err := pl.validate(fmt.Sprintf("Peers[%s]", name)); err != nil {
				return nil, err
			}
			c.peers[name] = pl.withDefaults(base)
		}
	}
	return c, nil
}

func (l Limits) validate(field string) error {
	switch r := l.NewFlowsPerSecond; {
	case math.IsNaN(r):
		return fmt.Errorf("nat: LimiterOptions.%s.NewFlowsPerSecond: NaN is not a rate", field)
	case math.IsInf(r, 0):
		return fmt.Errorf("nat: LimiterOptions.%s.NewFlowsPerSecond: %v is not finite (a negative rate means no limit)", field, r)
	}
	if l.Burst < 0 {
		return fmt.Errorf("nat: LimiterOptions.%s.Burst: %d is negative", field, l.Burst)
	}
	return nil
}

// withDefaults fills l's zero fields from d, and a zero burst from l's rate.
func (l Limits) withDefaults(d Limits) Limits {
	if l.NewFlowsPerSecond == 0 {
		l.NewFlowsPerSecond = d.NewFlowsPerSecond
	}
	if l.Burst == 0 {
		l.Burst = d.Burst
	}
	if l.Burst == 0 && l.NewFlowsPerSecond > 0 {
		l.Burst = int(min(math.Ceil(2*l.NewFlowsPerSecond), math.MaxInt32))
		l.Burst = max(l.Burst, 1)
	}
	if l.MaxFlows == 0 {
		l.MaxFlows = d.MaxFlows
	}
	if l.MaxHandshakes == 0 {
		l.MaxHandshakes = d.MaxHandshakes
	}
	return l
}

// Update replaces the limits with opts' (but not the logger). New limits
// apply to the next Admit; flows already admitted stay open and counted,
// even where they now exceed MaxFlows, and a peer's bucket keeps its
// tokens, up to the new Burst. On error nothing changes.
func (l *Limiter) Update(opts LimiterOptions) error {
	cfg, err := newLimitConfig(opts)
	if err != nil {
		return err
	}
	l.cfg.Store(cfg)
	return nil
}

// lockedPeer returns peer's state, locked, as found in the map: a sweep
// that forgot an entry after it was found marks it dead, and its
// successor is looked up instead.
func (l *Limiter) lockedPeer(peer string, now int64) *peerLimit {
	for {
		p := l.peer(peer, now)
		if l.testAfterLoad != nil {
			l.testAfterLoad()
		}
		p.mu.Lock()
		if !p.dead {
			return p
		}
		p.mu.Unlock()
	}
}

// Admit asks to open one new flow for peer, before the flow exists
// anywhere else. On success the caller must call release exactly once when
// the flow ends (or fails to start); further calls do nothing. Otherwise the
// error matches ErrRateLimited or ErrPeerFlowLimit. The empty name is a peer
// like any other.
func (l *Limiter) Admit(peer string) (release func(), err error) {
	lim := l.cfg.Load().limits(peer)
	now := l.now()
	p := l.lockedPeer(peer, now)
	if lim.MaxFlows >= 0 && p.flows.Load() >= int64(lim.MaxFlows) {
		p.flowLimited.Add(1)
		logIt, n := p.refused(now)
		p.mu.Unlock()
		if logIt {
			l.log.Warn("peer reached its concurrent flow limit; refusing new flows",
				zap.String("peer", peer), zap.Int("max_flows", lim.MaxFlows),
				zap.Uint64("suppressed", n))
		}
		return nil, p.flowErr
	}
	if lim.NewFlowsPerSecond >= 0 {
		if elapsed := now - p.refilled; elapsed > 0 {
			p.tokens += float64(elapsed) * lim.NewFlowsPerSecond / float64(time.Second)
			p.refilled = now
		}
		p.tokens = min(p.tokens, float64(lim.Burst))
		// The epsilon forgives rounding: ten refills of a tenth
		// of a token make a whole one.
		if p.tokens < 1-1e-9 {
			p.rateLimited.Add(1)
			logIt, n := p.refused(now)
			p.mu.Unlock()
			if logIt {
				l.log.Warn("peer reached its new-flow rate limit; refusing new flows",
					zap.String("peer", peer), zap.Float64("per_second", lim.NewFlowsPerSecond),
					zap.Int("burst", lim.Burst), zap.Uint64("suppressed", n))
			}
			return nil, p.rateErr
		}
		p.tokens--
	}
	p.flows.Add(1)
	p.admitted.Add(1)
	p.lastAdmit = max(p.lastAdmit, now)
	p.mu.Unlock()

	if last := l.lastSweep.Load(); now-last >= int64(sweepEvery) && l.lastSweep.CompareAndSwap(last, now) {
		l.sweep(now)
	}
	t := &admission{}
	t.p.Store(p)
	return t.release, nil
}

// admission is one admitted flow; its release is what Admit returns.
type admission struct{ p atomic.Pointer[peerLimit] }

func (a *admission) release() {
	if p := a.p.Swap(nil); p != nil {
		p.flows.Add(-1)
	}
}

// AdmitHandshake asks to start one TCP handshake for peer, when its SYN
// arrives and before Admit is asked for the flow. It bounds the
// handshakes in flight, which hold a slot the whole gateway shares for as
// long as the client takes to complete them, however slowly the peer
// opens them. On success the caller must call release exactly once when
// the handshake ends; further calls do nothing. Otherwise the error
// matches ErrHandshakeLimit.
func (l *Limiter) AdmitHandshake(peer string) (release func(), err error) {
	lim := l.cfg.Load().limits(peer)
	now := l.now()
	p := l.lockedPeer(peer, now)
	if lim.MaxHandshakes >= 0 && p.handshakes.Load() >= int64(lim.MaxHandshakes) {
		p.handshakeLimited.Add(1)
		logIt, n := p.refused(now)
		p.mu.Unlock()
		if logIt {
			l.log.Warn("peer reached its limit of TCP handshakes in flight; refusing new connections",
				zap.String("peer", peer), zap.Int("max_handshakes", lim.MaxHandshakes),
				zap.Uint64("suppressed", n))
		}
		return nil, p.handshakeErr
	}
	p.handshakes.Add(1)
	// A peer with a handshake in flight is not forgotten: the sweep
	// checks handshakes as it checks flows.
	p.lastAdmit = max(p.lastAdmit, now)
	p.mu.Unlock()
	h := &handshakeAdmission{}
	h.p.Store(p)
	return h.release, nil
}

// handshakeAdmission is one admitted handshake.
type handshakeAdmission struct{ p atomic.Pointer[peerLimit] }

func (a *handshakeAdmission) release() {
	if p := a.p.Swap(nil); p != nil {
		p.handshakes.Add(-1)
	}
}

// refused records a refusal under p.mu and says whether to log it, with the
// number of refusals left unlogged before it.
func (p *peerLimit) refused(now int64) (logIt bool, suppressed uint64) {
	if p.logged && now-p.lastLog < int64(limitLogEvery) {
		p.suppressed++
		return false, 0
	}
	n := p.suppressed
	p.logged, p.lastLog, p.suppressed = true, now, 0
	return true, n
}

// now is the limiter's clock: nanoseconds since NewLimiter.
func (l *Limiter) now() int64 { return int64(l.clock().Sub(l.epoch)) }

// peer finds or makes the state of the named peer.
func (l *Limiter) peer(name string, now int64) *peerLimit {
	if v, ok := l.peers.Load(name); ok {
		return v.(*peerLimit)
	}
	p := &peerLimit{
		name:         name,
		rateErr:      fmt.Errorf("peer %q: %w", name, ErrRateLimited),
		flowErr:      fmt.Errorf("peer %q: %w", name, ErrPeerFlowLimit),
		handshakeErr: fmt.Errorf("peer %q: %w", name, ErrHandshakeLimit),
		tokens:       math.Inf(1),
		refilled:     now,
		lastAdmit:    now,
	}
	v, _ := l.peers.LoadOrStore(name, p)
	return v.(*peerLimit)
}

// sweep forgets peers that have no open flows, have been quiet for
// forgetAfter and whose buckets are full, so that peers that come and go
// do not grow the map without bound.
func (l *Limiter) sweep(now int64) {
	cfg := l.cfg.Load()
	l.peers.Range(func(k, v any) bool {
		p := v.(*peerLimit)
		lim := cfg.limits(p.name)
		p.mu.Lock()
		full := lim.NewFlowsPerSecond < 0 ||
			p.tokens+float64(now-p.refilled)*lim.NewFlowsPerSecond/float64(time.Second) >= float64(lim.Burst)
		if p.flows.Load() == 0 && p.handshakes.Load() == 0 && now-p.lastAdmit >= int64(forgetAfter) && full {
			p.dead = true
			l.peers.CompareAndDelete(k, p)
		}
		p.mu.Unlock()
		return true
	})
}

// Stats returns the state of every peer the limiter remembers and every
// peer with limits of its own, sorted by name.
func (l *Limiter) Stats() []PeerLimitStats {
	cfg := l.cfg.Load()
	var out []PeerLimitStats
	seen := make(map[string]bool)
	l.peers.Range(func(_, v any) bool {
		p := v.(*peerLimit)
		seen[p.name] = true
		out = append(out, PeerLimitStats{
			Peer:        p.name,
			Limits:      cfg.limits(p.name),
			Flows:       int(p.flows.Load()),
			Admitted:    p.admitted.Load(),
			RateLimited: p.rateLimited.Load(),
			FlowLimited: p.flowLimited.Load(),

			Handshakes:       int(p.handshakes.Load()),
			HandshakeLimited: p.handshakeLimited.Load(),
		})
		return true
	})
	for name, lim := range cfg.peers {
		if !seen[name] {
			out = append(out, PeerLimitStats{Peer: name, Limits: lim})
		}
	}
	slices.SortFunc(out, func(a, b PeerLimitStats) int { return strings.Compare(a.Peer, b.Peer) })
	return out
}
