package nat

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"

	"go.uber.org/zap"
)

// UDPListener opens egress UDP sockets. *Egress implements it.
type UDPListener interface {
	// ListenUDP returns an unconnected UDP socket of dst's address family,
	// bound to an egress address and port. It fails with an error matching
	// ErrPortsExhausted when no port is free.
	ListenUDP(ctx context.Context, dst netip.Addr) (*net.UDPConn, error)
}

// Filtering is which remote endpoints may send datagrams back through a
// client's mapping, in the terms of RFC 4787 section 5.
type Filtering uint8

// Filtering behaviours.
const (
	// FilterAddressPortDependent accepts a datagram only from an address
	// and port that the client has sent to and whose flow is live.
	FilterAddressPortDependent Filtering = iota
	// FilterEndpointIndependent accepts datagrams from anyone once the
	// client has a mapping, and makes a flow for each new remote.
	FilterEndpointIndependent
)

func (f Filtering) String() string {
	switch f {
	case FilterAddressPortDependent:
		return "address-port-dependent"
	case FilterEndpointIndependent:
		return "endpoint-independent"
	}
	return fmt.Sprintf("filtering-%d", uint8(f))
}

// ErrUDPClosed is returned by UDPMapper.Send after UDPMapper.Close.
var ErrUDPClosed = errors.New("nat: udp mappings closed")

// UDPOptions configure a UDP mapper.
type UDPOptions struct {
	// Listener opens the egress sockets. Required.
	Listener UDPListener
	// Table holds a flow per client source and destination. Its idle
	// timeouts decide how long destinations and mappings live. Required.
	Table *Table
	// Filtering decides which remotes may send back [address and port
	// dependent].
	Filtering Filtering
	// Deliver writes a datagram to a client: src is the remote, dst the
	// client's address and port in the tunnel. It is called from the
	// mapping's reader goroutine; payload is valid only during the call.
	// Required.
	Deliver func(src, dst netip.AddrPort, payload []byte)
	// DeliverError, if set, hears of the ICMP errors that come back for a
	// client's datagrams (a closed port, an unreachable host, a TTL that
	// ran out on the way): remote and client are the flow's, as for
	// Deliver, and payload is as much of the datagram as came back with
	// the error, valid only during the call. It is called from the
	// mapping's reader goroutine, only for live flows. Nil drops them.
	DeliverError func(remote, client netip.AddrPort, payload []byte, e ICMPError)
	// MaxDatagram is the largest datagram read from a remote [65535]. Each
	// mapping holds a buffer this large; larger datagrams are dropped and
	// counted in UDPStats.Truncated.
	MaxDatagram int
	// Admit, if set, is asked before each new flow (a client source and a
	// destination it has not talked to yet), with the peer and the client
	// source that Send was given, and its release is called when the flow
	// ends: a peer's limits apply to UDP flows as to TCP.
	Admit func(peer string, client netip.AddrPort) (release func(), err error)
	// Logger receives rare, mapping-level messages. Nil means none.
	Logger *zap.Logger
}

// ICMPError is an ICMP error that came back for a datagram or an echo
// request a client sent.
type ICMPError struct {
	// Err is the error the kernel made of it: syscall.ECONNREFUSED for
	// a closed port, syscall.EHOSTUNREACH, syscall.ENETUNREACH, ...
	Err error
	// From sent the ICMP error: the destination itself, or a router on
	// the way.
	From netip.Addr
	// TimeExceeded is set when the packet's TTL (hop limit) ran out at
	// From.
	TimeExceeded bool
}

func (e ICMPError) Error() string {
	if e.TimeExceeded {
		return "time exceeded at " + e.From.String()
	}
	return fmt.Sprintf("%v (from %s)", e.Err, e.From)
}

func (e ICMPError) Unwrap() error { return e.Err }

// UDPStats are cumulative counters of a UDP mapper.
type UDPStats struct {
	Mappings  int    // mappings open now
	Opened    uint64 // mappings opened
	Filtered  uint64 // datagrams from remotes that filtering refused
	Refused   uint64 // datagrams from accepted remotes dropped because the table refused a flow
	Truncated uint64 // datagrams larger than MaxDatagram, dropped
	// Coalesced counts datagrams that left in UDP GSO sends (SendLater).
	Coalesced uint64
	// SendErrors counts SendLater's sends that the socket refused.
	SendErrors uint64
	// ICMPErrors counts the ICMP errors that came back for clients'
	// datagrams on live flows.
	ICMPErrors uint64
}

