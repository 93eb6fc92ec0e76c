// Package edge is the gateway's public face for exposed services: HTTP,
// HTTPS and TCP listeners that route each request or connection to the
// agents registered for its hostname (by Host header, TLS server name, or
// the TCP port), through the tunnel.
//
// For every request or connection the edge finds the hostname, applies
// the hostname's Policy (address lists, rates, paths, authentication), and
// only then asks the registry for a replica and dials it with
// Options.Dial. A dial that fails, and an idempotent request whose
// connection broke before an answer, are tried again on another replica;
// a request that found its kept-alive connection closed before any of it
// was sent is sent again, and counts against no replica.
// HTTP is reverse-proxied without buffering bodies, so WebSocket
// upgrades, server-sent events and large uploads flow through; the origin
// learns the client's address from X-Forwarded-For and Forwarded, which
// the edge sets and never takes from clients, or, on TCP routes, from a
// PROXY protocol v2 header.
//
// The canonical use, in the gateway, is
//
//	e, err := edge.New(edge.Options{
//		Registry: reg,
//		Dial:     srv.DialPeer,
//		HTTPAddr: ":80",
//	})
//	...
//	err = e.Start(ctx)
//	...
//	e.Shutdown(ctx) // or e.Close()
package edge

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/sluice-vpn/sluice/pkg/edge/registry"
	"github.com/sluice-vpn/sluice/pkg/expose"
)

// Defaults for Options.
const (
	DefaultDialTimeout   = 3 * time.Second
	DefaultAttempts      = 3
	DefaultMaxConns      = 4096
	DefaultHeaderTimeout = 10 * time.Second
	DefaultIdleTimeout   = 2 * time.Minute
)

// TCPRoute sends the connections that arrive on a listening address to
// the replicas of a hostname.
type TCPRoute struct {
	// Addr is "[host]:port" to listen on.
	Addr string
	// Hostname names the service.
	Hostname string
}

// Options configures an Edge. Registry and Dial are required; an edge
// with no listening address configured serves nothing, which is allowed.
type Options struct {
	// Registry is the directory of replicas. Required.
	Registry *registry.Registry
	// Dial opens a connection through the tunnel to a replica; in the
	// gateway, (*gateway.Server).DialPeer. Required.
	Dial func(ctx context.Context, dst netip.AddrPort) (net.Conn, error)
	// HTTPAddr and HTTPSAddr are where to listen for plain HTTP and for
	// HTTPS; "" means not at all.
	HTTPAddr  string
	HTTPSAddr string
	// Certificates are the HTTPS listener's, required with HTTPSAddr. The
	// one for a connection is chosen by the name the client asks for:
	// exact names first, then wildcards ("*.example.com"), else the first.
	Certificates []tls.Certificate
	// TCP routes raw TCP listeners to hostnames.
	TCP []TCPRoute
	// Hostnames holds per-hostname policy; a hostname absent here has the
	// zero Policy, which allows everything. SetPolicies replaces it.
	Hostnames map[string]Policy
	// DialTimeout bounds each attempt to connect to a replica
	// [DefaultDialTimeout].
	DialTimeout time.Duration
	// Attempts is how many replicas a retryable request or connection
	// tries [DefaultAttempts].
	Attempts int
	// MaxConns bounds the client connections open on each listener
	// [DefaultMaxConns]; a connection beyond it is closed at once and
	// counted.
	MaxConns int
	// HeaderTimeout bounds the TLS handshake and the reading of a
	// request's header [DefaultHeaderTimeout].
	HeaderTimeout time.Duration
	// IdleTimeout closes a keep-alive client connection after this long
	// without a request [DefaultIdleTimeout].
	IdleTimeout time.Duration
	// Logger receives the edge's logs; nil means none. Refused requests
	// are logged at Debug, exhausted limits at most every few seconds.
	Logger *zap.Logger
}

