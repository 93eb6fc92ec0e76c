package nat

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
)

// ErrPingUnavailable is returned (wrapped) by Pinger.Echo when the host lets
// the process open neither an unprivileged ICMP socket nor a raw one for the
// destination's family.
var ErrPingUnavailable = errors.New("nat: no ICMP socket available (ping_group_range excludes us and no raw socket permission)")

// ErrPingGroup is returned (wrapped) by Pinger.Echo for a broadcast or
// multicast destination: the Pinger hands back only the reply of the one
// destination it asked, and answers from any number of hosts, the gateway
// host among them, are not that.
var ErrPingGroup = errors.New("nat: ping: broadcast and multicast destinations are not relayed")

// maxICMPMessage is the largest ICMP message an IP datagram can carry.
const maxICMPMessage = 65535

// PingerOptions configures a Pinger.
type PingerOptions struct {
	// Table records one flow per echo session; required. Its idle timeout
	// for ICMP ends sessions and closes their sockets.
	Table *Table

	// Deliver writes an echo reply to a client: src is the destination
	// that answered, dst the client; id and seq are the client's own.
	// It is called from the Pinger's reader goroutines, one reply at a
	// time per socket, and should not block. payload is valid only during
	// the call. Nil drops replies (they are still counted).
	Deliver func(src, dst netip.Addr, id, seq uint16, payload []byte)

	// DeliverError, if set, hears of the ICMP errors that come back for a
	// client's echo requests (a router's time exceeded for traceroute, an
	// unreachable): client and dst are the session's, id the client's
	// identifier, seq and payload the request's as far as the error
	// quotes it (payload may be cut short or empty). Called like Deliver.
	DeliverError func(client, dst netip.Addr, id, seq uint16, payload []byte, e ICMPError)

	// FileReserve is how many descriptors below the open file limit a
	// session's socket leaves free, as EgressOptions.FileReserve does for
	// the egress sockets [DefaultFileReserve]; negative means none. A
	// session that would take one of them is refused with ErrFileReserve.
	FileReserve int

	// Logger receives the Pinger's rare messages; nil means no logs.
	Logger *zap.Logger
}

// Pinger proxies ICMP echo: it sends a client's echo requests from a socket
// of the host and hands back only the echo replies that the destination
// really sent. It never answers on a destination's behalf.
//
// Each session — one client address, destination and client echo
// identifier — is a flow in the table (Proto ICMP, with the identifier as
// both ports). Where the host allows unprivileged ICMP ("ping") sockets, a
// session has its own socket, the kernel chooses the identifier on the wire
// and the client's is restored on replies. Where it does not but raw
// sockets are allowed (CAP_NET_RAW), each family shares one raw socket, the
// Pinger chooses identifiers, and a reader matches replies to sessions by
// source address and identifier. Each family is probed on its first echo.
type Pinger struct {
	reserve int // descriptors left free below the open file limit; <= 0 for none
	table   *Table
	deliver func(src, dst netip.Addr, id, seq uint16, payload []byte)
	errs    func(client, dst netip.Addr, id, seq uint16, payload []byte, e ICMPError)
	log     *zap.Logger
	bufs    sync.Pool // *[]byte of maxICMPMessage, held only while a reply is handled

	// createMu serialises probing families and creating sessions, so that
	// two echoes of a new session do not both create it. Table methods may
	// be called with it held: closers never take it.
	createMu sync.Mutex

	// mu guards the fields below. No table method is called with it held,
	// since the table calls closers, which take it.
	mu       sync.Mutex
	closed   bool
	sessions map[Key]*pingSession
	fams     [2]*pingFamily // IPv4, IPv6; nil until probed

	unavailable sync.Once // logs the first ErrPingUnavailable
	readers     sync.WaitGroup

	// noDatagram makes probes skip unprivileged sockets, so that tests
	// can reach the raw path on hosts that allow both.
	noDatagram bool
	// reprobe, when set, replaces pingReprobe, for tests.
	reprobe time.Duration
}

// pingReprobe is how long a family found unavailable stays so before an
// echo probes it again.
const pingReprobe = 10 * time.Second

func (p *Pinger) reprobeEvery() time.Duration {
	if p.reprobe > 0 {
		return p.reprobe
	}
	return pingReprobe
}

type pingMode uint8

const (
	pingDatagram pingMode = iota + 1
	pingRaw
	pingUnavailable
)