// UDPMapper carries clients' UDP datagrams out through egress sockets and the
// replies back, with endpoint-independent mapping (RFC 4787 REQ-1): each
// client source address and port gets one egress socket, used for every
// destination it sends to, so that every destination sees the same egress
// address and port.
//
// Each (source, destination) pair is a flow in the table, which counts its
// traffic and expires it when idle. The closer of each flow takes its
// destination out of the mapping, and a mapping closes its socket and stops
// its reader when its last flow ends.
type UDPMapper struct {
	listener   UDPListener
	table      *Table
	filtering  Filtering
	deliver    func(src, dst netip.AddrPort, payload []byte)
	deliverErr func(remote, client netip.AddrPort, payload []byte, e ICMPError)
	admit      func(peer string, client netip.AddrPort) (release func(), err error)
	maxDgram   int
	log        *zap.Logger

	ctx    context.Context // cancelled by Close, to abandon ListenUDP calls
	cancel context.CancelFunc

	// maps holds *udpMapping by client source AddrPort. It is a sync.Map
	// because the key set is read on every datagram and written only when a
	// mapping opens or closes.
	maps sync.Map

	mu     sync.Mutex // serialises opening mappings against Close
	closed bool
	wg     sync.WaitGroup // one per mapping being opened or with a reader

	nmaps                                atomic.Int64
	opened, filtered, refused, truncated atomic.Uint64
	icmpErrors                           atomic.Uint64

	// Mappings with datagrams that SendLater holds, until Flush.
	pmu     sync.Mutex
	pending []*udpMapping
	// noGSO is set once the kernel refused UDP segmentation.
	noGSO                 atomic.Bool
	coalesced, sendErrors atomic.Uint64
	lastErrLog            atomic.Int64
}

// udpMapping is one client source's egress socket and the destinations it
// has live flows to.
type udpMapping struct {
	u      *UDPMapper
	client netip.AddrPort
	peer   string

	// ready is closed once conn and egress, or err, are set.
	ready  chan struct{}
	err    error
	conn   *net.UDPConn
	egress netip.AddrPort

	mu     sync.Mutex
	closed bool
	dests  map[netip.AddrPort]*udpDest // by remote, in the client's address family

	batch udpBatch // what SendLater holds
	// noGSO is set once a batch of this mapping did not fit its route.
	noGSO atomic.Bool
}

// udpDest is one destination of a mapping, with its flow.
type udpDest struct {
	remote  netip.AddrPort
	flow    *Flow  // set under the mapping's mu
	release func() // the flow's place in its peer's limits; nil without Admit
}

func (d *udpDest) done() {
	if d.release != nil {
		d.release()
	}
}

// NewUDP returns a UDP mapper that opens egress sockets from opts.Listener
// and tracks flows in opts.Table.
func NewUDP(opts UDPOptions) (*UDPMapper, error) {
	if opts.Listener == nil {
		return nil, errors.New("nat: UDPOptions.Listener is required")
	}
	if opts.Table == nil {
		return nil, errors.New("nat: UDPOptions.Table is required")
	}
	if opts.Deliver == nil {
		return nil, errors.New("nat: UDPOptions.Deliver is required")
	}
	switch opts.Filtering {
	case FilterAddressPortDependent, FilterEndpointIndependent:
	default:
		return nil, fmt.Errorf("nat: UDPOptions.Filtering is unknown (%d)", opts.Filtering)
	}
	if opts.MaxDatagram < 0 || opts.MaxDatagram > 65535 {
		return nil, fmt.Errorf("nat: UDPOptions.MaxDatagram is outside 0-65535 (%d)", opts.MaxDatagram)
	}
	if opts.MaxDatagram == 0 {
		opts.MaxDatagram = 65535
	}
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	u := &UDPMapper{
		listener:   opts.Listener,
		table:      opts.Table,
		filtering:  opts.Filtering,
		deliver:    opts.Deliver,
		deliverErr: opts.DeliverError,
		admit:      opts.Admit,
		maxDgram:   opts.MaxDatagram,
		log:        opts.Logger.Named("udp"),
	}
	u.ctx, u.cancel = context.WithCancel(context.Background())
	return u, nil
}