// Edge is the set of public listeners. Its methods are safe for
// concurrent use.
type Edge struct {
	opts     Options
	log      *zap.Logger
	reg      *registry.Registry
	certs    *certSet // nil without HTTPS
	policies atomic.Pointer[map[string]*policy]
	tcpHosts map[string]bool // the TCP routes' hostnames

	stats     stats
	throttle  logThrottle
	bcrypt    chan struct{} // slots for bcrypt comparisons
	transport *http.Transport
	proxy     *httputil.ReverseProxy
	upstreams upstreams // connections open to replicas

	// ctx is the base of every request and dial; Close cancels it.
	ctx    context.Context
	cancel context.CancelFunc

	policyMu sync.Mutex // serialises SetPolicies

	mu        sync.Mutex
	started   bool
	closed    bool
	stopWatch func() bool // stops Start's context from closing the edge
	listeners []*listener
	servers   []*http.Server
	httpLn    *listener
	httpsLn   *listener
	tcpLns    []*listener
	conns     map[io.Closer]struct{} // client connections and upstream TCP connections
	wg        sync.WaitGroup         // connections open, goroutines running
}

// New checks opts, fills in defaults and builds an edge; it listens on
// nothing until Start.
func New(opts Options) (*Edge, error) {
	if opts.Registry == nil {
		return nil, errors.New("edge: Options.Registry is required")
	}
	if opts.Dial == nil {
		return nil, errors.New("edge: Options.Dial is required")
	}
	for _, d := range []struct {
		name string
		v    *time.Duration
		def  time.Duration
	}{
		{"DialTimeout", &opts.DialTimeout, DefaultDialTimeout},
		{"HeaderTimeout", &opts.HeaderTimeout, DefaultHeaderTimeout},
		{"IdleTimeout", &opts.IdleTimeout, DefaultIdleTimeout},
	} {
		if *d.v < 0 {
			return nil, fmt.Errorf("edge: Options.%s %s is negative", d.name, *d.v)
		}
		if *d.v == 0 {
			*d.v = d.def
		}
	}
	if opts.Attempts < 0 {
		return nil, fmt.Errorf("edge: Options.Attempts %d is negative", opts.Attempts)
	}
	if opts.Attempts == 0 {
		opts.Attempts = DefaultAttempts
	}
	if opts.MaxConns < 0 {
		return nil, fmt.Errorf("edge: Options.MaxConns %d is negative", opts.MaxConns)
	}
	if opts.MaxConns == 0 {
		opts.MaxConns = DefaultMaxConns
	}
	e := &Edge{
		opts:     opts,
		log:      opts.Logger,
		reg:      opts.Registry,
		tcpHosts: make(map[string]bool),
		bcrypt:   make(chan struct{}, max(2, runtime.GOMAXPROCS(0)/2)),
		conns:    make(map[io.Closer]struct{}),
	}
	if e.log == nil {
		e.log = zap.NewNop()
	}
	e.log = e.log.Named("edge")
	if opts.HTTPSAddr != "" {
		certs, err := newCertSet(opts.Certificates)
		if err != nil {
			return nil, err
		}
		e.certs = certs
	} else if len(opts.Certificates) > 0 {
		return nil, errors.New("edge: Options.Certificates given without HTTPSAddr")
	}
	for i, r := range opts.TCP {
		if err := expose.CheckHostname(r.Hostname); err != nil {
			return nil, fmt.Errorf("edge: Options.TCP[%d].Hostname: %w", i, err)
		}
		if _, port, err := net.SplitHostPort(r.Addr); err != nil {
			return nil, fmt.Errorf("edge: Options.TCP[%d].Addr %q: %w", i, r.Addr, err)
		} else if _, err := strconv.ParseUint(port, 10, 16); err != nil {
			return nil, fmt.Errorf("edge: Options.TCP[%d].Addr %q: bad port", i, r.Addr)
		}
		e.tcpHosts[r.Hostname] = true
	}
	pols, err := compilePolicies("Options.Hostnames", opts.Hostnames, nil, e.bcrypt)
	if err != nil {
		return nil, err
	}
	e.policies.Store(&pols)
	e.ctx, e.cancel = context.WithCancel(context.Background())
	e.transport = e.newTransport()
	e.proxy = e.newReverseProxy()
	return e, nil
}

// SetPolicies replaces the per-hostname policies at once: every request
// and connection admitted afterwards sees the new set. Nothing changes if
// one of them is bad. Rate limiters whose rates stay the same keep their
// state.
func (e *Edge) SetPolicies(ps map[string]Policy) error {
	e.policyMu.Lock()
	defer e.policyMu.Unlock()
	pols, err := compilePolicies("Hostnames", ps, *e.policies.Load(), e.bcrypt)
	if err != nil {
		return err
	}
	e.policies.Store(&pols)
	return nil
}

