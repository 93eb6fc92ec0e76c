package netstack

import (
	"sync"
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// tcpForwarder terminates client TCP connections. gVisor's forwarder runs
// the handshake; this wrapper bounds the handshakes in flight and keeps the
// start of each SYN, which an ICMP error has to quote so that the client
// matches it to its connection attempt.
type tcpForwarder struct {
	s   *Stack
	fwd *tcp.Forwarder

	mu      sync.Mutex
	syns    map[stack.TransportEndpointID][]byte // quoted SYN headers, one per handshake in flight
	relays  map[*relay]struct{}
	closing bool
	wg      sync.WaitGroup

	// bufs are the relays' copy buffers, taken only by a relay with data
	// in hand: idle connections hold none.
	bufs sync.Pool

	inFlightDrops atomic.Uint64
	refused       atomic.Uint64
}

func newTCPForwarder(s *Stack) *tcpForwarder {
	f := &tcpForwarder{
		s:      s,
		syns:   make(map[stack.TransportEndpointID][]byte),
		relays: make(map[*relay]struct{}),
	}
	size := s.opts.RelayBufferSize
	f.bufs.New = func() any { b := make([]byte, size); return &b }
	// The wrapper enforces the in-flight bound; gVisor's own bound only
	// backs it up.
	f.fwd = tcp.NewForwarder(s.stack, 0, s.opts.MaxInFlight+1, f.handleRequest)
	return f
}

// handlePacket sees every TCP segment that matches no connection.
func (f *tcpForwarder) handlePacket(id stack.TransportEndpointID, pkt *stack.PacketBuffer) bool {
	th := header.TCP(pkt.TransportHeader().Slice())
	if len(th) < header.TCPMinimumSize {
		return f.fwd.HandlePacket(id, pkt)
	}
	flags := th.Flags()
	if !flags.Contains(header.TCPFlagSyn) || flags.Contains(header.TCPFlagAck) {
		return f.fwd.HandlePacket(id, pkt)
	}

	f.mu.Lock()
	if f.closing {
		f.mu.Unlock()
		return true
	}
	_, retransmit := f.syns[id]
	if !retransmit {
		if len(f.syns) >= f.s.opts.MaxInFlight {
			f.mu.Unlock()
			f.inFlightDrops.Add(1)
			return true
		}
		f.syns[id] = quote(pkt)
		f.wg.Add(1)
	}
	f.mu.Unlock()

	if !f.fwd.HandlePacket(id, pkt) && !retransmit {
		// Not a valid SYN after all (bad checksum): gVisor drops it.
		f.forget(id)
	}
	return true
}

// quote copies the IP header and the first 8 bytes of the transport
// header, what RFC 792 asks an ICMP error to carry.
func quote(pkt *stack.PacketBuffer) []byte {
	nh := pkt.NetworkHeader().Slice()
	th := pkt.TransportHeader().Slice()
	q := make([]byte, 0, len(nh)+8)
	q = append(q, nh...)
	return append(q, th[:min(len(th), 8)]...)
}

func (f *tcpForwarder) forget(id stack.TransportEndpointID) []byte {
	f.mu.Lock()
	q, ok := f.syns[id]
	delete(f.syns, id)
	f.mu.Unlock()
	if ok {
		f.wg.Done()
	}
	return q
}

// handleRequest runs on its own goroutine for each new SYN.
func (f *tcpForwarder) handleRequest(r *tcp.ForwarderRequest) {
	id := r.ID()
	src := addrPortFrom(id.RemoteAddress, id.RemotePort)
	dst := addrPortFrom(id.LocalAddress, id.LocalPort)

	upstream, err := f.s.opts.Handler.DialTCP(f.s.ctx, src, dst)
	if err != nil {
		f.refused.Add(1)
		q := f.forget(id)
		how := Classify(err)
		switch how {
		case RefuseReset:
			r.Complete(true)
		case RefuseDrop:
			r.Complete(false)
		default:
			r.Complete(false)
			f.s.sendICMPError(q, how, 0)
		}
		return
	}

	var wq waiter.Queue
	ep, tcpErr := r.CreateEndpoint(&wq)
	if tcpErr != nil {
		// The client gave up (RST) or the stack is closing.
		r.Complete(true)
		f.forget(id)
		upstream.Close()
		return
	}
	r.Complete(false)
	ep.SocketOptions().SetKeepAlive(true)

	key := connKey{client: src, server: dst}
	rl := &relay{client: gonet.NewTCPConn(&wq, ep), ep: ep, wq: &wq, upstream: upstream,
		bufs: &f.bufs, counts: f.s.link.counts.register(key)}
	if !f.track(rl) {
		f.s.link.counts.unregister(key)
		f.forget(id)
		rl.abort()
		return
	}
	// The relay keeps the forwarder's WaitGroup slot of the handshake.
	f.mu.Lock()
	delete(f.syns, id)
	f.mu.Unlock()

	// The relay gets goroutines of its own: this one's stack grew deep in
	// the dial and the handshake, and an idle relay should not keep it.
	go func() {
		rl.run(f.s.log)
		f.s.link.counts.unregister(key)
		f.untrack(rl)
		f.wg.Done()
	}()
}

func (f *tcpForwarder) track(rl *relay) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closing {
		return false
	}
	f.relays[rl] = struct{}{}
	return true
}

func (f *tcpForwarder) untrack(rl *relay) {
	f.mu.Lock()
	delete(f.relays, rl)
	f.mu.Unlock()
}

func (f *tcpForwarder) stats(st *Stats) {
	f.mu.Lock()
	st.InFlight = len(f.syns)
	st.TCPRelays = len(f.relays)
	f.mu.Unlock()
	st.InFlightDrops = f.inFlightDrops.Load()
}

// shutdown refuses new connections and aborts every relay. Handshakes
// still in progress end when the stack closes; wait waits for them.
func (f *tcpForwarder) shutdown() {
	f.mu.Lock()
	f.closing = true
	relays := make([]*relay, 0, len(f.relays))
	for rl := range f.relays {
		relays = append(relays, rl)
	}
	f.mu.Unlock()
	for _, rl := range relays {
		rl.abort()
	}
}

func (f *tcpForwarder) wait() { f.wg.Wait() }
