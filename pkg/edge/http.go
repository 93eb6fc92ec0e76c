package edge

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/sluice-vpn/sluice/pkg/edge/registry"
)

// reqState travels with a request admitted for proxying, in its context.
type reqState struct {
	host      string
	client    netip.Addr
	stats     *hostStats
	listener  *listener
	stripAuth bool // the Authorization header was the edge's, not the origin's
}

type reqStateKey struct{}

func stateOf(ctx context.Context) *reqState {
	st, _ := ctx.Value(reqStateKey{}).(*reqState)
	return st
}

// handler serves the requests of one HTTP(S) listener.
func (e *Edge) handler(l *listener) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fc := framingOf(r.Context())
		index, why := 0, ""
		if fc != nil {
			index, why = fc.nextRequest()
		}
		if why != "" {
			e.badFraming(w, l, r, why)
			return
		}
		if !e.enter() {
			w.Header().Set("Connection", "close")
			http.Error(w, "sluice: the edge is shutting down", http.StatusServiceUnavailable)
			return
		}
		defer e.wg.Done()
		if fc == nil && r.ProtoMajor == 1 && len(r.TransferEncoding) > 0 {
			// Unwatched (TLS): net/http took the body as chunked and
			// dropped any Content-Length, which is what RFC 9112
			// section 6.1 allows, provided the connection closes
			// after the answer, since a proxy in front may have framed
			// the request by its length instead.
			w.Header().Set("Connection", "close")
		}
		e.serveHTTP(l, w, r, func() bool { return fc != nil && fc.broken(index) })
	})
}

// badFraming refuses a request whose framing is broken, and closes the
// connection after the answer: where the next request would start is
// anybody's guess (RFC 9112 sections 6.3 and 11.2).
func (e *Edge) badFraming(w http.ResponseWriter, l *listener, r *http.Request, why string) {
	e.log.Debug("malformed request framing; closing the connection", zap.String("listener", l.stats.name),
		zap.String("client", r.RemoteAddr), zap.String("why", why))
	w.Header().Set("Connection", "close")
	http.Error(w, "sluice: malformed request: "+why, http.StatusBadRequest)
	// Counted as the hostname's 4xx, as a body found broken later is.
	if host := canonicalHost(r.Host); host != "" && e.keepsStats(host) {
		e.stats.host(host).observe(http.StatusBadRequest, 0)
	}
}

// closeConn ends the client connection of a request whose body turned out
// to be malformed once its answer had started: net/http would otherwise
// keep the connection and read whatever follows the broken body as the
// next request. A response that already says Connection: close ends
// the connection anyway, after its last byte.
func closeConn(w http.ResponseWriter) {
	if strings.EqualFold(w.Header().Get("Connection"), "close") {
		return
	}
	rc := http.NewResponseController(w)
	rc.Flush()
	if c, _, err := rc.Hijack(); err == nil {
		c.Close()
	}
}

// watchedBody is a client's request body that remembers whether reading
// it failed (malformed chunking, a body cut short).
type watchedBody struct {
	io.ReadCloser
	failed atomic.Bool
}

func (b *watchedBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err != nil && err != io.EOF {
		b.failed.Store(true)
	}
	return n, err
}

// maxHostInMessage bounds how much of a client's Host header is echoed
// in an error.
const maxHostInMessage = 100

