package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
)

// HTTPOptions configures NewHTTP. Only Dialer is required.
type HTTPOptions struct {
	// Dialer opens the connections: CONNECT's tunnels and the
	// connections that plain requests are forwarded on. Required.
	Dialer Dialer
	// Credentials, when set, are required of every request in a Basic
	// Proxy-Authorization header; nil means no authentication.
	Credentials *Credentials
	// MaxConns bounds the client connections served at once
	// [DefaultMaxConns].
	MaxConns int
	// DialTimeout bounds opening a proxied connection [DefaultDialTimeout].
	DialTimeout time.Duration
	// HandshakeTimeout bounds the time a client has to send a request's
	// header [DefaultHandshakeTimeout].
	HandshakeTimeout time.Duration
	// IdleTimeout closes a client's keep-alive connection after this long
	// without a request [90s].
	IdleTimeout time.Duration
	// Logger receives the server's logs; nil means none. Failed requests
	// are logged at Debug.
	Logger *zap.Logger
}

// HTTPServer is an HTTP proxy: CONNECT opens a tunnel to HOST:PORT, and a
// request for an absolute http:// URI is forwarded, with the hop-by-hop
// headers (Connection and what it lists, Proxy-Authorization, ...) taken
// out and the bodies streamed both ways.
type HTTPServer struct {
	common
	dialer  Dialer
	creds   *Credentials
	log     *zap.Logger
	srv     *server
	http    *http.Server
	forward *httputil.ReverseProxy
	out     *http.Transport
	live    sync.Map // net.Conn → true: connections net/http serves, counted in srv
}

// NewHTTP returns a server; it serves nothing until Serve.
func NewHTTP(opts HTTPOptions) (*HTTPServer, error) {
	if opts.Dialer == nil {
		return nil, errors.New("proxy: HTTPOptions.Dialer is required")
	}
	if err := opts.Credentials.check("HTTPOptions.Credentials"); err != nil {
		return nil, err
	}
	cm, err := newCommon("HTTPOptions", opts.MaxConns, opts.DialTimeout, opts.HandshakeTimeout)
	if err != nil {
		return nil, err
	}
	if opts.IdleTimeout < 0 {
		return nil, fmt.Errorf("proxy: HTTPOptions.IdleTimeout %s is negative", opts.IdleTimeout)
	}
	if opts.IdleTimeout == 0 {
		opts.IdleTimeout = 90 * time.Second
	}
	log := opts.Logger
	if log == nil {
		log = zap.NewNop()
	}
	log = log.Named("http")
	s := &HTTPServer{common: cm, dialer: opts.Dialer, log: log, srv: newServer(log, cm.maxConns)}
	if opts.Credentials != nil {
		c := *opts.Credentials
		s.creds = &c
	}
	s.out = &http.Transport{
		Proxy: nil,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			ctx, cancel := context.WithTimeout(ctx, s.dialTimeout)
			defer cancel()
			return s.dialer.DialContext(ctx, network, addr)
		},
		// Bytes pass as the origin sent them: no transparent gzip.
		DisableCompression:    true,
		MaxIdleConns:          100,
		IdleConnTimeout:       90 * time.Second,
		ExpectContinueTimeout: time.Second,
	}
	// net/http reports what clients do wrong (bad TLS, broken requests):
	// worth a look when debugging, not otherwise.
	errorLog, err := zap.NewStdLogAt(log, zap.DebugLevel)
	if err != nil {
		return nil, fmt.Errorf("proxy: %w", err)
	}
	s.forward = &httputil.ReverseProxy{
		Rewrite:       passOn,
		Transport:     s.out,
		FlushInterval: -1, // stream: every write reaches the client at once
		ErrorLog:      errorLog,
		ErrorHandler:  s.forwardError,
	}
	s.http = &http.Server{
		Handler:           s,
		ReadHeaderTimeout: cm.handshakeTimeout,
		IdleTimeout:       opts.IdleTimeout,
		ErrorLog:          errorLog,
		ConnState:         s.connState,
	}
	return s, nil
}

// Serve accepts HTTP proxy clients on ln until Close, which closes ln, or
// until ln fails. It returns ErrServerClosed after Close. Serve may be
// called for several listeners at once.
func (s *HTTPServer) Serve(ln net.Listener) error {
	lln, err := s.srv.limit(ln, s.refuse)
	if err != nil {
		ln.Close()
		return err
	}
	err = s.http.Serve(lln)
	if errors.Is(err, http.ErrServerClosed) || s.srv.ctx.Err() != nil {
		return ErrServerClosed
	}
	return err
}

// Close stops the server: it closes its listeners and every connection,
// tunnels included, and waits for its goroutines. It is idempotent.
func (s *HTTPServer) Close() error {
	s.http.Close()
	s.srv.close()
	s.out.CloseIdleConnections()
	return nil
}

// connState counts each connection net/http serves until its last state
// change, so that Close waits for net/http's goroutine as well as for the
// handler: http.Server.Close does not.
func (s *HTTPServer) connState(c net.Conn, st http.ConnState) {
	switch st {
	case http.StateNew:
		if s.srv.enter() {
			s.live.Store(c, true)
		}
	case http.StateHijacked, http.StateClosed:
		if _, ok := s.live.LoadAndDelete(c); ok {
			s.srv.leave()
		}
	}
}