func (m pingMode) String() string {
	switch m {
	case pingDatagram:
		return "datagram"
	case pingRaw:
		return "raw"
	case pingUnavailable:
		return "unavailable"
	}
	return "unprobed"
}

// pingFamily is the outcome of probing one address family.
type pingFamily struct {
	v6     bool
	mode   pingMode
	err    error     // why the family is unavailable
	probed time.Time // an unavailable family is probed again pingReprobe later

	// Raw mode only: the shared socket, and its sessions by destination
	// and wire identifier (guarded by Pinger.mu).
	raw      *icmpSocket
	sessions map[rawKey]*pingSession
}

type rawKey struct {
	remote netip.Addr
	id     uint16
}

// pingSession is one client's echo session with one destination.
type pingSession struct {
	key    Key // client address, destination, client identifier
	fam    *pingFamily
	sock   *icmpSocket // own socket in datagram mode, the family's in raw mode
	wireID uint16      // identifier in requests on the wire
	flow   *Flow
	dead   atomic.Bool
}

// NewPinger returns a Pinger that records sessions in opts.Table. It opens
// no socket until the first echo of each family.
func NewPinger(opts PingerOptions) (*Pinger, error) {
	if opts.Table == nil {
		return nil, errors.New("nat: PingerOptions.Table is required")
	}
	p := &Pinger{
		table:    opts.Table,
		deliver:  opts.Deliver,
		errs:     opts.DeliverError,
		log:      opts.Logger,
		sessions: make(map[Key]*pingSession),
		reserve:  opts.FileReserve,
	}
	if p.reserve == 0 {
		p.reserve = DefaultFileReserve
	}
	if p.log == nil {
		p.log = zap.NewNop()
	}
	p.log = p.log.Named("ping")
	p.bufs.New = func() any {
		b := make([]byte, maxICMPMessage)
		return &b
	}
	return p, nil
}

// Echo sends an echo request from client src (with the client's identifier
// id, sequence number seq and payload) to dst on behalf of peer, creating
// the session's flow on its first request. A reply, if dst sends one, is
// delivered through PingerOptions.Deliver. Echo fails with
// ErrPingUnavailable when the host allows no ICMP socket for dst's family,
// with ErrTableFull when the table is full, and with the socket's error
// (for instance syscall.ENETUNREACH) when the request cannot be sent.
func (p *Pinger) Echo(peer string, src, dst netip.Addr, id, seq uint16, payload []byte) error {
	return p.EchoTTL(peer, src, dst, id, seq, payload, 0)
}

// EchoTTL is Echo for a request that is to leave with TTL (IPv6: hop
// limit) ttl, what the client gave it less the gateway's own hop. As for
// UDPMapper.SendTTL, only a ttl below the kernel's default changes
// anything: traceroute's, whose answers from the routers on the way come
// back through PingerOptions.DeliverError.
func (p *Pinger) EchoTTL(peer string, src, dst netip.Addr, id, seq uint16, payload []byte, ttl uint8) error {
	if ttl >= defaultTTL {
		ttl = 0
	}
	src, dst = src.Unmap(), dst.Unmap().WithZone("")
	if !src.IsValid() || !dst.IsValid() || src.Is4() != dst.Is4() {
		return fmt.Errorf("nat: ping: echo from %s to %s: addresses of one family required", src, dst)
	}
	if dst.IsMulticast() || dst == netip.AddrFrom4([4]byte{255, 255, 255, 255}) {
		return fmt.Errorf("%w: echo to %s", ErrPingGroup, dst)
	}
	if len(payload) > maxICMPMessage-8-40 {
		return fmt.Errorf("nat: ping: echo to %s: payload of %d bytes is too large", dst, len(payload))
	}
	key := Key{Proto: ICMP, Client: netip.AddrPortFrom(src, id), Dest: netip.AddrPortFrom(dst, id)}
	// A session can end between lookup and send (idle expiry, eviction);
	// the request then goes out on a fresh one.
	for range 2 {
		s, err := p.session(peer, key)
		if err != nil {
			return err
		}
		msg, err := echoRequest(dst.Is6(), s.wireID, seq, payload)
		if err != nil {
			return fmt.Errorf("nat: ping: echo to %s: %w", dst, err)
		}
		err = s.sock.sendTo(msg, dst, ttl)
		if err == nil {
			s.flow.CountOrig(len(msg), 1)
			return nil
		}
		if !s.dead.Load() {
			return fmt.Errorf("nat: ping: echo to %s: %w", dst, err)
		}
	}
	return fmt.Errorf("nat: ping: echo to %s: session ended while sending: %w", dst, net.ErrClosed)
}

