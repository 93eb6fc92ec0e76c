package nat

import (
	"sync"
	"sync/atomic"
)

// Totals are the traffic of a peer's flows, each way.
type Totals struct {
	Flows                    uint64 // flows ever inserted that have ended, plus live ones
	OrigBytes, OrigPackets   uint64 // from the peer
	ReplyBytes, ReplyPackets uint64 // to the peer
}

// peerTotals accumulates the counters of ended flows per peer, so that a
// peer's traffic is known after its flows are gone, as an operator reading
// per-peer counters expects.
type peerTotals struct {
	m sync.Map // peer name -> *peerCounters
}

type peerCounters struct {
	flows, origBytes, origPackets, replyBytes, replyPackets atomic.Uint64
}

func (p *peerTotals) add(f *Flow) {
	v, ok := p.m.Load(f.peer)
	if !ok {
		v, _ = p.m.LoadOrStore(f.peer, new(peerCounters))
	}
	c := v.(*peerCounters)
	c.flows.Add(1)
	c.origBytes.Add(f.origBytes.Load())
	c.origPackets.Add(f.origPackets.Load())
	c.replyBytes.Add(f.replyBytes.Load())
	c.replyPackets.Add(f.replyPackets.Load())
}

// PeerTotals returns every peer's traffic so far: the flows that ended and
// the ones still open. Flows without a peer are under "".
func (t *Table) PeerTotals() map[string]Totals {
	out := make(map[string]Totals)
	t.totals.m.Range(func(k, v any) bool {
		c := v.(*peerCounters)
		out[k.(string)] = Totals{
			Flows:     c.flows.Load(),
			OrigBytes: c.origBytes.Load(), OrigPackets: c.origPackets.Load(),
			ReplyBytes: c.replyBytes.Load(), ReplyPackets: c.replyPackets.Load(),
		}
		return true
	})
	for _, e := range t.Snapshot() {
		tot := out[e.Peer]
		tot.Flows++
		tot.OrigBytes += e.OrigBytes
		tot.OrigPackets += e.OrigPackets
		tot.ReplyBytes += e.ReplyBytes
		tot.ReplyPackets += e.ReplyPackets
		out[e.Peer] = tot
	}
	return out
}

// MaxFlows is the most flows the table holds at once.
func (t *Table) MaxFlows() int { return int(t.maxFlows) }
