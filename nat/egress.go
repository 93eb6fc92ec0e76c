package nat

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"weak"

	"go.uber.org/zap"
)

// DefaultEgressPorts is the port range an Egress uses when
// EgressOptions.Ports is zero: Linux's default ephemeral range, which is also
// the only range inside which the kernel honours IP_LOCAL_PORT_RANGE unless
// net.ipv4.ip_local_port_range is changed.
var DefaultEgressPorts = PortRange{Lo: 32768, Hi: 60999}

const defaultDialTimeout = 10 * time.Second

const defaultKeepAlive = 2 * time.Minute

// exhaustionWarnEvery bounds how often an exhausted slice is logged: under
// exhaustion every new flow fails, and one line per flow would drown the log.
const exhaustionWarnEvery = 10 * time.Second

// ErrPortsExhausted is returned (wrapped) by Egress.DialTCP and
// Egress.ListenUDP when the shard's slice of ports has no port left for the
// requested destination.
var ErrPortsExhausted = errors.New("nat: egress ports exhausted")

// ErrFileReserve is returned (wrapped) by Egress.DialTCP and
// Egress.ListenUDP when the process is so close to its open file limit
// that a new socket would use one of the descriptors kept in reserve
// (EgressOptions.FileReserve).
var ErrFileReserve = errors.New("nat: egress: the open file limit is near; the last descriptors are kept for the admin API")

// DefaultFileReserve is how many descriptors below the open file limit
// egress sockets leave free when EgressOptions.FileReserve is zero.
const DefaultFileReserve = 64

// EgressOptions configures an Egress. The zero value is a usable pool: the
// kernel picks the source address, ports come from DefaultEgressPorts, and
// the instance is the only shard.
type EgressOptions struct {
	// Addrs are the local addresses egress sockets bind to, at most one per
	// family. Empty: the kernel picks the source address per destination
	// (bind to the unspecified address), ports still come from the slice.
	// When Addrs is not empty, a destination whose family has no address
	// here is unreachable (the error matches syscall.ENETUNREACH).
	Addrs []netip.Addr

	// Ports is the whole range shared by all shards; DefaultEgressPorts
	// when zero.
	Ports PortRange

	// Shard and Shards say that this instance is shard Shard of Shards (0
	// of 1 when both are zero). It only ever uses its own contiguous slice
	// of Ports: slice i of n, split as evenly as possible, the first slices
	// one port longer when the range does not divide evenly.
	Shard, Shards int

	// DialTimeout bounds a whole DialTCP, including retries on other
	// ports; 10s when zero.
	DialTimeout time.Duration

	// KeepAlive is how long an egress TCP connection may be idle before
	// the kernel probes the destination [2m]; negative turns probes off.
	// Probes find dead destinations, whose flows would otherwise hold an
	// egress socket, and a file, until the table's idle timeout (days for
	// established TCP). Go's own default of 15 s would have every idle
	// flow probe four times a minute.
	KeepAlive time.Duration

	// ExplicitBind makes the pool bind each socket to a port chosen by its
	// own allocator even where the kernel could pick inside the slice
	// (IP_LOCAL_PORT_RANGE). It is set by tests and used automatically on
	// kernels without IP_LOCAL_PORT_RANGE, and when the slice is not inside
	// the host's ephemeral range (the kernel only narrows that range, it
	// does not leave it).
	ExplicitBind bool

	// FileReserve is how many descriptors below the open file limit
	// (RLIMIT_NOFILE) the pool leaves free [DefaultFileReserve]; negative
	// keeps none. A socket that lands in the reserve is closed at once
	// and the dial fails with ErrFileReserve. See fileGuard for why.
	FileReserve int

	// Logger receives the pool's warnings; nil means no logs.
	Logger *zap.Logger
}

