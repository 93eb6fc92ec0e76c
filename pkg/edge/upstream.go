package edge

import (
	"context"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// A replica that vanishes (its process killed, its machine asleep) sends
// no FIN or RST through the tunnel: requests in flight on its connections
// would wait for answers that never come, and its idle keep-alive
// connections would take the next requests into the same hole. The edge
// therefore keeps the connections it opened to each replica address and,
// once the registry no longer lists that address (the agent's lease
// lapsed or it withdrew), closes them. The requests that were waiting
// then fail, and those that can be retried move to another replica.

// sweepInterval is how often the edge compares its connections with the
// registry.
const sweepInterval = time.Second

// upstreams is the set of open connections to replicas, by address.
type upstreams struct {
	mu     sync.Mutex
	byAddr map[netip.AddrPort]map[*upstreamConn]struct{}
}

// dial opens a connection to a replica with Options.Dial and keeps it in
// the set until it is closed.
func (e *Edge) dial(ctx context.Context, addr netip.AddrPort) (net.Conn, error) {
	c, err := e.opts.Dial(ctx, addr)
	if err != nil {
		return nil, err
	}
	uc := &upstreamConn{Conn: c, set: &e.upstreams, addr: addr}
	e.upstreams.add(uc)
	return uc, nil
}

func (u *upstreams) add(c *upstreamConn) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.byAddr == nil {
		u.byAddr = make(map[netip.AddrPort]map[*upstreamConn]struct{})
	}
	m := u.byAddr[c.addr]
	if m == nil {
		m = make(map[*upstreamConn]struct{})
		u.byAddr[c.addr] = m
	}
	m[c] = struct{}{}
}

func (u *upstreams) remove(c *upstreamConn) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if m := u.byAddr[c.addr]; m != nil {
		delete(m, c)
		if len(m) == 0 {
			delete(u.byAddr, c.addr)
		}
	}
}

// closeGone closes the connections to addresses not in live, and
// reports how many it closed.
func (u *upstreams) closeGone(live map[netip.AddrPort]bool) int {
	var gone []*upstreamConn
	u.mu.Lock()
	for addr, m := range u.byAddr {
		if live[addr] {
			continue
		}
		for c := range m {
			gone = append(gone, c)
		}
	}
	u.mu.Unlock()
	for _, c := range gone {
		c.Close()
	}
	return len(gone)
}

// sweepUpstreams closes, every sweepInterval until the edge closes, the
// connections to replicas the registry has let go, and forgets the
// counters of hostnames that are gone.
func (e *Edge) sweepUpstreams() {
	t := time.NewTicker(sweepInterval)
	defer t.Stop()
	for {
		select {
		case <-e.ctx.Done():
			return
		case <-t.C:
		}
		live := make(map[netip.AddrPort]bool)
		for _, s := range e.reg.Services() {
			for _, r := range s.Replicas {
				live[r.Addr] = true
			}
		}
		e.pruneStats()
		if n := e.upstreams.closeGone(live); n > 0 {
			e.log.Info("closed the connections to replicas that are gone", zap.Int("connections", n))
		}
	}
}

// upstreamConn is a connection to a replica, in the edge's set while
// open. CloseWrite passes a half-close on where the connection has one.
type upstreamConn struct {
	net.Conn
	set  *upstreams
	addr netip.AddrPort
	once sync.Once
	// written counts the bytes written, so that a request that failed on
	// a kept-alive connection can tell whether any of it went out.
	written atomic.Int64
}

func (c *upstreamConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.written.Add(int64(n))
	return n, err
}

func (c *upstreamConn) Close() error {
	c.once.Do(func() { c.set.remove(c) })
	return c.Conn.Close()
}

// NetConn is the connection c wraps: what a relay resets.
func (c *upstreamConn) NetConn() net.Conn { return c.Conn }

func (c *upstreamConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Close()
}