// refuse answers a client over MaxConns with 503 once it has sent its
// request.
func (s *HTTPServer) refuse(c net.Conn) {
	if _, err := http.ReadRequest(bufio.NewReader(c)); err != nil {
		return
	}
	const body = "sluice proxy: too many connections; try again later\n"
	fmt.Fprintf(c, "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\nConnection: close\r\nRetry-After: 1\r\n\r\n%s", len(body), body)
}

// passOn leaves the request as the client wrote it: the URL already names
// the destination, and what ReverseProxy, made for the other direction,
// takes out before Rewrite (forwarding headers, query parameters it cannot
// parse) goes back in. Hop-by-hop headers stay out.
func passOn(pr *httputil.ProxyRequest) {
	pr.Out.URL.RawQuery = pr.In.URL.RawQuery
	for _, h := range []string{"Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"} {
		if v, ok := pr.In.Header[h]; ok {
			pr.Out.Header[h] = v
		}
	}
}

// ServeHTTP implements http.Handler.
func (s *HTTPServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !s.srv.enter() {
		http.Error(w, "shutting down", http.StatusServiceUnavailable)
		return
	}
	defer s.srv.leave()
	if !s.authorized(r) {
		w.Header().Set("Proxy-Authenticate", `Basic realm="sluice"`)
		http.Error(w, "proxy authentication required", http.StatusProxyAuthRequired)
		return
	}
	if r.Method == http.MethodConnect {
		s.connect(w, r)
		return
	}
	if !r.URL.IsAbs() || r.URL.Host == "" {
		http.Error(w, "this is a proxy: ask for an absolute URI (http://host/path), or CONNECT host:port", http.StatusBadRequest)
		return
	}
	if r.URL.Scheme != "http" {
		http.Error(w, "only http:// URIs are forwarded; use CONNECT for "+r.URL.Scheme, http.StatusBadRequest)
		return
	}
	s.forward.ServeHTTP(w, r)
}

// authorized checks the Proxy-Authorization header, if credentials are
// required.
func (s *HTTPServer) authorized(r *http.Request) bool {
	if s.creds == nil {
		return true
	}
	// Proxy-Authorization has Authorization's syntax; a request lets
	// BasicAuth parse it.
	h := r.Header.Get("Proxy-Authorization")
	if h == "" {
		return false
	}
	user, pass, ok := (&http.Request{Header: http.Header{"Authorization": {h}}}).BasicAuth()
	return ok && s.creds.match(user, pass)
}

// connect opens a tunnel: the destination first, so that a failure can
// still be answered with a status, then 200 and the bytes both ways.
func (s *HTTPServer) connect(w http.ResponseWriter, r *http.Request) {
	if _, port, err := net.SplitHostPort(r.Host); err != nil || port == "" {
		http.Error(w, "CONNECT wants host:port", http.StatusBadRequest)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), s.dialTimeout)
	remote, err := s.dialer.DialContext(ctx, "tcp", r.Host)
	cancel()
	if err != nil {
		s.log.Debug("CONNECT failed", zap.String("to", r.Host), zap.Error(err))
		http.Error(w, dialFailure(r.Host, err), httpStatus(err))
		return
	}
	if !s.srv.track(remote) {
		remote.Close()
		http.Error(w, "shutting down", http.StatusServiceUnavailable)
		return
	}
	defer s.srv.untrack(remote)
	client, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		remote.Close()
		http.Error(w, "cannot tunnel over this connection", http.StatusInternalServerError)
		return
	}
	client.SetDeadline(time.Time{})
	if _, err := client.Write([]byte("HTTP/1.1 200 Connection established\r\n\r\n")); err != nil {
		client.Close()
		remote.Close()
		return
	}
	// Bytes the client sent after its request are already in the reader.
	if n := brw.Reader.Buffered(); n > 0 {
		early, _ := brw.Reader.Peek(n)
		if _, err := remote.Write(early); err != nil {
			client.Close()
			remote.Close()
			return
		}
	}
	relay(client, remote)
}

// forwardError answers a request that could not be forwarded.
func (s *HTTPServer) forwardError(w http.ResponseWriter, r *http.Request, err error) {
	if errors.Is(err, context.Canceled) && r.Context().Err() != nil {
		return // the client went away
	}
	s.log.Debug("forwarding failed", zap.String("url", r.URL.String()), zap.Error(err))
	http.Error(w, dialFailure(r.URL.Host, err), httpStatus(err))
}

// httpStatus maps a Dialer's error to a status: 403 for what is not
// allowed, 504 for what did not answer in time, 502 for the rest.
func httpStatus(err error) int {
	switch replyCode(err) {
	case replyNotAllowed:
		return http.StatusForbidden
	case replyTTLExpired:
		return http.StatusGatewayTimeout
	}
	return http.StatusBadGateway
}

// dialFailure says what went wrong for the client to read.
func dialFailure(host string, err error) string {
	msg := err.Error()
	if i := strings.LastIndex(msg, ": "); i >= 0 && replyCode(err) != replyGeneralFailure {
		msg = msg[i+2:] // the cause, without the layers of context
	}
	return fmt.Sprintf("sluice proxy: cannot reach %s: %s", host, msg)
}
