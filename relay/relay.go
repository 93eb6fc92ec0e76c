package relay

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"
)

// DefaultBufferSize is the size of the copy buffers when neither
// Options.BufferSize nor Options.Buffers says otherwise.
const DefaultBufferSize = 32 << 10

// Options tunes one relay. The zero value works: buffers of
// DefaultBufferSize of the relay's own, no idle timeout, no logs.
type Options struct {
	// Buffers lends the copy buffers; a server running many relays shares
	// one among them (NewBufferPool). Nil gives each relay its own, of
	// BufferSize.
	Buffers BufferPool

	// BufferSize is the size of the buffers when Buffers is nil; zero
	// means DefaultBufferSize.
	BufferSize int

	// IdleTimeout aborts the relay once no byte has moved either way for
	// that long. Zero means none: the connections' own keep-alives and
	// timeouts decide.
	IdleTimeout time.Duration

	// Logger gets one debug line for each relay that ends in an error. Nil
	// means no logs.
	Logger *zap.Logger

	// OnCopy, if set, is called after each write with the direction and the
	// number of bytes written, on the goroutine copying that direction.
	OnCopy func(dir Direction, n int)
}

// Direction is one of a relay's two ways.
type Direction uint8

const (
	AToB Direction = iota // from Run's a to its b
	BToA                  // from b to a
)

func (d Direction) String() string {
	if d == AToB {
		return "a->b"
	}
	return "b->a"
}

// Result is what moved, in bytes, each way.
type Result struct {
	AToB, BToA int64
}

// Run copies a to b and b to a until both directions are done, then
// closes both, a first, and returns. An EOF one way is passed on as a
// half-close (see the package documentation); an error either way aborts
// both connections at once, and so does ctx being done or the idle
// timeout.
//
// The error is nil if both directions ended with an EOF that was passed
// on; otherwise it is the first failure: an *Error for a connection's,
// ErrIdle, or ctx's cause wrapped.
func Run(ctx context.Context, a, b net.Conn, opts Options) (Result, error) {
	r := &run{opts: opts, a: newEnd(a), b: newEnd(b)}
	if r.opts.Buffers == nil {
		size := r.opts.BufferSize
		if size <= 0 {
			size = DefaultBufferSize
		}
		r.opts.Buffers = NewBufferPool(size)
	}
	if r.opts.IdleTimeout > 0 {
		r.start = time.Now()
		r.idle = time.AfterFunc(r.opts.IdleTimeout, r.checkIdle)
		defer r.idle.Stop()
	}
	if ctx.Done() != nil {
		stop := context.AfterFunc(ctx, func() {
			r.fail(fmt.Errorf("relay: %w", context.Cause(ctx)))
		})
		defer stop()
	}

	var wg sync.WaitGroup
	wg.Go(func() { r.direction(AToB, r.a, r.b) })
	r.direction(BToA, r.b, r.a)
	wg.Wait()

	res := Result{AToB: r.moved[AToB].Load(), BToA: r.moved[BToA].Load()}
	r.mu.Lock()
	err := r.err
	r.done = true
	r.mu.Unlock()
	if err != nil {
		if r.opts.Logger != nil {
			r.opts.Logger.Debug("relay aborted", zap.Error(err),
				zap.Int64("a_to_b", res.AToB), zap.Int64("b_to_a", res.BToA))
		}
		return res, err
	}
	a.Close()
	b.Close()
	return res, nil
}

// ErrIdle is the error of a relay aborted by Options.IdleTimeout.
var ErrIdle = errors.New("relay: idle timeout")

// Error is a relay's failure on one of its connections.
type Error struct {
	Dir Direction // the direction being copied
	Op  string    // "read", "write" or "close-write"
	Err error
}

func (e *Error) Error() string {
	side := "a"
	if (e.Dir == AToB) != (e.Op == "read") {
		side = "b"
	}
	return fmt.Sprintf("relay: %s %s (%s): %v", e.Op, side, e.Dir, e.Err)
}

func (e *Error) Unwrap() error { return e.Err }