// serveHTTP serves one request; broken reports whether the connection's
// framing broke at this request or before it, as far as it was read.
func (e *Edge) serveHTTP(l *listener, w http.ResponseWriter, r *http.Request, broken func() bool) {
	start := time.Now()
	host := canonicalHost(r.Host)
	client := remoteIP(r.RemoteAddr)

	if r.TLS != nil {
		// A connection is for the name it was opened for: a request
		// for another host on it (HTTP/2 coalescing, or a client
		// testing its luck with a wildcard certificate) is sent back to
		// open a connection of its own (RFC 9110, 15.5.20).
		if sni := canonicalHost(r.TLS.ServerName); sni != "" && sni != host {
			msg := fmt.Sprintf("sluice: this connection is for %s, not %.*s", sni, maxHostInMessage, host)
			switch {
			case e.keepsStats(host):
				e.refuse(w, r, e.stats.host(host), start, host, client, reasonMisdirected, http.StatusMisdirectedRequest, msg)
			case e.keepsStats(sni):
				e.refuse(w, r, e.stats.host(sni), start, sni, client, reasonMisdirected, http.StatusMisdirectedRequest, msg)
			default:
				l.stats.unknown.Add(1)
				http.Error(w, msg, http.StatusMisdirectedRequest)
			}
			return
		}
	}
	if host == "" || !e.reg.Known(host) {
		e.unknownHost(w, l, host, client)
		return
	}
	st := e.stats.host(host)
	rec := &recorder{ResponseWriter: w}
	defer func() { st.observe(rec.status(), time.Since(start)) }()

	if r.Method == http.MethodConnect {
		http.Error(rec, "sluice: CONNECT is not served here", http.StatusMethodNotAllowed)
		return
	}

	pol := e.policy(host)
	if !pol.admitAddr(client) {
		e.refuse(rec, r, st, time.Time{}, host, client, reasonIP, http.StatusForbidden, "sluice: your address may not reach "+host)
		return
	}
	if limit := pol.admitRate(client); limit != limitNone {
		which := "per_client"
		if limit == limitTotal {
			which = "total"
		}
		e.warnf("rate:"+which+":"+host, "edge: rate limit reached; refusing requests", zap.String("hostname", host), zap.String("limit", which))
		rec.Header().Set("Retry-After", strconv.Itoa(pol.retryAfter(limit)))
		e.refuse(rec, r, st, time.Time{}, host, client, reasonRate, http.StatusTooManyRequests, "sluice: too many requests for "+host)
		return
	}
	if !pol.admitPath(r.URL.Path) {
		e.refuse(rec, r, st, time.Time{}, host, client, reasonPath, http.StatusForbidden, "sluice: path not allowed")
		return
	}
	if pol != nil && pol.auth != nil && !pol.auth.check(r.Context(), r) {
		for _, c := range pol.auth.challenge(host) {
			rec.Header().Add("WWW-Authenticate", c)
		}
		e.refuse(rec, r, st, time.Time{}, host, client, reasonAuth, http.StatusUnauthorized, "sluice: authentication required")
		return
	}

	if r.ProtoMajor == 1 && r.Body != nil && r.Body != http.NoBody {
		// Let an origin answer while it still reads the request body
		// (streaming both ways), as it could if the client reached it
		// directly.
		http.NewResponseController(w).EnableFullDuplex()
	}
	ctx := context.WithValue(r.Context(), reqStateKey{}, &reqState{
		host:      host,
		client:    client,
		stats:     st,
		listener:  l,
		stripAuth: pol != nil && pol.auth != nil,
	})
	out := r.WithContext(ctx)
	var body *watchedBody
	if r.Body != nil && r.Body != http.NoBody {
		body = &watchedBody{ReadCloser: r.Body}
		out.Body = body
	}
	e.proxy.ServeHTTP(rec, out)
	if (body != nil && body.failed.Load()) || broken() {
		closeConn(w)
	}
}

// refuse answers a request that policy refused, and counts it. start, if
// set, is when the request arrived, for a refusal that the caller does
// not observe itself.
func (e *Edge) refuse(w http.ResponseWriter, r *http.Request, st *hostStats, start time.Time, host string, client netip.Addr, reason, code int, msg string) {
	st.refused[reason].Add(1)
	if ce := e.log.Check(zapcore.DebugLevel, "refused"); ce != nil {
		ce.Write(zap.String("hostname", host), zap.String("reason", reasonNames[reason]),
			zap.Stringer("client", client), zap.String("method", r.Method), zap.String("path", r.URL.Path), zap.Int("status", code))
	}
	http.Error(w, msg, code)
	if !start.IsZero() {
		st.observe(code, time.Since(start))
	}
}