func echoRequest(v6 bool, id, seq uint16, payload []byte) ([]byte, error) {
	m := icmp.Message{Type: ipv4.ICMPTypeEcho, Body: &icmp.Echo{ID: int(id), Seq: int(seq), Data: payload}}
	if v6 {
		// The kernel computes ICMPv6 checksums for both kinds of socket.
		m.Type = ipv6.ICMPTypeEchoRequest
	}
	return m.Marshal(nil)
}

// session returns the live session for key, creating it if need be.
func (p *Pinger) session(peer string, key Key) (*pingSession, error) {
	if s, err := p.lookup(key); s != nil || err != nil {
		return s, err
	}
	p.createMu.Lock()
	defer p.createMu.Unlock()
	if s, err := p.lookup(key); s != nil || err != nil {
		return s, err
	}
	fam, err := p.family(key.Dest.Addr().Is6())
	if err != nil {
		return nil, err
	}
	s, err := p.newSession(fam, peer, key)
	if err != nil && errors.Is(err, errPingRevoked) {
		// The host took back what the probe found (ping_group_range
		// changed): probe again, and use what is allowed now.
		p.forget(fam)
		if fam, err = p.family(key.Dest.Addr().Is6()); err != nil {
			return nil, err
		}
		s, err = p.newSession(fam, peer, key)
	}
	return s, err
}

// errPingRevoked is a datagram socket refused after the probe allowed it.
var errPingRevoked = errors.New("unprivileged ICMP sockets no longer allowed")

// forget drops a family's probe, so that the next echo probes again.
// Only families without a shared socket are forgotten: a raw socket keeps
// working whatever the sysctl says. Called with createMu held.
func (p *Pinger) forget(fam *pingFamily) {
	if fam.raw != nil {
		return
	}
	i := 0
	if fam.v6 {
		i = 1
	}
	p.mu.Lock()
	if p.fams[i] == fam {
		p.fams[i] = nil
	}
	p.mu.Unlock()
}

func (p *Pinger) lookup(key Key) (*pingSession, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, fmt.Errorf("nat: ping: %w", net.ErrClosed)
	}
	if s := p.sessions[key]; s != nil && !s.dead.Load() {
		return s, nil
	}
	return nil, nil
}

// family returns the probed family, probing it on first use. Called with
// createMu held.
func (p *Pinger) family(v6 bool) (*pingFamily, error) {
	i := 0
	if v6 {
		i = 1
	}
	p.mu.Lock()
	fam := p.fams[i]
	if fam != nil && fam.mode == pingUnavailable && time.Since(fam.probed) >= p.reprobeEvery() {
		// The host may allow it now: ping_group_range is a sysctl that
		// can change at any time, and so can our capabilities.
		fam = nil
	}
	p.mu.Unlock()
	if fam == nil {
		var err error
		if fam, err = p.probe(v6); err != nil {
			return nil, err
		}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			if fam.raw != nil {
				fam.raw.close()
			}
			return nil, fmt.Errorf("nat: ping: %w", net.ErrClosed)
		}
		p.fams[i] = fam
		if fam.raw != nil {
			p.readers.Add(1)
			go p.readRaw(fam)
		}
		p.mu.Unlock()
		p.log.Info("ICMP echo proxy ready", zap.String("family", familyName(v6)), zap.Stringer("mode", fam.mode))
	}
	if fam.mode == pingUnavailable {
		return nil, fmt.Errorf("%w for %s: %w", ErrPingUnavailable, familyName(v6), fam.err)
	}
	return fam, nil
}

// probe finds out which kind of ICMP socket the host lets us open. A
// shortage (descriptors, memory) is returned as an error and leaves the
// family unprobed, since it says nothing about permissions.
func (p *Pinger) probe(v6 bool) (*pingFamily, error) {
	fam := &pingFamily{v6: v6, probed: time.Now()}
	var dgramErr error
	if !p.noDatagram {
		s, err := openICMP(v6, false, 0)
		if err == nil {
			s.close() // sessions open their own; this one only asked
			fam.mode = pingDatagram
			return fam, nil
		}
		if !errNotPermitted(err) {
			return nil, fmt.Errorf("nat: ping: probe %s datagram socket: %w", familyName(v6), err)
		}
		dgramErr = err
	}
	raw, err := openICMP(v6, true, 0)
	if err == nil {
		fam.mode, fam.raw = pingRaw, raw
		fam.sessions = make(map[rawKey]*pingSession)
		return fam, nil
	}
	if !errNotPermitted(err) {
		return nil, fmt.Errorf("nat: ping: probe %s raw socket: %w", familyName(v6), err)
	}
	fam.mode = pingUnavailable
	fam.err = fmt.Errorf("datagram socket: %v; raw socket: %w", dgramErr, err)
	p.unavailable.Do(func() {
		p.log.Warn("ICMP echo unavailable: net.ipv4.ping_group_range excludes this process's group and it may not open raw sockets (CAP_NET_RAW); echo requests from clients get no reply",
			zap.String("family", familyName(v6)), zap.NamedError("datagram_error", dgramErr), zap.NamedError("raw_error", err))
	})
	return fam, nil
}