// policy is hostname's policy; nil (allow everything) if it has none.
func (e *Edge) policy(host string) *policy {
	return (*e.policies.Load())[host]
}

// keepsStats reports whether host is one the edge keeps counters for.
func (e *Edge) keepsStats(host string) bool {
	if e.tcpHosts[host] || e.reg.Known(host) {
		return true
	}
	_, ok := (*e.policies.Load())[host]
	return ok
}

// Start listens on every configured address and serves them on
// goroutines that Close stops. If one address cannot be listened on, the
// error names it and nothing is left listening. When ctx is done, the
// edge closes.
func (e *Edge) Start(ctx context.Context) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return errors.New("edge: closed")
	}
	if e.started {
		return errors.New("edge: already started")
	}
	var lc net.ListenConfig
	var lns []*listener
	listen := func(what, addr, name string) (*listener, error) {
		ln, err := lc.Listen(ctx, "tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("edge: listen on %s %s: %w", what, addr, err)
		}
		if name == "" {
			name = "tcp:" + ln.Addr().String()
		}
		l := &listener{Listener: ln, e: e, stats: &listenerStats{name: name}, max: int64(e.opts.MaxConns)}
		lns = append(lns, l)
		return l, nil
	}
	fail := func(err error) error {
		for _, l := range lns {
			l.Listener.Close()
		}
		return err
	}
	var httpLn, httpsLn *listener
	var tcpLns []*listener
	var err error
	if e.opts.HTTPAddr != "" {
		if httpLn, err = listen("HTTPAddr", e.opts.HTTPAddr, "http"); err != nil {
			return fail(err)
		}
	}
	if e.opts.HTTPSAddr != "" {
		if httpsLn, err = listen("HTTPSAddr", e.opts.HTTPSAddr, "https"); err != nil {
			return fail(err)
		}
	}
	for i, r := range e.opts.TCP {
		l, err := listen(fmt.Sprintf("TCP[%d].Addr", i), r.Addr, "")
		if err != nil {
			return fail(err)
		}
		tcpLns = append(tcpLns, l)
	}
	e.started = true
	e.listeners, e.httpLn, e.httpsLn, e.tcpLns = lns, httpLn, httpsLn, tcpLns

	if l := e.httpLn; l != nil {
		srv := e.newServer(l, false)
		e.servers = append(e.servers, srv)
		e.wg.Add(1)
		go func() {
			defer e.wg.Done()
			srv.Serve(framingListener{l})
		}()
	}
	if l := e.httpsLn; l != nil {
		srv := e.newServer(l, true)
		e.servers = append(e.servers, srv)
		e.wg.Add(1)
		go func() {
			defer e.wg.Done()
			srv.ServeTLS(l, "", "")
		}()
	}
	for i, l := range e.tcpLns {
		host := e.opts.TCP[i].Hostname
		e.wg.Add(1)
		go func() {
			defer e.wg.Done()
			e.serveTCP(l, host)
		}()
	}
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		e.sweepUpstreams()
	}()
	e.stopWatch = context.AfterFunc(ctx, func() { e.Close() })
	fields := []zap.Field{}
	for _, l := range lns {
		fields = append(fields, zap.Stringer(l.stats.name, l.Addr()))
	}
	e.log.Info("edge started", fields...)
	return nil
}

// newServer is the http.Server of a listener.
func (e *Edge) newServer(l *listener, useTLS bool) *http.Server {
	srv := &http.Server{
		Handler:           e.handler(l),
		ReadHeaderTimeout: e.opts.HeaderTimeout,
		IdleTimeout:       e.opts.IdleTimeout,
		BaseContext:       func(net.Listener) context.Context { return e.ctx },
		ConnContext:       framingContext,
	}
	// TLS handshake failures and malformed requests are the public
	// internet's normal noise: Debug only.
	if std, err := zap.NewStdLogAt(e.log, zapcore.DebugLevel); err == nil {
		srv.ErrorLog = std
	}
	if useTLS {
		srv.TLSConfig = e.tlsConfig()
		srv.Protocols = new(http.Protocols)
		srv.Protocols.SetHTTP1(true)
		srv.Protocols.SetHTTP2(true)
	}
	return srv
}

