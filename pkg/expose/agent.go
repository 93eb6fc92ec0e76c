package expose

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// Defaults of Options.
const (
	// DefaultMaxConns bounds the connections relayed at once.
	DefaultMaxConns = 1024
	// DefaultDialTimeout bounds connecting to the origin, TLS handshake
	// included.
	DefaultDialTimeout = 10 * time.Second
)

// Tunnel is what the agent needs of a tunnel; *client.Client (pkg/client)
// satisfies it. Both methods have the net package's contracts.
type Tunnel interface {
	// Listen listens for TCP connections on the tunnel's own addresses;
	// the agent asks for ("tcp", ":PORT"), PORT 0 meaning a free one.
	Listen(network, address string) (net.Listener, error)
	// DialContext opens a connection through the tunnel; the agent
	// dials the gateway's control API with it.
	DialContext(ctx context.Context, network, address string) (net.Conn, error)
}

// Options configures New. Tunnel, Control, Hostname and To are required;
// every other field's zero value means a sensible default.
type Options struct {
	// Tunnel carries the agent's listener and its control connections:
	// an *client.Client that is up.
	Tunnel Tunnel
	// Control is the gateway's control API: its tunnel address and
	// ControlPort. ControlAddr finds it in a peer configuration's DNS
	// servers. Only connections from Control's address are relayed,
	// since that is the address the edge connects from.
	Control netip.AddrPort
	// Hostname is the name the edge routes to this agent
	// (CheckHostname).
	Hostname string
	// To is the origin: http://HOST:PORT, https://HOST:PORT or
	// tcp://HOST:PORT, dialled from the host's own network. An https://
	// origin is spoken to in TLS, its certificate verified against
	// HOST unless InsecureSkipVerify. Ports default to 80 and 443 for
	// http and https; a tcp:// origin needs one. http and https origins
	// register as ProtocolHTTP, tcp ones as ProtocolTCP.
	To string
	// Labels describe the replica to the gateway, which may weight the
	// hostname's traffic by them (CheckLabels).
	Labels map[string]string
	// Port is the port of the tunnel address the agent listens on; 0
	// means a free one. The registration carries the real port.
	Port uint16
	// InsecureSkipVerify accepts any certificate from an https://
	// origin.
	InsecureSkipVerify bool
	// RootCAs verify an https:// origin's certificate; nil means the
	// host's roots.
	RootCAs *x509.CertPool
	// MaxConns bounds the connections relayed at once; beyond it new
	// ones are closed at once and counted in Stats.Refused
	// [DefaultMaxConns].
	MaxConns int
	// DialTimeout bounds connecting to the origin [DefaultDialTimeout].
	DialTimeout time.Duration
	// Logger receives registrations, their loss and recovery, and the
	// origin becoming unreachable; nil means no logs.
	Logger *zap.Logger
}

// Stats are an agent's counters and registration state.
type Stats struct {
	// Accepted counts the connections from the gateway taken on for
	// relaying, Active those being relayed now.
	Accepted uint64
	Active   int64
	// Refused counts connections closed at once because MaxConns were
	// being relayed; Foreign those closed at once because they came
	// from an address other than the gateway's.
	Refused uint64
	Foreign uint64
	// OriginErrors counts accepted connections closed because the
	// origin could not be reached (or, for https://, its TLS handshake
	// failed).
	OriginErrors uint64
	// BytesToOrigin and BytesFromOrigin count the bytes relayed each
	// way.
	BytesToOrigin   uint64
	BytesFromOrigin uint64
	// Registrations counts the gateway's successful answers to the
	// registration and its refreshes; RegistrationErrors the attempts
	// that failed.
	Registrations      uint64
	RegistrationErrors uint64
	// Registered reports whether the last attempt succeeded and its
	// lease has not run out since.
	Registered bool
	// Lease is the last lease the gateway gave, LastRegistered when.
	Lease          Lease
	LastRegistered time.Time
	// LastError is the last registration failure; empty if none yet.
	LastError string
	// OriginDown reports that the last connection to the origin (or
	// probe of it) failed; the registration says so to the gateway.
	OriginDown bool
}

