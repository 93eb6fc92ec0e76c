package edge

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"time"

	"go.uber.org/zap"

	"github.com/sluice-vpn/sluice/pkg/edge/registry"
	"github.com/sluice-vpn/sluice/pkg/expose"
	bytecopy "github.com/sluice-vpn/sluice/relay"
)

// serveTCP accepts the connections of a TCP route until its listener
// closes.
func (e *Edge) serveTCP(l *listener, host string) {
	var backoff time.Duration
	for {
		c, err := l.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors and the like: wait a little
			// rather than spin, as net/http does.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			e.warnf("accept:"+l.stats.name, "edge: accept failed", zap.String("listener", l.stats.name), zap.Error(err))
			select {
			case <-time.After(backoff):
				continue
			case <-e.ctx.Done():
				return
			}
		}
		backoff = 0
		if !e.goroutine(func() { e.serveConn(l, host, c) }) {
			c.Close()
			return
		}
	}
}

// serveConn applies host's policy to a client connection, connects it to
// a replica and relays between them.
func (e *Edge) serveConn(l *listener, host string, c net.Conn) {
	defer c.Close()
	client := addrPortOf(c.RemoteAddr())
	st := e.stats.host(host)
	pol := e.policy(host)
	refuse := func(reason int) {
		st.refused[reason].Add(1)
		e.log.Debug("refused", zap.String("hostname", host), zap.String("listener", l.stats.name),
			zap.String("reason", reasonNames[reason]), zap.Stringer("client", client))
	}
	if !pol.admitAddr(client.Addr()) {
		refuse(reasonIP)
		return
	}
	if limit := pol.admitRate(client.Addr()); limit != limitNone {
		which := "per_client"
		if limit == limitTotal {
			which = "total"
		}
		e.warnf("rate:"+which+":"+host, "edge: rate limit reached; refusing connections", zap.String("hostname", host), zap.String("limit", which))
		refuse(reasonRate)
		return
	}

	up := e.dialTCP(l, host, st, client)
	if up == nil {
		return
	}
	if !e.track(up) {
		return
	}
	defer func() {
		up.Close()
		e.untrack(up)
	}()

	if pol != nil && pol.src.ProxyProtocol {
		if _, err := up.Write(proxyHeader(client, addrPortOf(c.LocalAddr()))); err != nil {
			e.log.Debug("writing the PROXY header failed", zap.String("hostname", host), zap.Error(err))
			return
		}
	}
	relay(c, up)
}

// dialTCP connects to one of host's replicas, trying others while dials
// fail (nothing has been sent, so that is always safe); nil if none
// could be reached, the reason counted.
func (e *Edge) dialTCP(l *listener, host string, st *hostStats, client netip.AddrPort) net.Conn {
	var tried []string
	for attempt := 0; attempt < e.opts.Attempts; attempt++ {
		rep, err := e.reg.Pick(host, expose.ProtocolTCP, tried)
		if err != nil {
			if attempt > 0 {
				return nil // the failures are counted already
			}
			if errors.Is(err, registry.ErrUnknownHost) {
				l.stats.unknown.Add(1)
				e.log.Debug("unknown hostname", zap.String("listener", l.stats.name), zap.String("hostname", host), zap.Stringer("client", client))
			} else {
				st.refused[reasonNoReplica].Add(1)
				e.warnf("noreplica:"+host, "edge: no replica available", zap.String("hostname", host))
			}
			return nil
		}
		tried = append(tried, rep.ID)
		ctx, cancel := context.WithTimeout(e.ctx, e.opts.DialTimeout)
		up, err := e.dial(ctx, rep.Addr)
		cancel()
		if err == nil {
			e.reg.Report(rep.ID, nil)
			return up
		}
		if e.ctx.Err() != nil {
			return nil
		}
		e.reg.Report(rep.ID, err)
		st.attemptsFailed.Add(1)
		e.log.Debug("attempt failed", zap.String("hostname", host), zap.String("replica", rep.ID),
			zap.Stringer("addr", rep.Addr), zap.Int("attempt", attempt+1), zap.Error(err))
	}
	return nil
}

// relay copies both ways until both directions are done. The end of one
// direction is passed on as a half-close; an error either way resets
// both.
func relay(client, up net.Conn) {
	bytecopy.Run(context.Background(), client, up, bytecopy.Options{})
}

// addrPortOf is the address of a TCP endpoint, without IPv6 zone (see
// remoteIP); zero if it is not one.
func addrPortOf(a net.Addr) netip.AddrPort {
	var ap netip.AddrPort
	if ta, ok := a.(*net.TCPAddr); ok {
		ap = ta.AddrPort()
	} else if a != nil {
		ap, _ = netip.ParseAddrPort(a.String())
	}
	if !ap.IsValid() {
		return netip.AddrPort{}
	}
	return netip.AddrPortFrom(ap.Addr().Unmap().WithZone(""), ap.Port())
}