// EgressStats is a point-in-time view of an Egress pool.
type EgressStats struct {
	// Slice is this shard's port range.
	Slice PortRange
	// Addrs has one entry per configured egress address and per other
	// local address that open sockets use, sorted by address.
	Addrs []EgressAddrStats
	// KernelPorts tells whether the kernel picks ports inside the slice
	// (IP_LOCAL_PORT_RANGE) rather than the pool's own allocator.
	KernelPorts bool
	// Exhausted counts dials and listens refused because the slice had no
	// free port for them.
	Exhausted uint64
	// DialErrors counts other failed dials and listens (refused,
	// unreachable, timed out, ...).
	DialErrors uint64
}

// EgressAddrStats counts the open sockets of one local address. Compare
// TCPPorts and UDPPorts with Slice.Len() to see how full the slice is.
type EgressAddrStats struct {
	// Addr is the local address. UDP sockets of a pool without configured
	// addresses are bound to the unspecified address and are counted there.
	Addr netip.Addr
	// TCPPorts is the number of distinct local ports held by open TCP
	// connections, TCPConns the number of those connections; TCPConns is
	// larger when ports are shared by connections to different
	// destinations.
	TCPPorts, TCPConns int
	// UDPPorts is the number of open UDP sockets, each holding its own port.
	UDPPorts int
}

// Egress is a pool of outgoing sockets whose local ports all come from one
// shard's slice of a port range, so that several gateways can share one
// public address without their flows colliding. It is safe for concurrent
// use. An Egress holds no goroutines and needs no Close: the sockets it
// returns belong to the caller, who closes them.
type Egress struct {
	log          *zap.Logger
	slice        PortRange
	v4, v6       netip.Addr // invalid when the family has no configured address
	anyAddr      bool       // no configured addresses: bind to the unspecified address
	dialTimeout  time.Duration
	fileReserve  int // 0: none
	keepAlive    net.KeepAliveConfig
	keepAliveOff time.Duration // -1 when keepAlive is off, as net.Dialer wants it

	// kernelPorts is cleared at runtime if the kernel is ever caught
	// picking a port outside the slice (the ephemeral range was changed
	// under us); from then on the pool binds explicitly.
	kernelPorts atomic.Bool

	exhausted  atomic.Uint64
	dialErrors atomic.Uint64
	warn       rateLimit

	mu sync.Mutex
	// socks tracks the sockets handed out so that Stats can count ports in
	// use and the UDP allocator can skip ports the pool holds. Entries
	// refer to their sockets weakly and are dropped once the socket is
	// closed or collected.
	socks map[*trackedSocket]struct{}
	// udpHeld maps the UDP ports the pool holds, per family, to their
	// sockets.
	udpHeld map[udpSlot]*trackedSocket
	// pruneAt is the size of socks at which registering sweeps it, so that
	// closed sockets do not accumulate when Stats is never called.
	pruneAt int
}

type udpSlot struct {
	v6   bool
	port uint16
}

type trackedSocket struct {
	proto Proto
	local netip.AddrPort
	alive func() bool
}

