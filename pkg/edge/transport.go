package edge

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/netip"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/sluice-vpn/sluice/pkg/expose"
)

// idleConnTimeout is how long a connection to a replica may wait in the
// pool for its next request. Origins close idle keep-alive connections
// themselves, commonly after 5 s (Node's default; others allow 5 to 75
// s), and a request sent as that close is on its way through the tunnel
// fails: a POST cannot be sent again once it may have been read. Letting
// go first, below the shortest common origin timeout, keeps the edge out
// of that race; a new connection costs a dial through the tunnel, which a
// client busier than one request every few seconds never pays.
const idleConnTimeout = 4 * time.Second

// newTransport is the HTTP/1.1 client toward the replicas: one pool of
// connections per replica address, each connection opened with
// Options.Dial. There is no response header timeout, since an origin may
// rightly take its time to start a stream (SSE, long polling).
func (e *Edge) newTransport() *http.Transport {
	return &http.Transport{
		DialContext:           e.dialReplica,
		MaxIdleConns:          1024,
		MaxIdleConnsPerHost:   32,
		IdleConnTimeout:       idleConnTimeout,
		ExpectContinueTimeout: time.Second,
		// Pass the client's Accept-Encoding and the origin's encoding
		// through untouched.
		DisableCompression: true,
		ReadBufferSize:     32 << 10,
		WriteBufferSize:    32 << 10,
	}
}

// dialError marks a failure to connect to a replica: nothing of the
// request reached it, so any request may be tried elsewhere.
type dialError struct{ err error }

func (d *dialError) Error() string { return d.err.Error() }
func (d *dialError) Unwrap() error { return d.err }

// dialReplica is the transport's DialContext; addr is the replica's
// address, which the retrier put in the request's URL.
func (e *Edge) dialReplica(ctx context.Context, _, addr string) (net.Conn, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return nil, &dialError{fmt.Errorf("edge: replica address %q: %w", addr, err)}
	}
	ctx, cancel := context.WithTimeout(ctx, e.opts.DialTimeout)
	defer cancel()
	// The transport lets a dial outlive the request that started it;
	// not the edge.
	stop := context.AfterFunc(e.ctx, cancel)
	defer stop()
	c, err := e.dial(ctx, ap)
	if err != nil {
		return nil, &dialError{fmt.Errorf("edge: dial replica %s: %w", ap, err)}
	}
	return c, nil
}

// maxStaleConns bounds the kept-alive connections that one request may
// find dead (see connTrace) before it gives up. Each is closed once found
// dead and a fresh connection is never stale, so the pool bounds them
// too; this bound holds whatever other requests put back meanwhile.
const maxStaleConns = 8

// connTrace follows one attempt's connection, to tell a kept-alive
// connection that the origin had already closed (it failed before a byte
// of the request went out) from a replica that failed the request.
//
// It counts the bytes written to the connection rather than trusting
// httptrace's WroteHeaders, which fires once the header is in the
// transport's buffer, before anything is sent; so the same test holds for
// a write that fails when the buffer is flushed.
type connTrace struct {
	mu      sync.Mutex
	reused  bool
	conn    *upstreamConn // nil if the transport's connection is not one
	written int64         // conn's bytes written when the attempt got it
}

// gotConn is the attempt's httptrace.ClientTrace.GotConn. The transport
// may call it more than once, retrying on its own; the last one counts.
func (ct *connTrace) gotConn(info httptrace.GotConnInfo) {
	uc, _ := info.Conn.(*upstreamConn)
	ct.mu.Lock()
	defer ct.mu.Unlock()
	ct.reused, ct.conn = info.Reused, uc
	if uc != nil {
		ct.written = uc.written.Load()
	}
}

// stale reports whether the attempt failed on a kept-alive connection
// before writing anything to it: the origin had closed it (or the tunnel
// lost it) while it sat in the pool. Nothing reached the replica, which
// did nothing wrong, so any request may be tried again, as after a failed
// dial. A fresh connection is never stale: its failure is the replica's.
func (ct *connTrace) stale() bool {
	ct.mu.Lock()
	defer ct.mu.Unlock()
	return ct.reused && ct.conn != nil && ct.conn.written.Load() == ct.written
}

// clientBodyError is a failure to read the client's request body
// (malformed chunking, a body cut short): the client's fault, which says
// nothing about the replica and is not worth another attempt.
type clientBodyError struct{ err error }

func (c *clientBodyError) Error() string { return "edge: reading the request body: " + c.err.Error() }
func (c *clientBodyError) Unwrap() error { return c.err }

// retrier sends a request to the hostname's replicas, one after another,
// until one answers, Options.Attempts are used up, or a failure leaves
// the request unsafe to repeat. It tells the registry how each attempt
// went.
type retrier struct {
	e    *Edge
	next http.RoundTripper
}