func familyName(v6 bool) string {
	if v6 {
		return "IPv6"
	}
	return "IPv4"
}

// newSession opens (datagram) or reserves (raw) the session's identifier
// and enters its flow in the table. Called with createMu held.
func (p *Pinger) newSession(fam *pingFamily, peer string, key Key) (*pingSession, error) {
	dst := key.Dest.Addr()
	s := &pingSession{key: key, fam: fam}
	switch fam.mode {
	case pingDatagram:
		sock, err := openICMP(fam.v6, false, p.reserve)
		if err != nil {
			if errNotPermitted(err) {
				err = fmt.Errorf("%w: %w", errPingRevoked, err)
			}
			return nil, fmt.Errorf("nat: ping: open socket for %s: %w", dst, err)
		}
		id, err := sock.localID()
		if err != nil {
			sock.close()
			return nil, fmt.Errorf("nat: ping: socket for %s: %w", dst, err)
		}
		s.sock, s.wireID = sock, id
	case pingRaw:
		// createMu keeps other sessions from taking the identifier before
		// this one is registered below.
		s.sock = fam.raw
		p.mu.Lock()
		id, ok := freeRawID(fam, dst)
		p.mu.Unlock()
		if !ok {
			return nil, fmt.Errorf("nat: ping: every echo identifier towards %s is in use", dst)
		}
		s.wireID = id
	}

	f, err := p.table.Insert(key, peer, func(Reason) { p.drop(s) })
	if err != nil {
		p.drop(s)
		return nil, fmt.Errorf("nat: ping: %w", err)
	}
	s.flow = f
	f.SetEgress(netip.AddrPortFrom(unspecified(fam.v6), s.wireID))

	// Registering under mu publishes s.flow to the raw reader, which looks
	// sessions up under mu.
	p.mu.Lock()
	if p.closed || s.dead.Load() {
		closed := p.closed
		p.mu.Unlock()
		f.End(ReasonShutdown)
		p.drop(s)
		if closed {
			return nil, fmt.Errorf("nat: ping: %w", net.ErrClosed)
		}
		return nil, fmt.Errorf("nat: ping: session for %s ended as it began: %w", dst, net.ErrClosed)
	}
	p.sessions[key] = s
	switch fam.mode {
	case pingDatagram:
		p.readers.Add(1)
		go p.readDatagram(s)
	case pingRaw:
		fam.sessions[rawKey{dst, s.wireID}] = s
	}
	p.mu.Unlock()
	return s, nil
}

// freeRawID picks an identifier not in use towards dst, starting at a
// random one so that identifiers do not repeat predictably. Called with
// p.mu held.
func freeRawID(fam *pingFamily, dst netip.Addr) (uint16, bool) {
	start := uint16(rand.Uint32())
	for i := range 1 << 16 {
		id := start + uint16(i)
		if _, used := fam.sessions[rawKey{dst, id}]; !used {
			return id, true
		}
	}
	return 0, false
}

func unspecified(v6 bool) netip.Addr {
	if v6 {
		return netip.IPv6Unspecified()
	}
	return netip.IPv4Unspecified()
}

// drop releases a session once: its socket in datagram mode, its
// identifier in raw mode. It is the session's closer in the table and does
// not end the flow itself.
func (p *Pinger) drop(s *pingSession) {
	if !s.dead.CompareAndSwap(false, true) {
		return
	}
	p.mu.Lock()
	if p.sessions[s.key] == s {
		delete(p.sessions, s.key)
	}
	if s.fam.mode == pingRaw {
		k := rawKey{s.key.Dest.Addr(), s.wireID}
		if s.fam.sessions[k] == s {
			delete(s.fam.sessions, k)
		}
	}
	p.mu.Unlock()
	if s.fam.mode == pingDatagram && s.sock != nil {
		s.sock.close()
	}
}