// run is the state of one Run.
type run struct {
	opts  Options
	a, b  *end
	moved [2]atomic.Int64

	mu   sync.Mutex
	err  error // the first failure; set once
	done bool  // Run has returned: a late failure (ctx, timer) is moot

	idle     *time.Timer
	start    time.Time
	activity atomic.Int64 // since start, when a byte last moved
	eofs     atomic.Int32 // directions whose source has ended cleanly
}

// fail records the relay's first failure and aborts both connections,
// which unblocks whatever the two copies are waiting for.
func (r *run) fail(err error) {
	r.mu.Lock()
	if r.err != nil || r.done {
		r.mu.Unlock()
		return
	}
	r.err = err
	r.mu.Unlock()
	Abort(r.a.c)
	Abort(r.b.c)
}

func (r *run) failed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.err != nil
}

func (r *run) checkIdle() {
	quiet := time.Since(r.start) - time.Duration(r.activity.Load())
	if left := r.opts.IdleTimeout - quiet; left > 0 {
		r.mu.Lock()
		if !r.done && r.err == nil {
			// Under the lock, so that no timer is set again after Run's
			// Stop.
			r.idle.Reset(left)
		}
		r.mu.Unlock()
		return
	}
	r.fail(ErrIdle)
}

// direction copies src to dst and passes src's EOF on; any failure fails
// the whole relay.
func (r *run) direction(d Direction, src, dst *end) {
	err := r.copy(d, src, dst)
	if err == nil {
		both := r.eofs.Add(1) == 2
		cerr := dst.closeWrite()
		if cerr == nil || both && closedByPeer(cerr) {
			// Both sides have ended: a peer that closed its socket
			// entirely already may refuse the last half-close (a TLS
			// close_notify, EPIPE), and nothing is lost by that.
			return
		}
		err = &Error{Dir: d, Op: "close-write", Err: cerr}
	}
	r.fail(err)
}

// copy moves bytes from src to dst until src's EOF (nil) or an error.
//
// Where src can be waited for without a buffer, one is taken only once
// src has data, and given back after the write unless the read filled
// it and src can be tried without waiting (see TryReader).
func (r *run) copy(d Direction, src, dst *end) error {
	var bp *[]byte
	defer func() {
		if bp != nil {
			r.opts.Buffers.Put(bp)
		}
	}()
	for {
		var n int
		var err error
		switch {
		case bp == nil:
			if src.wait != nil {
				if err := src.wait(); err != nil {
					return r.readErr(d, src, err)
				}
			}
			bp = r.opts.Buffers.Get()
			n, err = src.c.Read(*bp)
		case src.try != nil:
			var ok bool
			if n, ok, err = src.try(*bp); !ok {
				r.opts.Buffers.Put(bp)
				bp = nil
				continue
			}
		default:
			// src cannot be waited for: the buffer stays through the read.
			n, err = src.c.Read(*bp)
		}
		if n > 0 {
			if _, werr := dst.c.Write((*bp)[:n]); werr != nil {
				return &Error{Dir: d, Op: "write", Err: werr}
			}
			r.moved[d].Add(int64(n))
			if r.idle != nil {
				r.activity.Store(int64(time.Since(r.start)))
			}
			if r.opts.OnCopy != nil {
				r.opts.OnCopy(d, n)
			}
		}
		if src.wait != nil && (n < len(*bp) || src.try == nil) {
			r.opts.Buffers.Put(bp)
			bp = nil
		}
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return r.readErr(d, src, err)
		}
	}
}

// readErr is src's read error, or nil if the error only says that the
// relay closed src itself, having passed the other way's EOF on to a
// connection that cannot half-close.
func (r *run) readErr(d Direction, src *end, err error) error {
	if src.closed.Load() && !r.failed() {
		return nil
	}
	return &Error{Dir: d, Op: "read", Err: err}
}

// closedByPeer tells the errors of writing to a connection whose peer has
// closed it.
func closedByPeer(err error) bool {
	return errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, net.ErrClosed)
}