// unknownHost answers a request for a hostname that nothing serves.
func (e *Edge) unknownHost(w http.ResponseWriter, l *listener, host string, client netip.Addr) {
	l.stats.unknown.Add(1)
	e.log.Debug("unknown hostname", zap.String("listener", l.stats.name), zap.String("hostname", host), zap.Stringer("client", client))
	if host == "" {
		http.Error(w, "sluice: the request names no host", http.StatusNotFound)
		return
	}
	http.Error(w, fmt.Sprintf("sluice: no service for host %.*s", maxHostInMessage, host), http.StatusNotFound)
}

// canonicalHost is the hostname of a Host header or TLS server name:
// lower case, without port or trailing dot.
func canonicalHost(h string) string {
	if host, _, err := net.SplitHostPort(h); err == nil {
		h = host
	}
	return strings.TrimSuffix(strings.ToLower(h), ".")
}

// remoteIP is the address of a "host:port" remote address; the zero Addr
// if it is not one. The zone of a link-local client is dropped: it names
// the edge's interface, matches no policy prefix, and is no business of
// the origin's.
func remoteIP(remote string) netip.Addr {
	ap, err := netip.ParseAddrPort(remote)
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr().Unmap().WithZone("")
}

// newReverseProxy is the proxy every admitted request goes through.
func (e *Edge) newReverseProxy() *httputil.ReverseProxy {
	std, _ := zap.NewStdLogAt(e.log.Named("proxy"), zapcore.DebugLevel)
	return &httputil.ReverseProxy{
		Rewrite:   e.rewrite,
		Transport: &retrier{e: e, next: e.transport},
		// Write every chunk as it comes: SSE and other streams must
		// not wait in a buffer.
		FlushInterval: -1,
		ErrorHandler:  e.proxyError,
		ErrorLog:      std,
		BufferPool:    copyBuffers{},
	}
}

// rewrite makes the outbound request: to the hostname's replicas (the
// retrier puts the replica's address in the URL), with the original Host,
// and with forwarding headers that the edge sets itself. The edge is the
// trust boundary, so whatever a client sent in X-Forwarded-*, Forwarded
// or X-Real-IP is dropped rather than extended.
//
// Headers whose names hold an underscore are dropped too, all of them,
// as nginx does by default: CGI, PHP, WSGI and Rack origins see headers
// as HTTP_* variables with '-' turned into '_', so X_Forwarded_For would
// reach them as the HTTP_X_FORWARDED_FOR the edge vouches for, or
// overwrite it. Picking out only the names that collide with the edge's
// own would miss those an origin's framework trusts (X_Real_IP,
// X_Forwarded_Host, a proxy's auth header); no standard header has an
// underscore, so dropping them all costs clients nothing legitimate.
func (e *Edge) rewrite(pr *httputil.ProxyRequest) {
	st := stateOf(pr.In.Context())
	out := pr.Out
	out.URL.Scheme = "http"
	out.URL.Host = st.host
	// The edge does not interpret the query, so it passes it as it came.
	out.URL.RawQuery = pr.In.URL.RawQuery
	out.Host = pr.In.Host
	for k := range out.Header {
		if strings.HasPrefix(k, "X-Forwarded-") || strings.IndexByte(k, '_') >= 0 {
			delete(out.Header, k)
		}
	}
	out.Header.Del("Forwarded")
	out.Header.Del("X-Real-Ip")
	if st.stripAuth {
		out.Header.Del("Authorization")
	}
	proto := "http"
	if pr.In.TLS != nil {
		proto = "https"
	}
	if st.client.IsValid() {
		out.Header.Set("X-Forwarded-For", st.client.String())
	}
	out.Header.Set("X-Forwarded-Host", pr.In.Host)
	out.Header.Set("X-Forwarded-Proto", proto)
	out.Header.Set("Forwarded", forwarded(st.client, pr.In.Host, proto))
}

// forwarded is a Forwarded header value (RFC 7239) for one hop.
func forwarded(client netip.Addr, host, proto string) string {
	var b strings.Builder
	if client.IsValid() {
		b.WriteString("for=")
		if client.Is6() {
			// An IPv6 address is a quoted string with brackets
			// (RFC 7239, section 6).
			b.WriteString(`"[` + client.String() + `]"`)
		} else {
			b.WriteString(client.String())
		}
		b.WriteByte(';')
	}
	b.WriteString("host=")
	b.WriteString(tokenOrQuoted(host))
	b.WriteString(";proto=")
	b.WriteString(proto)
	return b.String()
}

