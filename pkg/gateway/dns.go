package gateway

import (
	"context"
	"errors"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/sluice-vpn/sluice/netstack"
)

// DNS forwarding limits: queries in flight, and how long each upstream
// gets before the next is tried.
const (
	dnsMaxInFlight = 256
	dnsTimeout     = 2 * time.Second
)

// dnsForwarder answers DNS queries sent to the gateway's own addresses by
// asking the upstream resolvers, from sockets of the egress pool, and
// answering with the gateway's address as source.
// dnsPort is where the gateway's own addresses answer DNS.
const dnsPort = 53

type dnsForwarder struct {
	s         *Server
	upstreams []netip.AddrPort

	ctx    context.Context
	cancel context.CancelFunc
	sem    chan struct{}
	wg     sync.WaitGroup

	queries, answered, failed, dropped atomic.Uint64
}

// DNSStats count the queries to the gateway's resolver address.
type DNSStats struct {
	Queries  uint64 // UDP queries received
	Answered uint64 // answered from an upstream
	Failed   uint64 // no upstream answered
	Dropped  uint64 // refused: too many in flight
}

func newDNSForwarder(s *Server, upstreams []netip.AddrPort) *dnsForwarder {
	d := &dnsForwarder{s: s, upstreams: upstreams, sem: make(chan struct{}, dnsMaxInFlight)}
	d.ctx, d.cancel = context.WithCancel(context.Background())
	return d
}

// tcpUpstream is where a TCP connection to the gateway's address dst goes:
// DNS over TCP is relayed as a stream to the first upstream.
func (d *dnsForwarder) tcpUpstream(dst netip.AddrPort) (netip.AddrPort, bool) {
	if dst.Port() != dnsPort || len(d.upstreams) == 0 {
		return netip.AddrPort{}, false
	}
	return d.upstreams[0], true
}

// query forwards one UDP query. It returns at once; the answer is written
// to the client when it comes.
func (d *dnsForwarder) query(src, dst netip.AddrPort, payload []byte) error {
	if dst.Port() != dnsPort || len(d.upstreams) == 0 {
		return netstack.Refuse(netstack.RefuseReset, errors.New("gateway: nothing listens there"))
	}
	d.queries.Add(1)
	if len(payload) < 12 {
		d.failed.Add(1)
		return nil // not a DNS message
	}
	select {
	case d.sem <- struct{}{}:
	default:
		d.dropped.Add(1)
		return netstack.Refuse(netstack.RefuseDrop, errors.New("gateway: too many DNS queries in flight"))
	}
	q := append([]byte(nil), payload...)
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		defer func() { <-d.sem }()
		if answer := d.exchange(q); answer != nil {
			d.answered.Add(1)
			d.s.stack.WriteUDP(dst, src, answer)
			return
		}
		d.failed.Add(1)
	}()
	return nil
}

// exchange asks each upstream in turn and returns the first answer whose
// ID matches the query.
func (d *dnsForwarder) exchange(q []byte) []byte {
	buf := make([]byte, 65535)
	for _, up := range d.upstreams {
		c, err := d.s.egress.ListenUDP(d.ctx, up.Addr())
		if err != nil {
			d.s.log.Debug("dns: no egress socket", zap.Error(err))
			return nil
		}
		stop := context.AfterFunc(d.ctx, func() { c.Close() })
		answer := func() []byte {
			defer c.Close()
			if _, err := c.WriteToUDPAddrPort(q, up); err != nil {
				return nil
			}
			c.SetReadDeadline(time.Now().Add(dnsTimeout))
			for {
				n, from, err := c.ReadFromUDPAddrPort(buf)
				if err != nil {
					return nil
				}
				if from.Addr().Unmap() == up.Addr().Unmap() && from.Port() == up.Port() && n >= 12 && buf[0] == q[0] && buf[1] == q[1] {
					return append([]byte(nil), buf[:n]...)
				}
			}
		}()
		stop()
		if answer != nil {
			return answer
		}
	}
	return nil
}

func (d *dnsForwarder) stats() DNSStats {
	return DNSStats{Queries: d.queries.Load(), Answered: d.answered.Load(), Failed: d.failed.Load(), Dropped: d.dropped.Load()}
}

func (d *dnsForwarder) close() {
	d.cancel()
	d.wg.Wait()
}