// Agent publishes one hostname. Run does the work; the other methods are
// safe to call concurrently with it.
type Agent struct {
	opts    Options
	log     *zap.Logger
	origin  origin
	control *controlClient

	started    atomic.Bool
	attempted  atomic.Bool   // a registration has been sent
	ready      chan struct{} // closed once listening, or once Run returns
	readyOnce  sync.Once
	registered chan struct{} // closed at the first registration
	regOnce    sync.Once

	// backoffMin and backoffMax bound the wait between failed
	// registrations (firstBackoff, maxBackoff; tests shorten them).
	backoffMin, backoffMax time.Duration

	slots chan struct{} // one per connection being relayed
	bufs  sync.Pool     // *[]byte of copyBufSize

	mu       sync.Mutex
	addr     net.Addr
	lease    Lease
	leaseAt  time.Time
	lastOK   bool // the last registration attempt succeeded
	lastErr  string
	closed   bool                   // connections are being closed
	conns    map[io.Closer]struct{} // edge and origin connections, for shutdown
	handlers sync.WaitGroup         // the accept loop and connection handlers

	accepted, refused, foreign, originErrors atomic.Uint64
	toOrigin, fromOrigin                     atomic.Uint64
	registrations, registrationErrors        atomic.Uint64
	active                                   atomic.Int64

	// Rate-limited logging of refusals.
	refusedLogged, foreignLogged atomic.Int64 // unix nanoseconds of the last Warn

	// originDown is what the agent last learned of its origin, from a
	// connection it relayed or a probe; originChanged wakes the lease
	// loop to tell the gateway at once.
	originDown    atomic.Bool
	originChanged chan struct{}
	probeEvery    time.Duration
}

// origin is Options.To, parsed.
type origin struct {
	addr     string      // HOST:PORT to dial
	tls      *tls.Config // nil for a plain origin
	protocol string      // what to register: ProtocolHTTP or ProtocolTCP
}

// New checks opts and builds an agent; nothing happens until Run.
func New(opts Options) (*Agent, error) {
	if opts.Tunnel == nil {
		return nil, errors.New("expose: Options.Tunnel is required (an *client.Client that is up)")
	}
	if !opts.Control.IsValid() || opts.Control.Port() == 0 || opts.Control.Addr().IsUnspecified() {
		return nil, fmt.Errorf("expose: Options.Control %q: want the gateway's tunnel address and port (see ControlAddr)", opts.Control)
	}
	opts.Control = netip.AddrPortFrom(opts.Control.Addr().Unmap(), opts.Control.Port())
	if err := CheckHostname(opts.Hostname); err != nil {
		return nil, fmt.Errorf("expose: Options.Hostname: %w", err)
	}
	if err := CheckLabels(opts.Labels); err != nil {
		return nil, fmt.Errorf("expose: Options.Labels: %w", err)
	}
	o, err := parseOrigin(opts.To, opts.InsecureSkipVerify, opts.RootCAs)
	if err != nil {
		return nil, err
	}
	switch {
	case opts.MaxConns < 0:
		return nil, fmt.Errorf("expose: Options.MaxConns %d: negative", opts.MaxConns)
	case opts.MaxConns == 0:
		opts.MaxConns = DefaultMaxConns
	}
	switch {
	case opts.DialTimeout < 0:
		return nil, fmt.Errorf("expose: Options.DialTimeout %v: negative", opts.DialTimeout)
	case opts.DialTimeout == 0:
		opts.DialTimeout = DefaultDialTimeout
	}
	log := opts.Logger
	if log == nil {
		log = zap.NewNop()
	}
	// The caller keeps its map; ours must not change under the loop.
	labels := make(map[string]string, len(opts.Labels))
	for k, v := range opts.Labels {
		labels[k] = v
	}
	opts.Labels = labels
	a := &Agent{
		opts:       opts,
		log:        log.Named("expose").With(zap.String("hostname", opts.Hostname)),
		origin:     o,
		control:    newControlClient(opts.Tunnel, opts.Control),
		ready:      make(chan struct{}),
		registered: make(chan struct{}),
		backoffMin: firstBackoff,
		backoffMax: maxBackoff,
		slots:      make(chan struct{}, opts.MaxConns),
		conns:      make(map[io.Closer]struct{}),

		originChanged: make(chan struct{}, 1),
		probeEvery:    originProbeInterval,
	}
	a.bufs.New = func() any {
		b := make([]byte, copyBufSize)
		return &b
	}
	return a, nil
}