// tokenOrQuoted is s as an RFC 9110 token if it is one, else as a quoted
// string.
func tokenOrQuoted(s string) string {
	token := s != ""
	for i := 0; i < len(s) && token; i++ {
		c := s[i]
		token = c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
	}
	if token {
		return s
	}
	var b strings.Builder
	b.WriteByte('"')
	for i := 0; i < len(s); i++ {
		if s[i] == '"' || s[i] == '\\' {
			b.WriteByte('\\')
		}
		b.WriteByte(s[i])
	}
	b.WriteByte('"')
	return b.String()
}

// proxyError answers a request that could not be proxied.
func (e *Edge) proxyError(w http.ResponseWriter, r *http.Request, err error) {
	st := stateOf(r.Context())
	switch {
	case errors.Is(err, registry.ErrUnknownHost):
		// Unregistered since Known said otherwise.
		e.unknownHost(w, st.listener, st.host, st.client)
	case errors.Is(err, registry.ErrNoReplica):
		st.stats.refused[reasonNoReplica].Add(1)
		e.warnf("noreplica:"+st.host, "edge: no replica available", zap.String("hostname", st.host))
		w.Header().Set("Retry-After", "1")
		http.Error(w, "sluice: no replica of "+st.host+" is available", http.StatusServiceUnavailable)
	case r.Context().Err() != nil:
		// The client went away (or the edge is closing): nobody reads
		// this answer. 499, after nginx, keeps it out of the 5xx that
		// count against origins.
		w.WriteHeader(499)
	case errors.As(err, new(*clientBodyError)):
		// The client's own fault; a 5xx would count against an origin
		// that did nothing wrong. What follows a broken body cannot be
		// told apart from a request, so the connection ends here.
		w.Header().Set("Connection", "close")
		http.Error(w, "sluice: the request body could not be read", http.StatusBadRequest)
	default:
		e.log.Debug("proxying failed", zap.String("hostname", st.host), zap.Stringer("client", st.client), zap.Error(err))
		http.Error(w, "sluice: no replica of "+st.host+" answered", http.StatusBadGateway)
	}
}

// recorder notes the status of a response on its way to the client.
// It passes flushing and hijacking through, so the reverse proxy streams
// and upgrades as it would without it.
type recorder struct {
	http.ResponseWriter
	code int
}

func (r *recorder) WriteHeader(code int) {
	if r.code == 0 && code >= 200 {
		r.code = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *recorder) Write(b []byte) (int, error) {
	if r.code == 0 {
		r.code = http.StatusOK
	}
	return r.ResponseWriter.Write(b)
}

// FlushError flushes the response to the client.
func (r *recorder) FlushError() error {
	if r.code == 0 {
		r.code = http.StatusOK
	}
	return http.NewResponseController(r.ResponseWriter).Flush()
}

// Hijack takes the connection over, as an upgrade does; the response is
// then counted as a protocol switch.
func (r *recorder) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	c, brw, err := http.NewResponseController(r.ResponseWriter).Hijack()
	if err == nil && r.code == 0 {
		r.code = http.StatusSwitchingProtocols
	}
	return c, brw, err
}

// Unwrap gives http.ResponseController the ResponseWriter underneath.
func (r *recorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

func (r *recorder) status() int {
	if r.code == 0 {
		return http.StatusOK
	}
	return r.code
}

// copyBuffers recycles the reverse proxy's body copy buffers.
type copyBuffers struct{}

var copyBufferPool = sync.Pool{New: func() any { return make([]byte, 32<<10) }}

func (copyBuffers) Get() []byte { return copyBufferPool.Get().([]byte) }

// Put returns b to the pool; boxing its slice header costs an allocation
// of a few words, against 32 KiB saved.
func (copyBuffers) Put(b []byte) { copyBufferPool.Put(b) }
