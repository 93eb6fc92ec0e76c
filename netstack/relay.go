package netstack

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// relay copies bytes between a client connection in the stack and the
// upstream connection the handler dialled.
type relay struct {
	client   *gonet.TCPConn
	ep       tcpip.Endpoint
	wq       *waiter.Queue
	upstream net.Conn
	bufs     *sync.Pool // of *[]byte, Options.RelayBufferSize each

	// Packets counted at the link, and those reported so far.
	counts                  *packetCounts
	reportedIn, reportedOut atomic.Uint64

	abortOnce sync.Once
}

type closeWriter interface{ CloseWrite() error }

// run relays until both directions are done. A FIN in one direction is
// passed on as a half-close; an error in either direction (a reset, a
// failed write) resets both sides.
func (rl *relay) run(log *zap.Logger) {
	counter, _ := rl.upstream.(SegmentCounter)

	errc := make(chan error, 1)
	go func() {
		err := rl.copy(rl.upstream, rl.client, rl.clientReadable, rl.tryClient, counter, true)
		if err == nil {
			if cw, ok := rl.upstream.(closeWriter); ok {
				err = cw.CloseWrite()
			} else {
				err = rl.upstream.Close()
			}
		}
		errc <- err
	}()
	// Without TryRead, only a system call (the peek) could tell whether
	// the upstream has more, and a blocking read would hold the buffer
	// through a pause: then the buffer goes back after every read.
	var tryUpstream func([]byte) (int, bool, error)
	if tr, ok := rl.upstream.(TryReader); ok {
		tryUpstream = tr.TryRead
	}
	err := rl.copy(rl.client, rl.upstream, rl.upstreamReadable, tryUpstream, counter, false)
	if err == nil {
		err = rl.client.CloseWrite()
	}
	if err != nil {
		rl.abort()
	}
	if err2 := <-errc; err2 != nil {
		rl.abort()
	} else if err == nil {
		// Both sides closed cleanly. Wait, briefly, for the client to take
		// the last of the data and our FIN, so that the flow's final counts
		// include every segment.
		rl.awaitClosed()
		if counter != nil {
			rl.reportRest(counter)
		}
	}
	rl.client.Close()
	rl.upstream.Close()
}

// closeWait bounds how long a relay waits for the client to acknowledge
// the end of a cleanly closed connection.
const closeWait = time.Second

func (rl *relay) awaitClosed() {
	deadline := time.Now().Add(closeWait)
	// Backing off keeps thousands of connections closing at once from
	// spending the CPU on polling: most are done within a round trip.
	for wait := time.Millisecond; time.Now().Before(deadline); wait = min(2*wait, 100*time.Millisecond) {
		switch tcp.EndpointState(rl.ep.State()) {
		case tcp.StateTimeWait, tcp.StateClose, tcp.StateError:
			return
		}
		time.Sleep(wait)
	}
}

// reportRest reports the packets counted since the copies last reported.
func (rl *relay) reportRest(counter SegmentCounter) {
	in, out := rl.counts.in.Load(), rl.counts.out.Load()
	counter.CountSegments(in-rl.reportedIn.Swap(in), out-rl.reportedOut.Swap(out))
}

// copy moves bytes from src to dst until src's EOF (nil) or an error.
//
// A buffer is taken from the pool only once src has data, and given back
// after each write: an idle connection holds no buffer, which is what lets
// a gateway keep tens of thousands of them open. Where src can be read
// without waiting (try, nil if it cannot), a read that filled the buffer
// is followed by such a read with the buffer in hand, and only when that
// finds nothing does the buffer go back: a bulk transfer is spared a
// readiness check per read, and a pause holds no buffer.
func (rl *relay) copy(dst io.Writer, src io.Reader, readable func() error, try func([]byte) (int, bool, error), counter SegmentCounter, fromClient bool) error {
	report := func() {
		if counter == nil {
			return
		}
		if fromClient {
			now := rl.counts.in.Load()
			if d := now - rl.reportedIn.Swap(now); d > 0 {
				counter.CountSegments(d, 0)
			}
		} else {
			now := rl.counts.out.Load()
			if d := now - rl.reportedOut.Swap(now); d > 0 {
				counter.CountSegments(0, d)
			}
		}
	}
	defer report()
	var bp *[]byte
	defer func() {
		if bp != nil {
			rl.bufs.Put(bp)
		}
	}()
	for {
		var n int
		var err error
		if bp == nil {
			if err := readable(); err != nil {
				return err
			}
			bp = rl.bufs.Get().(*[]byte)
			n, err = src.Read(*bp)
		} else {
			var ok bool
			if n, ok, err = try(*bp); !ok {
				rl.bufs.Put(bp)
				bp = nil
				continue
			}
		}
		if n > 0 {
			if _, werr := dst.Write((*bp)[:n]); werr != nil {
				return werr
			}
			report()
		}
		if n < len(*bp) || try == nil {
			rl.bufs.Put(bp)
			bp = nil
		}
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// tryClient reads the client's side if it has data, an EOF or an error
// to read; gVisor tells that without a system call.
func (rl *relay) tryClient(p []byte) (int, bool, error) {
	if rl.ep.Readiness(waiter.ReadableEvents|waiter.EventHUp|waiter.EventErr) == 0 {
		return 0, false, nil
	}
	n, err := rl.client.Read(p)
	return n, true, err
}

// clientReadable waits until the client's side has data, an EOF or an
// error to read.
func (rl *relay) clientReadable() error {
	const events = waiter.ReadableEvents | waiter.EventHUp | waiter.EventErr
	if rl.ep.Readiness(events) != 0 {
		return nil
	}
	e, ch := waiter.NewChannelEntry(events)
	rl.wq.EventRegister(&e)
	defer rl.wq.EventUnregister(&e)
	if rl.ep.Readiness(events) == 0 {
		<-ch
	}
	return nil
}

// upstreamReadable waits until the upstream socket has data, an EOF or an
// error to read, by peeking at it; connections that are not sockets are
// simply read.
func (rl *relay) upstreamReadable() error {
	sc, ok := rl.upstream.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	var b [1]byte
	return rc.Read(func(fd uintptr) bool {
		_, _, err := unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		return err != unix.EAGAIN && err != unix.EINTR
	})
}

// abort resets both sides: the client gets a RST, and so does the
// destination when the upstream is a TCP socket.
func (rl *relay) abort() {
	rl.abortOnce.Do(func() {
		rl.ep.Abort()
		if tc, ok := rl.upstream.(interface{ SetLinger(int) error }); ok {
			tc.SetLinger(0)
		}
		rl.upstream.Close()
	})
}