// CheckTo reports whether to is an origin New accepts: http://HOST:PORT,
// https://HOST:PORT or tcp://HOST:PORT. The error does not name the
// field, so that a command line can name its flag.
func CheckTo(to string) error {
	if _, err := parseOrigin(to, false, nil); err != nil {
		return errors.New(strings.TrimPrefix(err.Error(), fmt.Sprintf("expose: Options.To %q: ", to)))
	}
	return nil
}

// parseOrigin parses Options.To.
func parseOrigin(to string, insecure bool, roots *x509.CertPool) (origin, error) {
	bad := func(why string) (origin, error) {
		return origin{}, fmt.Errorf("expose: Options.To %q: %s", to, why)
	}
	if to == "" {
		return bad("required (http://HOST:PORT, https://HOST:PORT or tcp://HOST:PORT)")
	}
	u, err := url.Parse(to)
	if err != nil {
		return bad(err.Error())
	}
	var o origin
	var defaultPort string
	switch u.Scheme {
	case "http":
		o.protocol, defaultPort = ProtocolHTTP, "80"
	case "https":
		o.protocol, defaultPort = ProtocolHTTP, "443"
	case "tcp":
		o.protocol = ProtocolTCP
	default:
		return bad("want http://HOST:PORT, https://HOST:PORT or tcp://HOST:PORT")
	}
	if u.Opaque != "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" || u.Path != "" && u.Path != "/" {
		return bad("only SCHEME://HOST:PORT: the agent relays connections, it cannot add a path, a query or credentials")
	}
	host, port := u.Hostname(), u.Port()
	if host == "" {
		return bad("no host")
	}
	if port == "" {
		if defaultPort == "" {
			return bad("no port")
		}
		port = defaultPort
	}
	if p, err := strconv.ParseUint(port, 10, 16); err != nil || p == 0 {
		return bad(fmt.Sprintf("port %q: want 1-65535", port))
	}
	o.addr = net.JoinHostPort(host, port)
	if u.Scheme == "https" {
		o.tls = &tls.Config{
			ServerName: host,
			// The edge speaks HTTP/1.1 to the agent, and the agent
			// passes its bytes on untouched: the origin must not
			// pick HTTP/2.
			NextProtos:         []string{"http/1.1"},
			InsecureSkipVerify: insecure,
			RootCAs:            roots,
			MinVersion:         tls.VersionTLS12,
			ClientSessionCache: tls.NewLRUClientSessionCache(64),
		}
	}
	return o, nil
}

// Run listens on the tunnel, registers the hostname and keeps the
// registration fresh, and relays the connections the gateway sends, until
// ctx is done. Then it stops accepting, deregisters (best effort, for at
// most deregisterTimeout), closes the connections still open and returns
// nil once every goroutine it started has ended.
//
// Connections are not drained on the way out: once the gateway has taken
// the replica out of rotation, what the edge still holds open is mostly
// idle keep-alive connections, which a relay of bytes cannot tell from
// busy ones. Requests in flight see their connection close, and the edge
// retries those it can on another replica; to replace an agent without
// that, start the new one first.
//
// Run returns an error if it cannot listen, or if the gateway refuses
// the first registration (a 4xx answer, whose message the error
// carries), so that a misconfigured agent fails at once. Once registered,
// the agent rides out any failure: it retries with backoff and logs
// each change of state. Run may be called once.
func (a *Agent) Run(ctx context.Context) error {
	if !a.started.CompareAndSwap(false, true) {
		return errors.New("expose: Run called twice")
	}
	defer a.readyOnce.Do(func() { close(a.ready) })

	ln, err := a.opts.Tunnel.Listen("tcp", ":"+strconv.Itoa(int(a.opts.Port)))
	if err != nil {
		return fmt.Errorf("expose: listen on the tunnel: %w", err)
	}
	port, err := portOf(ln.Addr())
	if err != nil {
		ln.Close()
		return fmt.Errorf("expose: listen on the tunnel: %w", err)
	}
	a.mu.Lock()
	a.addr = ln.Addr()
	a.mu.Unlock()
	a.readyOnce.Do(func() { close(a.ready) })

	// Connections outlive ctx by the time it takes to deregister.
	serveCtx, stopServing := context.WithCancel(context.WithoutCancel(ctx))
	defer stopServing()
	var closing atomic.Bool
	a.handlers.Add(1)
	go func() {
		defer a.handlers.Done()
		a.acceptLoop(serveCtx, ln, &closing)
	}()

	probeCtx, stopProbing := context.WithCancel(ctx)
	a.handlers.Add(1)
	go func() {
		defer a.handlers.Done()
		a.watchOrigin(probeCtx)
	}()

	reg := Registration{Hostname: a.opts.Hostname, Port: port, Protocol: a.origin.protocol, Labels: a.opts.Labels}
	a.log.Debug("listening on the tunnel", zap.Stringer("addr", ln.Addr()), zap.String("to", a.opts.To))
	runErr := a.keepRegistered(ctx, reg)
	stopProbing()

	// Withdraw first, then stop listening: until the gateway has taken
	// the replica out, the edge may still send it connections.
	a.deregister(ctx, reg)
	closing.Store(true)
	ln.Close()
	a.closeConns()
	stopServing()
	a.handlers.Wait()
	a.control.close()
	return runErr
}