// readDatagram hands the replies arriving on a session's own socket to the
// client until the socket is closed.
func (p *Pinger) readDatagram(s *pingSession) {
	defer p.readers.Done()
	dst := s.key.Dest.Addr()
	onErr := func(qe queuedError) {
		if qe.dst.Addr().Unmap() == dst {
			p.echoError(s, qe.payload, qe.err)
		}
	}
	for {
		buf, msg, from, err := s.sock.recv(&p.bufs, onErr)
		if err != nil {
			if !errClosed(err) && !s.dead.Load() {
				// Not a close of ours: the socket is unusable, so the
				// session is over.
				p.log.Debug("ICMP session socket failed", zap.Stringer("flow", s.key), zap.Error(err))
				s.flow.End(ReasonReset)
				p.drop(s)
			}
			return
		}
		// The kernel matched the identifier; the source it does not check.
		if from == dst {
			p.reply(s, msg)
		}
		p.bufs.Put(buf)
	}
}

// readRaw matches every echo reply the host receives to a session of the
// family by source and identifier, and drops the rest, until the socket is
// closed.
func (p *Pinger) readRaw(fam *pingFamily) {
	defer p.readers.Done()
	for {
		buf, msg, from, err := fam.raw.recv(&p.bufs, nil)
		if err != nil {
			if errClosed(err) {
				return
			}
			// Errors reported on a raw socket concern single packets.
			continue
		}
		if id, ok := echoReplyID(fam.v6, msg); ok {
			p.mu.Lock()
			s := fam.sessions[rawKey{from.Unmap(), id}]
			p.mu.Unlock()
			if s != nil && !s.dead.Load() {
				p.reply(s, msg)
			}
		} else if dst, echo, e, ok := quotedEcho(fam.v6, msg); ok {
			// An error about an echo request: ours if its destination
			// and identifier are a session's.
			e.From = from.Unmap()
			p.mu.Lock()
			s := fam.sessions[rawKey{dst, binary.BigEndian.Uint16(echo[4:6])}]
			p.mu.Unlock()
			if s != nil && !s.dead.Load() {
				p.echoError(s, echo, e)
			}
		}
		p.bufs.Put(buf)
	}
}

// echoReplyID returns the identifier of msg if it is a well-formed echo
// reply of the family.
func echoReplyID(v6 bool, msg []byte) (uint16, bool) {
	if len(msg) < 8 {
		return 0, false
	}
	if v6 && msg[0] != byte(ipv6.ICMPTypeEchoReply) || !v6 && msg[0] != byte(ipv4.ICMPTypeEchoReply) || msg[1] != 0 {
		return 0, false
	}
	return uint16(msg[4])<<8 | uint16(msg[5]), true
}

// echoError delivers an ICMP error about one of session s's requests,
// echo being the request as far as it came back.
func (p *Pinger) echoError(s *pingSession, echo []byte, e ICMPError) {
	if p.errs == nil || len(echo) < 8 {
		return
	}
	seq := binary.BigEndian.Uint16(echo[6:8])
	p.errs(s.key.Client.Addr(), s.key.Dest.Addr(), s.key.Client.Port(), seq, echo[8:], e)
}

// reply delivers an echo reply of session s to its client with the
// client's identifier restored.
func (p *Pinger) reply(s *pingSession, msg []byte) {
	if _, ok := echoReplyID(s.fam.v6, msg); !ok {
		return
	}
	seq := uint16(msg[6])<<8 | uint16(msg[7])
	s.flow.CountReply(len(msg), 1)
	if p.deliver != nil {
		p.deliver(s.key.Dest.Addr(), s.key.Client.Addr(), s.key.Client.Port(), seq, msg[8:])
	}
}

// Close ends every session's flow, closes all sockets and waits for the
// readers to stop. Echo fails afterwards. Close is idempotent.
func (p *Pinger) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	sessions := make([]*pingSession, 0, len(p.sessions))
	for _, s := range p.sessions {
		sessions = append(sessions, s)
	}
	fams := p.fams
	p.mu.Unlock()

	for _, s := range sessions {
		s.flow.End(ReasonShutdown)
		p.drop(s)
	}
	for _, fam := range fams {
		if fam != nil && fam.raw != nil {
			fam.raw.close()
		}
	}
	p.readers.Wait()
	return nil
}
