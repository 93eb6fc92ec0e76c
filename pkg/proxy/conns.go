package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"

	bytecopy "github.com/sluice-vpn/sluice/relay"
)

// maxRefusing bounds the connections being refused at once because
// MaxConns are being served: refusing the protocol's way means reading the
// client's request first, and beyond this many the rest are just closed.
const maxRefusing = 64

// refuseTimeout bounds how long a refused client gets to send the request
// its refusal answers.
const refuseTimeout = 5 * time.Second

// server is what both proxies share: the limit on client connections, and
// the bookkeeping that lets Close end every connection and wait for every
// goroutine.
type server struct {
	log      *zap.Logger
	slots    chan struct{} // one per client connection being served
	refusing chan struct{} // one per over-limit connection being refused

	ctx    context.Context // done once Close starts
	cancel context.CancelFunc

	mu        sync.Mutex
	closed    bool
	listeners map[net.Listener]struct{}
	conns     map[io.Closer]struct{}
	wg        sync.WaitGroup // connections open, goroutines running
}

func newServer(log *zap.Logger, maxConns int) *server {
	s := &server{
		log:       log,
		slots:     make(chan struct{}, maxConns),
		refusing:  make(chan struct{}, maxRefusing),
		listeners: make(map[net.Listener]struct{}),
		conns:     make(map[io.Closer]struct{}),
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	return s
}

// track registers c for Close to close, and counts it as running until
// untrack. It reports false, having registered nothing, once the server
// is closed.
func (s *server) track(c io.Closer) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	return true
}

func (s *server) untrack(c io.Closer) {
	s.mu.Lock()
	_, ok := s.conns[c]
	delete(s.conns, c)
	s.mu.Unlock()
	if ok {
		s.wg.Done()
	}
}

// goroutine runs f on a goroutine that Close waits for; false if the
// server is closed.
func (s *server) goroutine(f func()) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		f()
	}()
	return true
}

// enter counts a handler as running for Close to wait for; false if the
// server is closed. leave ends it.
func (s *server) enter() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.wg.Add(1)
	return true
}

func (s *server) leave() { s.wg.Done() }

// close closes the listeners and connections, and waits until every
// connection is closed and every goroutine has returned.
func (s *server) close() {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		s.wg.Wait()
		return
	}
	s.closed = true
	s.cancel()
	for ln := range s.listeners {
		ln.Close()
	}
	conns := make([]io.Closer, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
	s.wg.Wait()
}

// limit wraps ln so that Accept hands out at most cap(s.slots) connections
// at once; over the limit, refuse answers the client on a goroutine of
// its own, with a deadline, and the connection is closed.
func (s *server) limit(ln net.Listener, refuse func(net.Conn)) (net.Listener, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, ErrServerClosed
	}
	s.listeners[ln] = struct{}{}
	return &limitedListener{Listener: ln, s: s, refuse: refuse}, nil
}

type limitedListener struct {
	net.Listener
	s      *server
	refuse func(net.Conn)
}

// Accept implements net.Listener.
func (l *limitedListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			if l.s.ctx.Err() != nil {
				return nil, ErrServerClosed
			}
			return nil, err
		}
		select {
		case l.s.slots <- struct{}{}:
			tc := &trackedConn{Conn: c, s: l.s}
			if !l.s.track(tc) {
				<-l.s.slots
				c.Close()
				return nil, ErrServerClosed
			}
			return tc, nil
		default:
			l.s.refuseConn(c, l.refuse)
		}
	}
}

// Close implements net.Listener.
func (l *limitedListener) Close() error {
	l.s.mu.Lock()
	delete(l.s.listeners, l.Listener)
	l.s.mu.Unlock()
	return l.Listener.Close()
}

func (s *server) refuseConn(c net.Conn, refuse func(net.Conn)) {
	select {
	case s.refusing <- struct{}{}:
	default:
		c.Close()
		return
	}
	if !s.track(c) {
		<-s.refusing
		c.Close()
		return
	}
	go func() {
		defer func() { <-s.refusing }()
		defer s.untrack(c)
		defer c.Close()
		c.SetDeadline(time.Now().Add(refuseTimeout))
		refuse(c)
	}()
}

// trackedConn is a client connection that holds a slot until it is
// closed.
type trackedConn struct {
	net.Conn
	s    *server
	once sync.Once
}

// Close implements net.Conn, and frees the slot.
func (c *trackedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() {
		<-c.s.slots
		c.s.untrack(c)
	})
	return err
}

// CloseWrite half-closes the connection if it can, as *net.TCPConn does.
func (c *trackedConn) CloseWrite() error {
	if cw, ok := c.Conn.(bytecopy.CloseWriter); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}

// NetConn is the connection c wraps, which is what a relay resets.
func (c *trackedConn) NetConn() net.Conn { return c.Conn }

// SyscallConn lets a relay wait for the socket to be readable without
// holding a buffer; the wrapper adds nothing to reads.
func (c *trackedConn) SyscallConn() (syscall.RawConn, error) {
	if sc, ok := c.Conn.(syscall.Conn); ok {
		return sc.SyscallConn()
	}
	return nil, errors.ErrUnsupported
}

// acceptLoop calls handle for each connection ln accepts, on a goroutine
// the server waits for, and backs off when accepting fails for lack of
// resources (too many open files) rather than spinning.
func (s *server) acceptLoop(ln net.Listener, handle func(net.Conn)) error {
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if s.ctx.Err() != nil || errors.Is(err, ErrServerClosed) {
				return ErrServerClosed
			}
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Warn("accept failed; retrying", zap.Error(err), zap.Duration("backoff", backoff))
			select {
			case <-time.After(backoff):
			case <-s.ctx.Done():
				return ErrServerClosed
			}
			continue
		}
		backoff = 0
		if !s.goroutine(func() { handle(c) }) {
			c.Close()
			return ErrServerClosed
		}
	}
}

// relay copies both ways between a and b until both directions end,
// passing a half-close on, then closes both. A direction that fails (a
// reset, a closed connection) resets both at once: nobody is left to talk
// to.
func relay(a, b net.Conn) {
	bytecopy.Run(context.Background(), a, b, bytecopy.Options{})
}