// NewEgress validates opts, fills in defaults and returns a pool. It checks
// that every address in opts.Addrs belongs to this host and probes once
// whether the kernel supports IP_LOCAL_PORT_RANGE.
func NewEgress(opts EgressOptions) (*Egress, error) {
	e := &Egress{
		log:         opts.Logger,
		dialTimeout: opts.DialTimeout,
		socks:       make(map[*trackedSocket]struct{}),
		udpHeld:     make(map[udpSlot]*trackedSocket),
		pruneAt:     64,
	}
	if e.log == nil {
		e.log = zap.NewNop()
	}
	e.log = e.log.Named("egress")
	if e.dialTimeout == 0 {
		e.dialTimeout = defaultDialTimeout
	}
	if e.dialTimeout < 0 {
		return nil, fmt.Errorf("nat: EgressOptions.DialTimeout %v is negative", opts.DialTimeout)
	}
	switch {
	case opts.FileReserve == 0:
		e.fileReserve = DefaultFileReserve
	case opts.FileReserve > 0:
		e.fileReserve = opts.FileReserve
	}
	switch ka := opts.KeepAlive; {
	case ka < 0:
		e.keepAlive, e.keepAliveOff = net.KeepAliveConfig{Enable: false}, -1
	case ka == 0:
		e.keepAlive = net.KeepAliveConfig{Enable: true, Idle: defaultKeepAlive}
	default:
		e.keepAlive = net.KeepAliveConfig{Enable: true, Idle: ka}
	}

	ports := opts.Ports
	if ports.IsZero() {
		ports = DefaultEgressPorts
	}
	if ports.Lo == 0 || ports.Hi < ports.Lo {
		return nil, fmt.Errorf("nat: EgressOptions.Ports %d-%d is not a range of ports 1-65535", ports.Lo, ports.Hi)
	}
	shard, shards := opts.Shard, opts.Shards
	if shards == 0 {
		shards = 1
	}
	if shards < 1 {
		return nil, fmt.Errorf("nat: EgressOptions.Shards %d must be at least 1", opts.Shards)
	}
	if shard < 0 || shard >= shards {
		return nil, fmt.Errorf("nat: EgressOptions.Shard %d is outside 0-%d (Shards is %d)", shard, shards-1, shards)
	}
	if ports.Len() < shards {
		return nil, fmt.Errorf("nat: EgressOptions.Shards %d leaves empty slices of the %d ports in %s", shards, ports.Len(), ports)
	}
	e.slice = shardSlice(ports, shard, shards)

	for i, a := range opts.Addrs {
		a = a.Unmap()
		switch {
		case !a.IsValid():
			return nil, fmt.Errorf("nat: EgressOptions.Addrs[%d] is not a valid address", i)
		case a.Zone() != "":
			return nil, fmt.Errorf("nat: EgressOptions.Addrs[%d] %s: zoned addresses are not supported", i, a)
		case a.IsUnspecified() || a.IsMulticast():
			return nil, fmt.Errorf("nat: EgressOptions.Addrs[%d] %s is not a unicast address", i, a)
		case a.Is4() && e.v4.IsValid(), a.Is6() && e.v6.IsValid():
			return nil, fmt.Errorf("nat: EgressOptions.Addrs[%d] %s: a second address of its family (at most one per family)", i, a)
		}
		if err := checkLocalAddr(a); err != nil {
			return nil, fmt.Errorf("nat: EgressOptions.Addrs[%d] %s is not usable: %w", i, a, err)
		}
		if a.Is4() {
			e.v4 = a
		} else {
			e.v6 = a
		}
	}
	e.anyAddr = len(opts.Addrs) == 0

	if !opts.ExplicitBind {
		ok, why := kernelPortRangeUsable(e.slice)
		if ok {
			e.kernelPorts.Store(true)
		} else {
			e.log.Info("binding egress ports explicitly", zap.Stringer("slice", e.slice), zap.String("reason", why))
		}
	}
	return e, nil
}

// shardSlice returns slice i of n of r: contiguous, as even as possible, the
// first len%n slices one port longer.
func shardSlice(r PortRange, i, n int) PortRange {
	base, rem := r.Len()/n, r.Len()%n
	lo := int(r.Lo) + i*base + min(i, rem)
	size := base
	if i < rem {
		size++
	}
	return PortRange{Lo: uint16(lo), Hi: uint16(lo + size - 1)}
}

// checkLocalAddr tells early, with the kernel's own words, that an address
// cannot be bound, rather than failing every flow later.
func checkLocalAddr(a netip.Addr) error {
	c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(a, 0)))
	if err != nil {
		return err
	}
	return c.Close()
}

// Slice returns the ports this shard uses.
func (e *Egress) Slice() PortRange { return e.slice }

// localAddr returns the address to bind for a destination of a's family, or
// an error matching ENETUNREACH when the pool has no address of that family.
func (e *Egress) localAddr(a netip.Addr) (netip.Addr, error) {
	if e.anyAddr {
		if a.Is4() {
			return netip.IPv4Unspecified(), nil
		}
		return netip.IPv6Unspecified(), nil
	}
	if a.Is4() && e.v4.IsValid() {
		return e.v4, nil
	}
	if a.Is6() && e.v6.IsValid() {
		return e.v6, nil
	}
	fam := "IPv4"
	if a.Is6() {
		fam = "IPv6"
	}
	return netip.Addr{}, fmt.Errorf("no %s egress address: %w", fam, syscall.ENETUNREACH)
}

