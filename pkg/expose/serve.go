package expose

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	bytecopy "github.com/sluice-vpn/sluice/relay"
)

// copyBufSize is the buffer of each direction of a relayed connection.
const copyBufSize = 32 << 10

// refusalLogEvery bounds how often refused connections are logged: under
// a flood, once in a while is what an operator needs.
const refusalLogEvery = time.Minute

// acceptLoop relays each connection that ln accepts until ln is closed
// (closing is set first) or ctx is done.
func (a *Agent) acceptLoop(ctx context.Context, ln net.Listener, closing *atomic.Bool) {
	gateway := a.opts.Control.Addr()
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if closing.Load() || ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors or the like: wait for some
			// to be given back rather than spin.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			a.log.Warn("accept failed; retrying", zap.Error(err), zap.Duration("backoff", backoff))
			select {
			case <-time.After(backoff):
			case <-ctx.Done():
				return
			}
			continue
		}
		backoff = 0
		if from := remoteAddr(c); from != gateway {
			// The gateway does not route between peers, so this
			// should not happen; if it does, only the edge, which
			// applies the hostname's policy, may reach the origin.
			a.foreign.Add(1)
			if a.logRefusal(&a.foreignLogged) {
				a.log.Warn("closed connections from an address other than the gateway's",
					zap.Stringer("from", c.RemoteAddr()), zap.Stringer("gateway", gateway),
					zap.Uint64("total", a.foreign.Load()))
			}
			c.Close()
			continue
		}
		select {
		case a.slots <- struct{}{}:
		default:
			a.refused.Add(1)
			if a.logRefusal(&a.refusedLogged) {
				a.log.Warn("connection limit reached: closing new connections",
					zap.Int("max_conns", a.opts.MaxConns), zap.Uint64("total", a.refused.Load()))
			}
			c.Close()
			continue
		}
		if !a.track(c) {
			<-a.slots
			c.Close()
			return
		}
		a.accepted.Add(1)
		a.active.Add(1)
		a.handlers.Add(1)
		go func() {
			defer a.handlers.Done()
			defer func() {
				a.active.Add(-1)
				<-a.slots
			}()
			a.handle(ctx, c)
		}()
	}
}

// remoteAddr is c's peer address, unmapped; the zero address if it is
// not an IP address.
func remoteAddr(c net.Conn) netip.Addr {
	if ta, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return ap.Addr().Unmap().WithZone("")
	}
	ap, err := netip.ParseAddrPort(c.RemoteAddr().String())
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr().Unmap().WithZone("")
}

// logRefusal reports whether a refusal should be logged now, at most one
// every refusalLogEvery per kind.
func (a *Agent) logRefusal(last *atomic.Int64) bool {
	now := time.Now().UnixNano()
	prev := last.Load()
	if prev != 0 && now-prev < int64(refusalLogEvery) {
		return false
	}
	return last.CompareAndSwap(prev, now)
}

// handle relays edge, a connection from the gateway, to a new
// connection to the origin.
func (a *Agent) handle(ctx context.Context, edge net.Conn) {
	defer a.untrack(edge)
	defer edge.Close()
	o, err := a.dialOrigin(ctx)
	if err != nil {
		a.originErrors.Add(1)
		if ctx.Err() == nil {
			a.setOriginDown(true, err)
		}
		return
	}
	a.setOriginDown(false, nil)
	if !a.track(o) {
		o.Close()
		return
	}
	defer a.untrack(o)
	a.relay(edge, o)
}

// setOriginDown records what a connection to the origin, or a probe,
// found, and wakes the lease loop when that changes.
func (a *Agent) setOriginDown(down bool, err error) {
	if !a.originDown.CompareAndSwap(!down, down) {
		return
	}
	if down {
		a.log.Warn("origin unreachable; the gateway is told to send traffic elsewhere", zap.String("to", a.opts.To), zap.Error(err))
	} else {
		a.log.Info("origin reachable again", zap.String("to", a.opts.To))
	}
	select {
	case a.originChanged <- struct{}{}:
	default: // a wake-up is pending already; it reads the latest state
	}
}

// watchOrigin probes the origin every probeEvery while it is down, until
// ctx is done. The edge stops sending connections to a replica whose
// origin is down, so without probes nothing would tell the agent that
// the origin is back.
func (a *Agent) watchOrigin(ctx context.Context) {
	t := time.NewTicker(a.probeEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if !a.originDown.Load() {
			continue
		}
		c, err := a.dialOrigin(ctx)
		if err != nil {
			a.log.Debug("origin probe failed", zap.String("to", a.opts.To), zap.Error(err))
			continue
		}
		c.Close()
		a.setOriginDown(false, nil)
	}
}

// dialOrigin connects to the origin, TLS handshake included.
func (a *Agent) dialOrigin(ctx context.Context) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, a.opts.DialTimeout)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", a.origin.addr)
	if err != nil {
		return nil, err
	}
	if a.origin.tls == nil {
		return c, nil
	}
	tc := tls.Client(c, a.origin.tls)
	if err := tc.HandshakeContext(ctx); err != nil {
		c.Close()
		return nil, err
	}
	return tc, nil
}

// track registers c for closeConns to close; false, with nothing
// registered, once connections are being closed.
func (a *Agent) track(c io.Closer) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return false
	}
	a.conns[c] = struct{}{}
	return true
}

func (a *Agent) untrack(c io.Closer) {
	a.mu.Lock()
	delete(a.conns, c)
	a.mu.Unlock()
}

// closeConns closes every connection being relayed, and any that the
// accept loop or a handler would still register.
func (a *Agent) closeConns() {
	a.mu.Lock()
	a.closed = true
	conns := make([]io.Closer, 0, len(a.conns))
	for c := range a.conns {
		conns = append(conns, c)
	}
	a.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
}

// relay copies both ways between edge and origin until both directions
// have ended, then closes both. The end of a client's request reaches the
// origin as a half-close (close_notify and a FIN over TLS) while the
// answer still flows back; a failure either way resets both.
func (a *Agent) relay(edge, origin net.Conn) {
	bytecopy.Run(context.Background(), edge, origin, bytecopy.Options{
		Buffers: bytecopy.FromSyncPool(&a.bufs),
		OnCopy: func(dir bytecopy.Direction, n int) {
			if dir == bytecopy.AToB {
				a.toOrigin.Add(uint64(n))
			} else {
				a.fromOrigin.Add(uint64(n))
			}
		},
	})
}
