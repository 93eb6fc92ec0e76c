package edge

import (
	"net/netip"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// maxClients bounds the clients one hostname's per-client limiter tracks.
const maxClients = 65536

// Sweeps of the per-client limiters: at most one per sweepMinGap when the
// table is full, and one per sweepEvery in any case, so that the memory of
// a past crowd is given back.
const (
	sweepMinGap = time.Second
	sweepEvery  = time.Minute
)

// clientLimiters is a token bucket per client, in a table of bounded
// size.
//
// A client whose bucket has filled up again is indistinguishable from one
// never seen, so sweeps forget exactly those and nothing is lost. When
// the table is full of clients that are all still paying off their
// bursts, newcomers share one overflow bucket of the per-client size until
// a sweep makes room: a flood of addresses slows new clients down rather
// than erasing what the limiter knows of the clients it already tracks
// (evicting the oldest would let a flood reset everyone's bucket).
type clientLimiters struct {
	limit rate.Limit
	burst int
	max   int

	mu        sync.Mutex
	m         map[netip.Addr]*rate.Limiter
	overflow  *rate.Limiter
	lastSweep time.Time
}

func newClientLimiters(limit rate.Limit, burst, max int) *clientLimiters {
	return &clientLimiters{
		limit:     limit,
		burst:     burst,
		max:       max,
		m:         make(map[netip.Addr]*rate.Limiter),
		overflow:  rate.NewLimiter(limit, burst),
		lastSweep: time.Now(),
	}
}

// clientKey is what tells clients apart: the IPv4 address, or the /64 of
// an IPv6 address.
func clientKey(ip netip.Addr) netip.Addr {
	ip = ip.Unmap()
	if ip.Is6() {
		p, _ := ip.Prefix(64)
		return p.Addr()
	}
	return ip
}

// allow takes a token from ip's bucket, reporting whether there was one.
func (c *clientLimiters) allow(ip netip.Addr) bool {
	return c.reserve(ip, time.Now()) != nil
}

// reserve takes a token from ip's bucket at now; nil if there was none.
// cancel gives it back, for a request that another limit refused.
//
// The token is taken under c.mu: once c.mu is let go, a sweep may find
// the bucket full and forget it, and the client's next request would
// start a fresh one while this one still spends from the old, a token
// more than the burst.
func (c *clientLimiters) reserve(ip netip.Addr, now time.Time) *rate.Reservation {
	key := clientKey(ip)
	c.mu.Lock()
	defer c.mu.Unlock()
	l, ok := c.m[key]
	if !ok {
		since := now.Sub(c.lastSweep)
		if (len(c.m) >= c.max && since >= sweepMinGap) || since >= sweepEvery {
			c.sweep(now)
		}
		if len(c.m) >= c.max {
			l = c.overflow
		} else {
			l = rate.NewLimiter(c.limit, c.burst)
			c.m[key] = l
		}
	}
	r := l.ReserveN(now, 1)
	if r.DelayFrom(now) > 0 {
		r.CancelAt(now)
		return nil
	}
	return r
}

// cancel returns the token of r, reserved at now. It must be the same
// now: a Reservation gives nothing back once its time has passed.
// c.mu serialises it with reserve, so no reservation of the same bucket
// comes between that the library would have to account for.
func (c *clientLimiters) cancel(r *rate.Reservation, now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	r.CancelAt(now)
}

// sweep forgets the clients whose buckets are full. c.mu is held.
func (c *clientLimiters) sweep(now time.Time) {
	c.lastSweep = now
	full := float64(c.burst)
	for k, l := range c.m {
		if l.TokensAt(now) >= full {
			delete(c.m, k)
		}
	}
}

// len is the number of clients tracked.
func (c *clientLimiters) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.m)
}