func network(proto string, a netip.Addr) string {
	if a.Is4() {
		return proto + "4"
	}
	return proto + "6"
}

// DialTCP opens a TCP connection to dst from a port in the slice, within
// the pool's DialTimeout and ctx. Failures keep the kernel's error: they
// match syscall.ECONNREFUSED, syscall.EHOSTUNREACH, syscall.ENETUNREACH and,
// on timeout, both os.ErrDeadlineExceeded and context.DeadlineExceeded with
// errors.Is. When the slice has no port left for dst the error matches
// ErrPortsExhausted.
func (e *Egress) DialTCP(ctx context.Context, dst netip.AddrPort) (*net.TCPConn, error) {
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	c, err := e.dialTCP(ctx, dst)
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.DeadlineExceeded) {
			err = timeoutError{err}
		}
		return nil, e.failed(fmt.Errorf("nat: egress: dial tcp %s: %w", dst, err))
	}
	e.track(TCP, c.LocalAddr(), tcpAlive(c))
	return c, nil
}

func (e *Egress) dialTCP(ctx context.Context, dst netip.AddrPort) (*net.TCPConn, error) {
	if !dst.Addr().IsValid() || dst.Port() == 0 {
		return nil, errors.New("invalid destination")
	}
	local, err := e.localAddr(dst.Addr())
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, e.dialTimeout)
	defer cancel()

	if e.kernelPorts.Load() {
		c, err := e.dialKernel(ctx, dst, local)
		if err != nil || e.slice.Contains(localPort(c.LocalAddr())) {
			return c, err
		}
		// The ephemeral range changed after the probe and the kernel
		// ignored ours: the port may belong to another shard.
		got := c.LocalAddr().String()
		c.Close()
		if e.kernelPorts.CompareAndSwap(true, false) {
			e.log.Warn("kernel picked an egress port outside the slice, binding explicitly from now on",
				zap.Stringer("slice", e.slice), zap.String("local", got))
		}
	}
	return e.dialExplicit(ctx, dst, local)
}