// Send sends one datagram from a client of peer, from src (the client's
// address and port in the tunnel) to dst. The first datagram from src opens
// its mapping; the first to each dst inserts a flow in the table. payload is
// not retained.
//
// Errors match, with errors.Is, ErrTableFull when the table refuses the
// flow, ErrPortsExhausted (or whatever the listener returned) when no
// egress socket could be opened, the socket's errno (syscall.EMSGSIZE, …)
// when sending failed, and ErrUDPClosed after Close.
func (u *UDPMapper) Send(peer string, src, dst netip.AddrPort, payload []byte) error {
	// Replies are matched in the client's family; keep destinations in it.
	return u.send(peer, src, sameFamily(dst, src.Addr()), payload, 0)
}

// defaultTTL is the TTL (hop limit) the kernel gives egress packets,
// Linux's default for both.
const defaultTTL = 64

// probeTTL bounds the TTLs that SendTTL sets: below it a datagram is taken
// for one of traceroute's probes (which go to 30 hops by default), from it
// up for an ordinary datagram, which a client's stack starts at 64 or 128
// and which is better off batched with the kernel's default.
const probeTTL = 32

// SendTTL is SendLater for a datagram that is to leave with TTL (IPv6:
// hop limit) ttl, what the client gave it less the gateway's own hop.
// Only a ttl below probeTTL changes anything (0 is unknown): such a
// datagram, one of traceroute's probes, leaves at once and alone with that
// TTL, so that the routers past the gateway answer it (with time exceeded,
// which comes back through DeliverError).
func (u *UDPMapper) SendTTL(peer string, src, dst netip.AddrPort, payload []byte, ttl uint8) error {
	if ttl == 0 || ttl >= probeTTL {
		return u.SendLater(peer, src, dst, payload)
	}
	dst = sameFamily(dst, src.Addr())
	u.flushSource(src) // a NAT keeps a client's datagrams in order
	return u.send(peer, src, dst, payload, ttl)
}

// send is Send, with ttl, if not 0, as the datagram's TTL.
func (u *UDPMapper) send(peer string, src, dst netip.AddrPort, payload []byte, ttl uint8) error {
	for {
		m, err := u.mapping(peer, src, dst)
		if err != nil {
			return err
		}
		f, err := m.flowTo(dst)
		if err != nil {
			return err
		}
		if f == nil {
			// The mapping closed under us: its last flow ended between
			// lookup and use. Open a fresh one.
			continue
		}
		// Counted as seen, like conntrack does, before it leaves: the
		// reply can come back before the write returns.
		f.CountOrig(len(payload), 1)
		if err := m.write(payload, dst, ttl); err != nil {
			if errors.Is(err, net.ErrClosed) {
				// The flow expired after flowTo and took the socket
				// with it.
				continue
			}
			var opErr *net.OpError
			if errors.As(err, &opErr) {
				err = opErr.Err
			}
			return fmt.Errorf("nat: udp %s->%s via %s: %w", src, dst, m.egress, err)
		}
		return nil
	}
}

// write sends one datagram to dst, with TTL ttl unless it is 0. A send
// can fail with the error an ICMP message left for an earlier datagram
// (to any destination): the reader reports that one from the error
// queue, and this datagram is sent again.
func (m *udpMapping) write(payload []byte, dst netip.AddrPort, ttl uint8) error {
	var oob []byte
	if ttl != 0 {
		oob = ttlControl(dst.Addr().Is4(), ttl)
	}
	_, _, err := m.conn.WriteMsgUDPAddrPort(payload, oob, dst)
	if err != nil && asyncSendError(err) {
		_, _, err = m.conn.WriteMsgUDPAddrPort(payload, oob, dst)
	}
	return err
}

