package relay

import (
	"crypto/tls"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
)

// CloseWriter is a connection that can half-close: no more writes, the
// peer reads an EOF, reads go on.
type CloseWriter interface {
	CloseWrite() error
}

// Aborter is a connection that can be reset, its peer told at once that
// the connection is gone (a TCP RST). Abort need not close the
// connection: the relay closes it after.
type Aborter interface {
	Abort()
}

// ReadWaiter is a connection that can wait for data without a buffer:
// WaitReadable returns once a Read would not block (data, an EOF or an
// error is there), or with an error once the connection is closed.
type ReadWaiter interface {
	WaitReadable() error
}

// TryReader is a connection that can read without waiting: TryRead reads
// what is there, and reports ok false, with nothing read and no error,
// when nothing is. Its errors and EOF are Read's.
type TryReader interface {
	TryRead(p []byte) (n int, ok bool, err error)
}

// Abort resets c, so that its peer learns at once that the connection is
// gone, and closes it: see Aborter for how. It is safe to call more than
// once and alongside the connection's other methods.
func Abort(c net.Conn) {
	switch c := c.(type) {
	case Aborter:
		c.Abort()
	case interface{ SetLinger(int) error }:
		c.SetLinger(0)
	case interface{ NetConn() net.Conn }:
		// *tls.Conn, and wrappers that say what they wrap: a RST needs no
		// close_notify before it.
		Abort(c.NetConn())
	}
	c.Close()
}

// end is one connection of a relay and what it can do. Only the direction
// that reads from it uses wait and try, so their scratch fields need no
// lock.
type end struct {
	c      net.Conn
	wait   func() error                    // nil: reads hold a buffer
	try    func([]byte) (int, bool, error) // nil: none
	closed atomic.Bool                     // closed in place of a half-close

	rc      syscall.RawConn // for the socket's own wait and try
	peekFn  func(fd uintptr) bool
	readFn  func(fd uintptr) bool
	peekBuf [1]byte
	peekErr error
	tryBuf  []byte
	tryN    int
	tryErr  error
}

func newEnd(c net.Conn) *end {
	e := &end{c: c}
	if w, ok := c.(ReadWaiter); ok {
		e.wait = w.WaitReadable
	} else {
		e.useSocketWait(c)
	}
	if t, ok := c.(TryReader); ok {
		e.try = t.TryRead
	} else if _, ok := c.(*net.TCPConn); ok {
		// Only the plain socket: a type that wraps one may count or
		// buffer what its Read reads, which reading the descriptor would
		// bypass.
		e.useSocketTry()
	}
	return e
}

// closeWrite passes an EOF on: a half-close where the connection has one
// (for TLS, close_notify and then the FIN under it, for peers that wait
// for either), a close where it has none.
func (e *end) closeWrite() error {
	switch c := e.c.(type) {
	case *tls.Conn:
		err := c.CloseWrite()
		if cw, ok := c.NetConn().(CloseWriter); ok && err == nil {
			err = cw.CloseWrite()
		}
		return err
	case CloseWriter:
		return c.CloseWrite()
	}
	e.closed.Store(true)
	e.c.Close()
	return nil
}

// BufferPool lends copy buffers. Get returns a buffer of at least one
// byte; Put takes it back.
type BufferPool interface {
	Get() *[]byte
	Put(*[]byte)
}

// NewBufferPool returns a BufferPool of buffers of size bytes, safe for
// concurrent use, that lets the garbage collector have the buffers nobody
// has used for a while.
func NewBufferPool(size int) BufferPool {
	if size <= 0 {
		size = DefaultBufferSize
	}
	p := &sync.Pool{New: func() any { b := make([]byte, size); return &b }}
	return FromSyncPool(p)
}

// FromSyncPool is p, a pool whose New makes *[]byte, as a BufferPool: for
// an owner that keeps its buffers in a sync.Pool of its own.
func FromSyncPool(p *sync.Pool) BufferPool { return (*syncPool)(p) }

type syncPool sync.Pool

func (p *syncPool) Get() *[]byte  { return (*sync.Pool)(p).Get().(*[]byte) }
func (p *syncPool) Put(b *[]byte) { (*sync.Pool)(p).Put(b) }
