package netstack

import (
	"encoding/binary"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// tcpForwarder terminates client TCP connections. gVisor's forwarder runs
// the handshake; this wrapper bounds the handshakes in flight, in all and
// per client (HandshakeAdmitter), ends a handshake the client does not
// complete within Options.HandshakeTimeout, and keeps the start of each
// SYN, which an ICMP error has to quote so that the client matches it to
// its connection attempt.
//
// gVisor's forwarder ignores a SYN whose 4-tuple it still has a request
// for, without telling its caller. So that no slot is ever recorded for a
// SYN that gVisor then ignores, every request is completed with gVisor
// before its slot here is given back: the 4-tuples gVisor has in flight
// are always a subset of f.syns.
type tcpForwarder struct {
	s   *Stack
	fwd *tcp.Forwarder

	mu      sync.Mutex
	syns    map[stack.TransportEndpointID]*handshake // one per handshake in flight
	relays  map[*relay]struct{}
	closing bool
	wg      sync.WaitGroup // handshakes in f.syns and running relays

	// bufs are the relays' copy buffers, taken only by a relay with data
	// in hand: idle connections hold none.
	bufs sync.Pool

	inFlightDrops atomic.Uint64
	refused       atomic.Uint64
	clientRefused atomic.Uint64
	timeouts      atomic.Uint64
	dropLog       logEvery

	// testRefused, if set, runs when a dial has been refused, before the
	// request is completed, so that tests can send a SYN in that window.
	testRefused func(id stack.TransportEndpointID)
}

// handshake is one client handshake in flight, from its SYN until the
// client's connection is relayed or refused.
type handshake struct {
	quote   []byte // for ICMP errors
	release func() // the client's share, from HandshakeAdmitter; may be nil
	// claimed is set by the request that serves the handshake; another
	// request for the same 4-tuple is a stray and is dropped.
	claimed bool
	// abort ends the client handshake early; set while CreateEndpoint runs.
	abort func()
}

func newTCPForwarder(s *Stack) *tcpForwarder {
	f := &tcpForwarder{
		s:      s,
		syns:   make(map[stack.TransportEndpointID]*handshake),
		relays: make(map[*relay]struct{}),
	}
	size := s.opts.RelayBufferSize
	f.bufs.New = func() any { b := make([]byte, size); return &b }
	// The wrapper enforces the in-flight bound. gVisor's own bound must
	// never bite: a SYN it drops would leave a slot here with no request
	// to give it back.
	f.fwd = tcp.NewForwarder(s.stack, 0, 2*s.opts.MaxInFlight+1, f.handleRequest)
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
	switch {
	case f.closing:
		f.mu.Unlock()
		return true
	case f.syns[id] != nil:
		// A retransmission: gVisor ignores it while its request is in
		// flight.
		f.mu.Unlock()
		f.fwd.HandlePacket(id, pkt)
		return true
	case len(f.syns) >= f.s.opts.MaxInFlight:
		f.mu.Unlock()
		f.dropped(id)
		return true
	}
	f.mu.Unlock()

	// The client's share is asked for outside the lock: the handler may
	// log, and a flood from one client should not hold up the others.
	var release func()
	if a, ok := f.s.opts.Handler.(HandshakeAdmitter); ok {
		var err error
		if release, err = a.AdmitHandshake(addrPortFrom(id.RemoteAddress, id.RemotePort)); err != nil {
			f.clientRefused.Add(1)
			f.refuseSYN(id, pkt, th, Classify(err))
			return true
		}
	}

	f.mu.Lock()
	if f.closing || f.syns[id] != nil || len(f.syns) >= f.s.opts.MaxInFlight {
		// Another writer recorded the same SYN, or took the last slot,
		// or the stack began closing, while the lock was free.
		retransmit := !f.closing && f.syns[id] != nil
		f.mu.Unlock()
		if release != nil {
			release()
		}
		if retransmit {
			f.fwd.HandlePacket(id, pkt)
		}
		return true
	}
	hs := &handshake{quote: quote(pkt), release: release}
	f.syns[id] = hs
	f.wg.Add(1)
	f.mu.Unlock()

	if !f.fwd.HandlePacket(id, pkt) {
		// Not a valid SYN after all (bad checksum): gVisor drops it.
		f.finish(id, hs)
	}
	return true
}

// dropped counts a SYN dropped at the global bound, and says so in the
// log now and then, naming the client whose SYN it was.
func (f *tcpForwarder) dropped(id stack.TransportEndpointID) {
	n := f.inFlightDrops.Add(1)
	if f.dropLog.allow() {
		f.s.log.Warn("too many TCP handshakes in flight; dropping SYNs",
			zap.Int("max_in_flight", f.s.opts.MaxInFlight),
			zap.Stringer("client", addrFrom(id.RemoteAddress)), zap.Uint64("dropped_total", n))
	}
}

// refuseSYN answers a SYN that is refused before any request exists for
// it: with a RST, or the ICMP error the refusal calls for.
func (f *tcpForwarder) refuseSYN(id stack.TransportEndpointID, pkt *stack.PacketBuffer, th header.TCP, how Refusal) {
	switch how {
	case RefuseDrop:
	case RefuseReset:
		f.s.sendReset(id, th.SequenceNumber()+1)
	default:
		f.s.sendICMPError(quote(pkt), how, 0)
	}
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

// finish gives back hs's slot and its client's share. The request that
// served hs must have been completed with gVisor before.
func (f *tcpForwarder) finish(id stack.TransportEndpointID, hs *handshake) {
	f.mu.Lock()
	cur := f.syns[id]
	if cur == hs {
		delete(f.syns, id)
	}
	f.mu.Unlock()
	if cur != hs {
		return // shutdown gave it back already
	}
	if hs.release != nil {
		hs.release()
	}
	f.wg.Done()
}

// claim finds the handshake a request serves, or nil if the request is a
// stray (its handshake ended, or another request serves it).
func (f *tcpForwarder) claim(id stack.TransportEndpointID) *handshake {
	f.mu.Lock()
	defer f.mu.Unlock()
	hs := f.syns[id]
	if hs == nil || hs.claimed || f.closing {
		return nil
	}
	hs.claimed = true
	return hs
}

// handleRequest runs on its own goroutine for each new SYN.
func (f *tcpForwarder) handleRequest(r *tcp.ForwarderRequest) {
	id := r.ID()
	hs := f.claim(id)
	if hs == nil {
		// The client retransmits its SYN if it still wants the
		// connection; by then its old handshake is over.
		r.Complete(false)
		return
	}
	src := addrPortFrom(id.RemoteAddress, id.RemotePort)
	dst := addrPortFrom(id.LocalAddress, id.LocalPort)

	upstream, err := f.s.opts.Handler.DialTCP(f.s.ctx, src, dst)
	if err != nil {
		f.refused.Add(1)
		how := Classify(err)
		if f.testRefused != nil {
			f.testRefused(id)
		}
		// Complete first: until gVisor forgets the request, it would
		// ignore a retransmitted SYN that the slot's release lets in.
		r.Complete(how == RefuseReset)
		switch how {
		case RefuseReset, RefuseDrop:
		default:
			f.s.sendICMPError(hs.quote, how, 0)
		}
		f.finish(id, hs)
		return
	}

	var wq waiter.Queue
	ep, tcpErr := f.createEndpoint(r, id, hs, &wq)
	if tcpErr != nil {
		// The client gave up (RST), did not answer in time, or the stack
		// is closing. The destination's connection goes with it.
		r.Complete(true)
		upstream.Close()
		f.finish(id, hs)
		return
	}
	r.Complete(false)
	ep.SocketOptions().SetKeepAlive(true)

	key := connKey{client: src, server: dst}
	rl := &relay{client: gonet.NewTCPConn(&wq, ep), ep: ep, wq: &wq, upstream: upstream,
		bufs: &f.bufs, counts: f.s.link.counts.register(key)}
	if !f.track(rl) {
		f.s.link.counts.unregister(key)
		rl.abort()
		f.finish(id, hs)
		return
	}
	f.finish(id, hs)

	// The relay gets goroutines of its own: this one's stack grew deep in
	// the dial and the handshake, and an idle relay should not keep it.
	go func() {
		rl.run(f.s.log)
		f.s.link.counts.unregister(key)
		f.untrack(rl)
		f.wg.Done()
	}()
}

// createEndpoint runs the client's handshake, for at most
// HandshakeTimeout: gVisor's own SYN-ACK retransmissions give up only
// after about two minutes, and meanwhile the handshake holds its slot and
// the connection to the destination.
func (f *tcpForwarder) createEndpoint(r *tcp.ForwarderRequest, id stack.TransportEndpointID, hs *handshake, wq *waiter.Queue) (tcpip.Endpoint, tcpip.Error) {
	var (
		mu   sync.Mutex
		done bool
	)
	abort := func() {
		mu.Lock()
		defer mu.Unlock()
		if !done {
			f.abortHandshake(id)
		}
	}
	f.mu.Lock()
	if f.closing {
		f.mu.Unlock()
		return nil, &tcpip.ErrConnectionAborted{}
	}
	hs.abort = abort
	f.mu.Unlock()

	timer := time.AfterFunc(f.s.opts.HandshakeTimeout, func() {
		if f.abortHandshakeTimedOut(&mu, &done, id) {
			f.timeouts.Add(1)
		}
	})
	ep, err := r.CreateEndpoint(wq)
	timer.Stop()
	mu.Lock()
	done = true
	mu.Unlock()
	return ep, err
}

// abortHandshakeTimedOut aborts the handshake unless it has finished, and
// says whether it did.
func (f *tcpForwarder) abortHandshakeTimedOut(mu *sync.Mutex, done *bool, id stack.TransportEndpointID) bool {
	mu.Lock()
	defer mu.Unlock()
	return !*done && f.abortHandshake(id)
}

// abortHandshake ends the handshake of id's endpoint if it is still in
// progress, and says whether there was one. CreateEndpoint then returns
// an error.
func (f *tcpForwarder) abortHandshake(id stack.TransportEndpointID) bool {
	proto := header.IPv4ProtocolNumber
	if id.LocalAddress.Len() == header.IPv6AddressSize {
		proto = header.IPv6ProtocolNumber
	}
	ep, ok := f.s.stack.FindTransportEndpoint(proto, tcp.ProtocolNumber, id, nicID).(*tcp.Endpoint)
	if !ok || tcp.EndpointState(ep.State()) != tcp.StateSynRecv {
		return false
	}
	ep.Abort()
	return true
}

func (f *tcpForwarder) track(rl *relay) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closing {
		return false
	}
	f.relays[rl] = struct{}{}
	f.wg.Add(1)
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
	st.InFlightRefused = f.clientRefused.Load()
	st.HandshakeTimeouts = f.timeouts.Load()
}

// shutdown refuses new connections, aborts every relay and every client
// handshake in progress, and gives back the slots of handshakes that no
// request serves yet (their requests, if they come, find nothing to do).
// Dials in progress end when the stack's context is cancelled.
func (f *tcpForwarder) shutdown() {
	f.mu.Lock()
	f.closing = true
	relays := make([]*relay, 0, len(f.relays))
	for rl := range f.relays {
		relays = append(relays, rl)
	}
	var aborts []func()
	var unclaimed []*handshake
	for id, hs := range f.syns {
		switch {
		case hs.abort != nil:
			aborts = append(aborts, hs.abort)
		case !hs.claimed:
			delete(f.syns, id)
			unclaimed = append(unclaimed, hs)
		}
	}
	f.mu.Unlock()
	for _, rl := range relays {
		rl.abort()
	}
	for _, abort := range aborts {
		abort()
	}
	for _, hs := range unclaimed {
		if hs.release != nil {
			hs.release()
		}
		f.wg.Done()
	}
}

// sendReset answers a client's SYN for id with a RST that acknowledges
// it (ack is the SYN's sequence number plus one), from the SYN's
// destination, as a host with nothing listening does.
func (s *Stack) sendReset(id stack.TransportEndpointID, ack uint32) {
	client, server := addrFrom(id.RemoteAddress), addrFrom(id.LocalAddress)
	r, err := s.route(server, client)
	if err != nil {
		return
	}
	defer r.Release()
	b := make([]byte, header.TCPMinimumSize)
	th := header.TCP(b)
	th.Encode(&header.TCPFields{
		SrcPort: id.LocalPort, DstPort: id.RemotePort, AckNum: ack,
		DataOffset: header.TCPMinimumSize, Flags: header.TCPFlagRst | header.TCPFlagAck,
	})
	xsum := header.PseudoHeaderChecksum(tcp.ProtocolNumber, r.LocalAddress(), r.RemoteAddress(), uint16(len(b)))
	binary.BigEndian.PutUint16(b[header.TCPChecksumOffset:], ^checksum.Checksum(b, xsum))
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
		ReserveHeaderBytes: int(r.MaxHeaderLength()),
		Payload:            buffer.MakeWithData(b),
	})
	defer pkt.DecRef()
	pkt.TransportProtocolNumber = tcp.ProtocolNumber
	r.WritePacket(stack.NetworkHeaderParams{Protocol: tcp.ProtocolNumber, TTL: r.DefaultTTL()}, pkt)
}

// logEvery lets a log line through at most once per logInterval.
type logEvery struct{ last atomic.Int64 }

const logInterval = 10 * time.Second

func (l *logEvery) allow() bool {
	now := time.Now().UnixNano()
	last := l.last.Load()
	return now-last >= int64(logInterval) && l.last.CompareAndSwap(last, now)
}

// A HandshakeAdmitter is a Handler that gives each client its own share of
// the TCP handshakes in flight (Options.MaxInFlight bounds them all). The
// stack calls AdmitHandshake for each new SYN, retransmissions aside,
// before DialTCP; release is called once the handshake is over, whether
// the connection was relayed, refused or abandoned. An error refuses the
// SYN at once, as Classify says (a RST, typically), so that a client over
// its share learns it rather than retransmitting.
type HandshakeAdmitter interface {
	AdmitHandshake(src netip.AddrPort) (release func(), err error)
}