// mapping returns src's mapping, opening it if there is none.
func (u *UDPMapper) mapping(peer string, src, dst netip.AddrPort) (*udpMapping, error) {
	v, ok := u.maps.Load(src)
	if !ok {
		u.mu.Lock()
		if u.closed {
			u.mu.Unlock()
			return nil, ErrUDPClosed
		}
		m := &udpMapping{
			u:      u,
			client: src,
			peer:   peer,
			ready:  make(chan struct{}),
			dests:  make(map[netip.AddrPort]*udpDest),
		}
		var loaded bool
		v, loaded = u.maps.LoadOrStore(src, m)
		if !loaded {
			// Added under mu so that Close, which sets closed under mu
			// before waiting, never waits on a counter that is zero
			// while an opener is about to add to it.
			u.wg.Add(1)
			u.mu.Unlock()
			return m, u.open(m, dst)
		}
		u.mu.Unlock()
	}
	m := v.(*udpMapping)
	<-m.ready
	if m.err != nil {
		return nil, m.err
	}
	return m, nil
}

// open gets m its egress socket and starts its reader. On failure m leaves
// the map and the error is given to everyone waiting on it.
func (u *UDPMapper) open(m *udpMapping, dst netip.AddrPort) error {
	conn, err := u.listener.ListenUDP(u.ctx, dst.Addr())
	if err != nil {
		m.err = fmt.Errorf("nat: udp mapping for %s: %w", m.client, err)
		u.maps.CompareAndDelete(m.client, m)
		close(m.ready)
		u.wg.Done()
		return m.err
	}
	m.conn = conn
	if la, ok := conn.LocalAddr().(*net.UDPAddr); ok {
		m.egress = la.AddrPort()
	}
	if err := enableRecvErr(conn, !dst.Addr().Is4()); err != nil {
		u.log.Debug("no ICMP errors on egress socket", zap.Stringer("egress", m.egress), zap.Error(err))
	}
	u.nmaps.Add(1)
	u.opened.Add(1)
	close(m.ready)
	go m.read()
	u.log.Debug("opened mapping", zap.Stringer("client", m.client), zap.String("peer", m.peer),
		zap.Stringer("egress", m.egress))
	return nil
}

// flowTo returns the live flow from m's client to dst, inserting one if
// needed. It returns nil and no error if m has closed.
func (m *udpMapping) flowTo(dst netip.AddrPort) (*Flow, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, nil
	}
	if d := m.dests[dst]; d != nil {
		return d.flow, nil
	}
	d, err := m.addDestLocked(dst)
	if err != nil {
		if len(m.dests) == 0 {
			// A mapping with no flows would never be closed by a closer.
			m.closeLocked()
		}
		return nil, err
	}
	return d.flow, nil
}

// addDestLocked inserts the flow to remote and records it. m.mu is held;
// that is safe because the table never calls closers under its locks.
func (m *udpMapping) addDestLocked(remote netip.AddrPort) (*udpDest, error) {
	d := &udpDest{remote: remote}
	if admit := m.u.admit; admit != nil {
		release, err := admit(m.peer, m.client)
		if err != nil {
			return nil, err
		}
		d.release = release
	}
	f, err := m.u.table.Insert(Key{Proto: UDP, Client: m.client, Dest: remote}, m.peer, func(Reason) { m.drop(d) })
	if err != nil {
		d.done()
		return nil, err // it names the key already
	}
	d.flow = f
	f.SetEgress(m.egress)
	m.dests[remote] = d
	return d, nil
}

// drop is the closer of d's flow: d leaves the mapping, and the mapping
// closes if that was its last destination.
func (m *udpMapping) drop(d *udpDest) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.dests[d.remote] != d {
		return
	}
	delete(m.dests, d.remote)
	d.done()
	if len(m.dests) == 0 && !m.closed {
		m.closeLocked()
	}
}

// closeLocked takes m out of service: no new flows, socket closed (which
// stops the reader). Flows still in m.dests are the caller's to end.
func (m *udpMapping) closeLocked() {
	m.closed = true
	m.u.maps.CompareAndDelete(m.client, m)
	m.conn.Close()
	m.u.nmaps.Add(-1)
	m.u.log.Debug("closed mapping", zap.Stringer("client", m.client), zap.Stringer("egress", m.egress))
}

// shutdown closes m and ends all its flows with reason.
func (m *udpMapping) shutdown(reason Reason) {
	<-m.ready
	if m.err != nil {
		return
	}
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return
	}
	dests := m.dests
	m.dests = make(map[netip.AddrPort]*udpDest)
	m.closeLocked()
	m.mu.Unlock()
	for _, d := range dests {
		d.flow.End(reason)
		d.done()
	}
}