// RoundTrip implements http.RoundTripper.
func (t *retrier) RoundTrip(req *http.Request) (*http.Response, error) {
	e := t.e
	st := stateOf(req.Context())
	if st == nil {
		return nil, errors.New("edge: request without routing state")
	}
	var body *replayBody
	if req.Body != nil && req.Body != http.NoBody {
		body = &replayBody{r: req.Body, hold: true}
	}
	defer func() {
		if body != nil {
			body.release()
		}
	}()

	var tried []string
	var lastErr error
	stale := 0
	for attempt := 0; attempt < e.opts.Attempts; {
		rep, err := e.reg.Pick(st.host, expose.ProtocolHTTP, tried)
		if err != nil {
			if lastErr != nil {
				return nil, lastErr // no replica left to try
			}
			return nil, err
		}

		ct := &connTrace{}
		out := req.WithContext(httptrace.WithClientTrace(req.Context(), &httptrace.ClientTrace{GotConn: ct.gotConn}))
		u := *req.URL
		u.Host = rep.Addr.String()
		out.URL = &u
		if lastErr != nil && body != nil {
			if body.consumed() {
				// Only reached with GetBody: retryable said so.
				b, err := req.GetBody()
				if err != nil {
					return nil, fmt.Errorf("%w (and the body could not be replayed: %v)", lastErr, err)
				}
				body.release()
				body = &replayBody{r: b, hold: true}
			} else {
				body.reuse()
			}
		}
		if body != nil {
			out.Body = body
		}

		resp, err := t.next.RoundTrip(out)
		if err == nil {
			e.reg.Report(rep.ID, nil)
			return resp, nil
		}
		if req.Context().Err() != nil {
			// The client is gone; the replica did nothing wrong.
			return nil, err
		}
		if body != nil {
			// The transport hands on the body's read error as its
			// own, which would cost the replica its health.
			if berr := body.readErr(); berr != nil {
				e.log.Debug("reading the request body failed", zap.String("hostname", st.host),
					zap.Stringer("client", st.client), zap.Error(berr))
				return nil, &clientBodyError{berr}
			}
		}
		lastErr = fmt.Errorf("edge: %s: replica %s (%s): %w", st.host, rep.ID, rep.Addr, err)
		if ct.stale() && (body == nil || !body.consumed()) && stale < maxStaleConns {
			// Neither the replica's failure nor an attempt: the same
			// replica may be picked again, on a fresh connection.
			stale++
			e.log.Debug("kept-alive connection found closed; sending again", zap.String("hostname", st.host),
				zap.String("replica", rep.ID), zap.Stringer("addr", rep.Addr), zap.Error(err))
			continue
		}
		tried = append(tried, rep.ID)
		attempt++
		e.reg.Report(rep.ID, err)
		st.stats.attemptsFailed.Add(1)
		e.log.Debug("attempt failed", zap.String("hostname", st.host), zap.String("replica", rep.ID),
			zap.Stringer("addr", rep.Addr), zap.Int("attempt", attempt), zap.Error(err))
		if !retryable(req, err, body) {
			return nil, lastErr
		}
	}
	return nil, lastErr
}

// retryable reports whether req may be sent again after failing with
// err. A failed dial sent nothing, so anything may; otherwise only an
// idempotent request whose body, if any, can be produced again.
func retryable(req *http.Request, err error, body *replayBody) bool {
	var de *dialError
	if errors.As(err, &de) && (body == nil || !body.consumed()) {
		return true
	}
	if !idempotent(req) {
		return false
	}
	return body == nil || req.GetBody != nil
}

// idempotent reports whether repeating req does no harm (RFC 9110,
// 9.2.2), or its client says so with an idempotency key, as net/http's
// own retries take it.
func idempotent(req *http.Request) bool {
	switch req.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace, http.MethodPut, http.MethodDelete:
		return true
	}
	_, key := req.Header["Idempotency-Key"]
	_, xkey := req.Header["X-Idempotency-Key"]
	return key || xkey
}

// replayBody is a request body that a failed attempt can hand on to the
// next one if it read none of it. While held, Close with nothing read
// does not close the body underneath (a failed dial closes the body it
// was given); release ends the hold.
type replayBody struct {
	mu     sync.Mutex
	r      io.ReadCloser
	n      int64
	err    error // the first read error other than io.EOF
	hold   bool
	closeQ bool // Close was called during the hold
	closed bool
}

func (b *replayBody) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	b.mu.Lock()
	b.n += int64(n)
	if n == 0 && err == io.EOF {
		b.n++ // an empty body read to its end is spent too
	}
	if err != nil && err != io.EOF && b.err == nil {
		b.err = err
	}
	b.mu.Unlock()
	return n, err
}

// readErr is the error that reading the body underneath failed with, if
// it did.
func (b *replayBody) readErr() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.err
}

func (b *replayBody) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil
	}
	if b.hold && b.n == 0 {
		b.closeQ = true
		return nil
	}
	b.closed = true
	return b.r.Close()
}

// consumed reports whether any of the body was read.
func (b *replayBody) consumed() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.n > 0
}

// reuse readies the body for another attempt.
func (b *replayBody) reuse() {
	b.mu.Lock()
	b.closeQ = false
	b.mu.Unlock()
}

// release ends the hold: a Close that was held back happens now.
func (b *replayBody) release() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.hold = false
	if b.closeQ && !b.closed {
		b.closed = true
		b.r.Close()
	}
}