// dialKernel lets connect(2) pick the port inside the slice, sharing a port
// between connections to different destinations.
func (e *Egress) dialKernel(ctx context.Context, dst netip.AddrPort, local netip.Addr) (*net.TCPConn, error) {
	d := net.Dialer{Control: e.fileGuard(kernelRangeControl(e.slice, true)), KeepAlive: e.keepAliveOff, KeepAliveConfig: e.keepAlive}
	if !e.anyAddr {
		// With IP_BIND_ADDRESS_NO_PORT this bind fixes only the address;
		// the port is chosen by connect, for this destination.
		d.LocalAddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(local, 0))
	}
	c, err := d.DialContext(ctx, network("tcp", dst.Addr()), dst.String())
	if err != nil {
		if syscallErrno(err, "connect") == syscall.EADDRNOTAVAIL {
			return nil, fmt.Errorf("%w in %s: %w", ErrPortsExhausted, e.slice, err)
		}
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// dialExplicit binds each attempt to a port of its own choosing, starting at
// a random one. SO_REUSEADDR lets a port that the pool already uses for
// other destinations be bound again; connect then refuses it
// (EADDRNOTAVAIL) only if that port is already connected to dst.
func (e *Egress) dialExplicit(ctx context.Context, dst netip.AddrPort, local netip.Addr) (*net.TCPConn, error) {
	n := e.slice.Len()
	start := rand.IntN(n)
	var last error
	for i := range n {
		port := uint16(int(e.slice.Lo) + (start+i)%n)
		d := net.Dialer{
			LocalAddr:       net.TCPAddrFromAddrPort(netip.AddrPortFrom(local, port)),
			Control:         e.fileGuard(reuseAddrControl),
			KeepAlive:       e.keepAliveOff,
			KeepAliveConfig: e.keepAlive,
		}
		c, err := d.DialContext(ctx, network("tcp", dst.Addr()), dst.String())
		if err == nil {
			return c.(*net.TCPConn), nil
		}
		if syscallErrno(err, "bind") == syscall.EADDRINUSE || syscallErrno(err, "connect") == syscall.EADDRNOTAVAIL {
			last = err
			continue
		}
		return nil, err
	}
	return nil, fmt.Errorf("%w in %s: %w", ErrPortsExhausted, e.slice, last)
}

// ListenUDP opens an unconnected UDP socket of dst's family, bound to the
// pool's address of that family and a port in the slice. Each socket holds
// its own port. When the slice has no free port the error matches
// ErrPortsExhausted.
func (e *Egress) ListenUDP(ctx context.Context, dst netip.Addr) (*net.UDPConn, error) {
	dst = dst.Unmap()
	c, err := e.listenUDP(ctx, dst)
	if err != nil {
		return nil, e.failed(fmt.Errorf("nat: egress: listen udp for %s: %w", dst, err))
	}
	return c, nil
}

func (e *Egress) listenUDP(ctx context.Context, dst netip.Addr) (*net.UDPConn, error) {
	if !dst.IsValid() {
		return nil, errors.New("invalid destination")
	}
	local, err := e.localAddr(dst)
	if err != nil {
		return nil, err
	}
	if e.kernelPorts.Load() {
		lc := net.ListenConfig{Control: e.fileGuard(kernelRangeControl(e.slice, false))}
		pc, err := lc.ListenPacket(ctx, network("udp", dst), netip.AddrPortFrom(local, 0).String())
		if err != nil {
			if syscallErrno(err, "bind") == syscall.EADDRINUSE {
				return nil, fmt.Errorf("%w in %s: %w", ErrPortsExhausted, e.slice, err)
			}
			return nil, err
		}
		c := pc.(*net.UDPConn)
		if e.slice.Contains(localPort(c.LocalAddr())) {
			e.track(UDP, c.LocalAddr(), udpAlive(c))
			return c, nil
		}
		got := c.LocalAddr().String()
		c.Close()
		if e.kernelPorts.CompareAndSwap(true, false) {
			e.log.Warn("kernel picked an egress port outside the slice, binding explicitly from now on",
				zap.Stringer("slice", e.slice), zap.String("local", got))
		}
	}
	return e.listenExplicit(ctx, dst, local)
}

// listenExplicit binds to a port the pool does not hold, starting at a
// random one; ports held by other programs fail with EADDRINUSE and are
// skipped.
func (e *Egress) listenExplicit(ctx context.Context, dst, local netip.Addr) (*net.UDPConn, error) {
	n := e.slice.Len()
	start := rand.IntN(n)
	lc := net.ListenConfig{Control: e.fileGuard(nil)}
	for i := range n {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		port := uint16(int(e.slice.Lo) + (start+i)%n)
		slot := udpSlot{v6: dst.Is6(), port: port}
		ts := e.claimUDP(slot)
		if ts == nil {
			continue
		}
		pc, err := lc.ListenPacket(ctx, network("udp", dst), netip.AddrPortFrom(local, port).String())
		if err != nil {
			e.releaseUDP(slot, ts)
			if syscallErrno(err, "bind") == syscall.EADDRINUSE {
				continue
			}
			return nil, err
		}
		c := pc.(*net.UDPConn)
		e.mu.Lock()
		ts.local = addrPortOf(c.LocalAddr())
		ts.alive = udpAlive(c)
		e.mu.Unlock()
		return c, nil
	}
	return nil, fmt.Errorf("%w: all %d UDP ports of %s are in use", ErrPortsExhausted, n, e.slice)
}

// claimUDP reserves slot for a socket about to be bound, or returns nil if
// a live socket of the pool holds it. The reservation is alive until the
// bind result is known so that concurrent listens do not race for it.
func (e *Egress) claimUDP(slot udpSlot) *trackedSocket {
	e.mu.Lock()
	defer e.mu.Unlock()
	if held, ok := e.udpHeld[slot]; ok {
		if held.alive() {
			return nil
		}
		delete(e.socks, held)
	}
	ts := &trackedSocket{proto: UDP, alive: func() bool { return true }}
	e.udpHeld[slot] = ts
	e.socks[ts] = struct{}{}
	return ts
}

func (e *Egress) releaseUDP(slot udpSlot, ts *trackedSocket) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.udpHeld[slot] == ts {
		delete(e.udpHeld, slot)
	}
	delete(e.socks, ts)
}