func (e *Edge) tlsConfig() *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS12,
		GetCertificate: e.certs.get,
	}
}

// listenerCounters lists the listeners' counters, for metrics.
func (e *Edge) listenerCounters() []*listenerStats {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make([]*listenerStats, len(e.listeners))
	for i, l := range e.listeners {
		out[i] = l.stats
	}
	return out
}

// HTTPAddr is the address the HTTP listener listens on; nil before Start
// or without one.
func (e *Edge) HTTPAddr() net.Addr { return e.addrOf(func() *listener { return e.httpLn }) }

// HTTPSAddr is the address the HTTPS listener listens on; nil before
// Start or without one.
func (e *Edge) HTTPSAddr() net.Addr { return e.addrOf(func() *listener { return e.httpsLn }) }

// TCPAddrs are the addresses the TCP routes listen on, in the order of
// Options.TCP; nil before Start.
func (e *Edge) TCPAddrs() []net.Addr {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []net.Addr
	for _, l := range e.tcpLns {
		out = append(out, l.Addr())
	}
	return out
}

func (e *Edge) addrOf(f func() *listener) net.Addr {
	e.mu.Lock()
	defer e.mu.Unlock()
	if l := f(); l != nil {
		return l.Addr()
	}
	return nil
}

// goroutine runs f on a goroutine that Close waits for; false, and f not
// run, if the edge is closed.
func (e *Edge) goroutine(f func()) bool {
	if !e.enter() {
		return false
	}
	go func() {
		defer e.wg.Done()
		f()
	}()
	return true
}

// enter counts a running handler for Close to wait for; false once the
// edge is closed. e.wg.Done ends it.
func (e *Edge) enter() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return false
	}
	e.wg.Add(1)
	return true
}

// track registers c for Close to close; false (and c closed) if the edge
// is closed already. untrack forgets it.
func (e *Edge) track(c io.Closer) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		c.Close()
		return false
	}
	e.conns[c] = struct{}{}
	return true
}

func (e *Edge) untrack(c io.Closer) {
	e.mu.Lock()
	delete(e.conns, c)
	e.mu.Unlock()
}

// Close stops the listeners, closes every client and upstream
// connection, and waits until every goroutine of the edge has returned.
func (e *Edge) Close() error {
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		e.wg.Wait()
		return nil
	}
	e.closed = true
	if e.stopWatch != nil {
		e.stopWatch()
	}
	e.cancel()
	servers := e.servers
	lns := e.listeners
	conns := make([]io.Closer, 0, len(e.conns))
	for c := range e.conns {
		conns = append(conns, c)
	}
	e.mu.Unlock()

	for _, l := range lns {
		l.Listener.Close()
	}
	for _, srv := range servers {
		srv.Close()
	}
	for _, c := range conns {
		c.Close()
	}
	e.wg.Wait()
	e.transport.CloseIdleConnections()
	e.log.Info("edge closed")
	return nil
}

// Shutdown stops accepting, lets the requests and TCP connections in
// flight finish, then closes the edge. If ctx ends first, whatever is
// still open is closed at once and ctx's error returned.
func (e *Edge) Shutdown(ctx context.Context) error {
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return e.Close()
	}
	servers := e.servers
	tcpLns := e.tcpLns
	e.mu.Unlock()

	for _, l := range tcpLns {
		l.Listener.Close()
	}
	// The HTTP servers close their listeners and idle connections, and
	// wait for the others to go idle: all at once, so that none accepts
	// while another drains.
	errs := make([]error, len(servers))
	var wg sync.WaitGroup
	for i, srv := range servers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = srv.Shutdown(ctx)
		}()
	}
	wg.Wait()
	err := errors.Join(errs...)
	if err == nil {
		// Upgraded connections (WebSockets) and TCP relays are not the
		// HTTP servers' to wait for; wait for them, polling, as
		// http.Server.Shutdown does, until ctx ends.
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for !e.idle() && err == nil {
			select {
			case <-ctx.Done():
				err = ctx.Err()
			case <-tick.C:
			}
		}
	}
	e.Close()
	return err
}

// idle reports whether nothing is in flight: no client or upstream
// connection open. Handlers and relays hold one while they run.
func (e *Edge) idle() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.conns) == 0
}
