package edge

import (
	"errors"
	"net"
	"sync"
	"time"

	"go.uber.org/zap"
)

// listener is one of the edge's public listeners. Accept hands out at
// most max connections open at once; one beyond that is closed as soon as
// it is accepted, since queueing it would let clients decide how much the
// edge holds. Every connection it hands out is tracked by the edge, so
// that Close can close them all (hijacked ones too) and wait.
type listener struct {
	net.Listener
	e     *Edge
	stats *listenerStats
	max   int64
}

// Accept returns the next client connection within the limit.
func (l *listener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		tc, err := l.e.trackConn(l, c)
		if err != nil {
			return nil, err
		}
		if tc != nil {
			return tc, nil
		}
	}
}

// trackConn admits c from l: nil (c closed) if l is at its limit, an
// error if the edge is closed.
func (e *Edge) trackConn(l *listener, c net.Conn) (net.Conn, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		c.Close()
		return nil, net.ErrClosed
	}
	if l.stats.active.Load() >= l.max {
		c.Close()
		l.stats.refused.Add(1)
		e.warnf("maxconns:"+l.stats.name, "edge: connection limit reached; closing new connections",
			zap.String("listener", l.stats.name), zap.Int64("max_conns", l.max))
		return nil, nil
	}
	l.stats.active.Add(1)
	l.stats.conns.Add(1)
	tc := &trackedConn{Conn: c, e: e, l: l}
	e.conns[tc] = struct{}{}
	e.wg.Add(1)
	return tc, nil
}

// trackedConn is a client connection that counts as open, for its
// listener's limit and for Close to wait on, until it is closed.
type trackedConn struct {
	net.Conn
	e    *Edge
	l    *listener
	once sync.Once
}

// Close closes the connection and counts it as gone.
func (c *trackedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() {
		c.e.mu.Lock()
		delete(c.e.conns, c)
		c.e.mu.Unlock()
		c.l.stats.active.Add(-1)
		c.e.wg.Done()
	})
	return err
}

// NetConn is the connection c wraps: what a relay resets.
func (c *trackedConn) NetConn() net.Conn { return c.Conn }

// CloseWrite half-closes the connection where the transport can.
func (c *trackedConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.ErrUnsupported
}

// logThrottle lets a repeated warning through once per period, counting
// what it held back, so that exhausted limits are visible in the logs
// without a line per refused request.
type logThrottle struct {
	mu         sync.Mutex
	last       map[string]time.Time
	suppressed map[string]int
}

const (
	logThrottlePeriod = 10 * time.Second
	logThrottleKeys   = 4096 // keys are hostnames and listeners: bounded, but keep it so
)

// allow reports whether a warning under key may be logged now, and how
// many were held back since the last one.
func (t *logThrottle) allow(key string) (bool, int) {
	now := time.Now()
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.last == nil || len(t.last) > logThrottleKeys {
		t.last = make(map[string]time.Time)
		t.suppressed = make(map[string]int)
	}
	if last, ok := t.last[key]; ok && now.Sub(last) < logThrottlePeriod {
		t.suppressed[key]++
		return false, 0
	}
	n := t.suppressed[key]
	delete(t.suppressed, key)
	t.last[key] = now
	return true, n
}

// warnf logs a warning at most once per logThrottlePeriod per key.
func (e *Edge) warnf(key, msg string, fields ...zap.Field) {
	if ok, n := e.throttle.allow(key); ok {
		e.log.Warn(msg, append(fields, zap.Int("suppressed", n))...)
	}
}