// failed counts and, for exhaustion, reports err.
func (e *Egress) failed(err error) error {
	if errors.Is(err, ErrFileReserve) {
		// Neither the destination's fault nor the slice's; the
		// gateway counts and logs it as a refusal of its own.
		return err
	}
	if !errors.Is(err, ErrPortsExhausted) {
		e.dialErrors.Add(1)
		return err
	}
	e.exhausted.Add(1)
	if ok, suppressed := e.warn.allow(time.Now(), exhaustionWarnEvery); ok {
		e.log.Warn("egress ports exhausted", zap.Stringer("slice", e.slice),
			zap.Int("suppressed", suppressed), zap.Error(err))
	}
	return err
}

// track registers a socket handed to the caller.
func (e *Egress) track(proto Proto, local net.Addr, alive func() bool) {
	ts := &trackedSocket{proto: proto, local: addrPortOf(local), alive: alive}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.socks[ts] = struct{}{}
	if proto == UDP {
		slot := udpSlot{v6: ts.local.Addr().Is6(), port: ts.local.Port()}
		e.udpHeld[slot] = ts
	}
	if len(e.socks) >= e.pruneAt {
		e.pruneLocked()
		e.pruneAt = max(64, 2*len(e.socks))
	}
}

func (e *Egress) pruneLocked() {
	for ts := range e.socks {
		if ts.alive() {
			continue
		}
		delete(e.socks, ts)
		if ts.proto == UDP {
			slot := udpSlot{v6: ts.local.Addr().Is6(), port: ts.local.Port()}
			if e.udpHeld[slot] == ts {
				delete(e.udpHeld, slot)
			}
		}
	}
}

// Stats counts the pool's open sockets. It walks every socket the pool has
// handed out, so call it for monitoring, not per flow.
func (e *Egress) Stats() EgressStats {
	st := EgressStats{
		Slice:       e.slice,
		KernelPorts: e.kernelPorts.Load(),
		Exhausted:   e.exhausted.Load(),
		DialErrors:  e.dialErrors.Load(),
	}
	type portKey struct {
		addr netip.Addr
		port uint16
	}
	byAddr := make(map[netip.Addr]*EgressAddrStats)
	get := func(a netip.Addr) *EgressAddrStats {
		s, ok := byAddr[a]
		if !ok {
			s = &EgressAddrStats{Addr: a}
			byAddr[a] = s
		}
		return s
	}
	for _, a := range []netip.Addr{e.v4, e.v6} {
		if a.IsValid() {
			get(a)
		}
	}
	tcpPorts := make(map[portKey]bool)

	e.mu.Lock()
	e.pruneLocked()
	e.pruneAt = max(64, 2*len(e.socks))
	for ts := range e.socks {
		if !ts.local.IsValid() {
			continue // a UDP reservation whose bind is in progress
		}
		a := ts.local.Addr()
		s := get(a)
		switch ts.proto {
		case TCP:
			s.TCPConns++
			k := portKey{a, ts.local.Port()}
			if !tcpPorts[k] {
				tcpPorts[k] = true
				s.TCPPorts++
			}
		case UDP:
			s.UDPPorts++
		}
	}
	e.mu.Unlock()

	for _, s := range byAddr {
		st.Addrs = append(st.Addrs, *s)
	}
	slices.SortFunc(st.Addrs, func(a, b EgressAddrStats) int { return a.Addr.Compare(b.Addr) })
	return st
}