// deregister takes the registration back, if there was one.
func (a *Agent) deregister(ctx context.Context, reg Registration) {
	// A registration sent but not answered (ctx ended meanwhile) may
	// have been taken: withdraw it too.
	if !a.attempted.Load() {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), deregisterTimeout)
	defer cancel()
	err := a.control.deregister(ctx, reg.Hostname, reg.Port)
	a.mu.Lock()
	a.lastOK = false
	a.mu.Unlock()
	var ce *ControlError
	switch {
	case err == nil:
		a.log.Info("deregistered")
	case errors.As(err, &ce) && ce.StatusCode == 404:
		// The lease had run out already.
		a.log.Debug("deregistered: the gateway had no registration", zap.Error(err))
	default:
		a.log.Warn("could not deregister; the gateway drops the registration when its lease runs out", zap.Error(err))
	}
}

// portOf returns the port of a listener's address.
func portOf(addr net.Addr) (uint16, error) {
	if ta, ok := addr.(*net.TCPAddr); ok && ta.Port > 0 && ta.Port <= 65535 {
		return uint16(ta.Port), nil
	}
	ap, err := netip.ParseAddrPort(addr.String())
	if err != nil || ap.Port() == 0 {
		return 0, fmt.Errorf("listener address %q has no port", addr)
	}
	return ap.Port(), nil
}

// Ready is closed once Run listens on the tunnel, when Addr becomes
// valid, or once Run has returned without listening (Addr is then nil).
func (a *Agent) Ready() <-chan struct{} { return a.ready }

// Registered is closed once the gateway has accepted the registration
// for the first time.
func (a *Agent) Registered() <-chan struct{} { return a.registered }

// Addr is the address of the agent's listener on the tunnel, nil until
// Ready is closed (or if Run could not listen).
func (a *Agent) Addr() net.Addr {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.addr
}

// Stats returns the agent's counters and registration state.
func (a *Agent) Stats() Stats {
	a.mu.Lock()
	s := Stats{
		Lease:          a.lease,
		LastRegistered: a.leaseAt,
		LastError:      a.lastErr,
	}
	ttl := seconds(a.lease.TTLSeconds)
	s.Registered = a.lastOK && (ttl <= 0 || time.Since(a.leaseAt) < ttl)
	a.mu.Unlock()
	s.Accepted = a.accepted.Load()
	s.Active = a.active.Load()
	s.Refused = a.refused.Load()
	s.Foreign = a.foreign.Load()
	s.OriginErrors = a.originErrors.Load()
	s.BytesToOrigin = a.toOrigin.Load()
	s.BytesFromOrigin = a.fromOrigin.Load()
	s.Registrations = a.registrations.Load()
	s.RegistrationErrors = a.registrationErrors.Load()
	s.OriginDown = a.originDown.Load()
	return s
}