// read delivers datagrams arriving on m's socket to the client until the
// socket is closed.
func (m *udpMapping) read() {
	defer m.u.wg.Done()
	// One byte more than the largest datagram accepted, to tell a datagram
	// that fits from one that was cut.
	buf := make([]byte, m.u.maxDgram+1)
	rc, err := m.conn.SyscallConn()
	if err != nil {
		m.u.log.Warn("egress socket unusable; closing mapping",
			zap.Stringer("client", m.client), zap.Stringer("egress", m.egress), zap.Error(err))
		m.shutdown(ReasonReset)
		return
	}
	r := newUDPReader(rc, buf, m.icmpError)
	for {
		n, from, err := r.next()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// The errors ICMP causes come from the error queue; an error
			// here means the socket is unusable.
			m.u.log.Warn("reading egress socket failed; closing mapping",
				zap.Stringer("client", m.client), zap.Stringer("egress", m.egress), zap.Error(err))
			m.shutdown(ReasonReset)
			return
		}
		if n < 0 {
			continue // only errors, handled
		}
		if n > m.u.maxDgram {
			m.u.truncated.Add(1)
			continue
		}
		remote := sameFamily(from, m.client.Addr())
		f := m.flowFrom(remote)
		if f == nil {
			continue
		}
		f.CountReply(n, 1)
		m.u.deliver(remote, m.client, buf[:n])
	}
}

// icmpError passes on an ICMP error for a datagram of a live flow.
func (m *udpMapping) icmpError(qe queuedError) {
	remote := sameFamily(qe.dst, m.client.Addr())
	m.mu.Lock()
	d := m.dests[remote]
	m.mu.Unlock()
	if d == nil {
		return
	}
	m.u.icmpErrors.Add(1)
	if m.u.deliverErr != nil {
		qe.err.From = sameFamily(netip.AddrPortFrom(qe.err.From, 0), m.client.Addr()).Addr()
		m.u.deliverErr(remote, m.client, qe.payload, qe.err)
	}
}

// flowFrom returns the flow that a datagram from remote belongs to, or nil
// if filtering drops it.
func (m *udpMapping) flowFrom(remote netip.AddrPort) *Flow {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil
	}
	if d := m.dests[remote]; d != nil {
		return d.flow
	}
	if m.u.filtering != FilterEndpointIndependent {
		m.u.filtered.Add(1)
		return nil
	}
	d, err := m.addDestLocked(remote)
	if err != nil {
		m.u.refused.Add(1)
		return nil
	}
	return d.flow
}

// sameFamily writes a remote address the way the client, whose address is
// like, would: a dual-stack socket reports IPv4 peers as IPv4-mapped IPv6,
// and a zone means nothing inside the tunnel.
func sameFamily(ap netip.AddrPort, like netip.Addr) netip.AddrPort {
	a := ap.Addr().WithZone("")
	if like.Is4() {
		a = a.Unmap()
	} else if a.Is4() {
		a = netip.AddrFrom16(a.As16())
	}
	return netip.AddrPortFrom(a, ap.Port())
}

// Stats returns the mapper's counters.
func (u *UDPMapper) Stats() UDPStats {
	return UDPStats{
		Mappings:   int(u.nmaps.Load()),
		Opened:     u.opened.Load(),
		Filtered:   u.filtered.Load(),
		Refused:    u.refused.Load(),
		Truncated:  u.truncated.Load(),
		Coalesced:  u.coalesced.Load(),
		SendErrors: u.sendErrors.Load(),
		ICMPErrors: u.icmpErrors.Load(),
	}
}

// Close closes every mapping, ends their flows with ReasonShutdown, and
// waits for the readers to stop. Send fails with ErrUDPClosed afterwards.
// Close is idempotent and always returns nil.
func (u *UDPMapper) Close() error {
	u.mu.Lock()
	if u.closed {
		u.mu.Unlock()
		u.wg.Wait()
		return nil
	}
	u.closed = true
	u.mu.Unlock()
	u.cancel()
	u.maps.Range(func(_, v any) bool {
		v.(*udpMapping).shutdown(ReasonShutdown)
		return true
	})
	u.wg.Wait()
	return nil
}

var _ UDPListener = (*Egress)(nil)