// tcpAlive and udpAlive report whether a socket is still open without
// keeping it reachable: a connection the caller dropped without closing is
// still closed by its finalizer.
func tcpAlive(c *net.TCPConn) func() bool {
	w := weak.Make(c)
	return func() bool {
		c := w.Value()
		return c != nil && rawOpen(c)
	}
}

func udpAlive(c *net.UDPConn) func() bool {
	w := weak.Make(c)
	return func() bool {
		c := w.Value()
		return c != nil && rawOpen(c)
	}
}

// rawOpen reports whether c's descriptor is still open: Control fails once
// the connection is closed.
func rawOpen(c syscall.Conn) bool {
	rc, err := c.SyscallConn()
	if err != nil {
		return false
	}
	return rc.Control(func(uintptr) {}) == nil
}

func addrPortOf(a net.Addr) netip.AddrPort {
	switch a := a.(type) {
	case *net.TCPAddr:
		ap := a.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	case *net.UDPAddr:
		ap := a.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	return netip.AddrPort{}
}

func localPort(a net.Addr) uint16 { return addrPortOf(a).Port() }

// syscallErrno returns the errno of the failed system call named call in
// err's chain, or 0.
func syscallErrno(err error, call string) syscall.Errno {
	var se *os.SyscallError
	if !errors.As(err, &se) || se.Syscall != call {
		return 0
	}
	var errno syscall.Errno
	if errors.As(se.Err, &errno) {
		return errno
	}
	return 0
}

// timeoutError makes a connect that ran out of time match both
// context.DeadlineExceeded and os.ErrDeadlineExceeded; the net package
// reports one or the other depending on which deadline fired, and callers
// should not need to know.
type timeoutError struct{ err error }

func (e timeoutError) Error() string { return e.err.Error() }
func (e timeoutError) Unwrap() error { return e.err }
func (e timeoutError) Timeout() bool { return true }
func (e timeoutError) Is(target error) bool {
	return target == context.DeadlineExceeded || target == os.ErrDeadlineExceeded
}

// rateLimit lets one event through per period and counts the rest.
type rateLimit struct {
	mu         sync.Mutex
	last       time.Time
	suppressed int
}

// allow reports whether an event at now may be logged, and how many were
// suppressed since the last one that was.
func (r *rateLimit) allow(now time.Time, every time.Duration) (bool, int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.last.IsZero() && now.Sub(r.last) < every {
		r.suppressed++
		return false, 0
	}
	n := r.suppressed
	r.last, r.suppressed = now, 0
	return true, n
}

// fileGuard wraps a socket's Control function so that a socket whose
// descriptor falls in the reserve below the open file limit is refused
// (the net package closes it).
//
// At the limit, the one thing an operator needs is the admin API, to see
// and delete the flows that hold the descriptors; but accept(2) on its
// listener fails with EMFILE like everything else. Flows are what use
// descriptors up, each holding an egress socket, so the reserve is kept
// here, where flows get their descriptors: the kernel hands out the
// lowest free descriptor, so a new socket numbered at or above limit -
// reserve means that every descriptor below that is in use, and the
// reserve is all that is left. Refusing that socket keeps the reserve
// free, with no extra system call and no count to keep in step. The
// alternative, a spare descriptor that the admin listener closes to
// accept when it meets EMFILE, races every other goroutine for the slot
// it frees: at the limit, flows are trying to open sockets all the time,
// and one of them would likely win it.
func (e *Egress) fileGuard(inner func(network, address string, c syscall.RawConn) error) func(network, address string, c syscall.RawConn) error {
	if e.fileReserve <= 0 {
		return inner
	}
	return func(network, address string, c syscall.RawConn) error {
		limit := fileLimit()
		var inReserve bool
		if err := c.Control(func(fd uintptr) {
			inReserve = limit > 0 && int64(fd) >= limit-int64(e.fileReserve)
		}); err != nil {
			return err
		}
		if inReserve {
			return fmt.Errorf("%w (limit %d, reserve %d)", ErrFileReserve, limit, e.fileReserve)
		}
		if inner == nil {
			return nil
		}
		return inner(network, address, c)
	}
}
