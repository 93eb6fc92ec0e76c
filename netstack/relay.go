package netstack

import (
	"context"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"

	bytecopy "github.com/sluice-vpn/sluice/relay"
)

// relay copies bytes between a client connection in the stack and the
// upstream connection the handler dialled, with package relay: this file
// is the gVisor side of it (readiness and reads without a system call,
// resets through the endpoint, the segment counts a SegmentCounter is
// told).
type relay struct {
	client   *gonet.TCPConn
	ep       tcpip.Endpoint
	wq       *waiter.Queue
	upstream net.Conn
	bufs     *sync.Pool // of *[]byte, Options.RelayBufferSize each

	// Packets counted at the link, and those reported so far.
	counts                  *packetCounts
	reportedIn, reportedOut atomic.Uint64
	counter                 SegmentCounter // nil: nobody to report to

	aborted   atomic.Bool
	abortOnce sync.Once
}

// run relays until both directions are done, then closes both sides. A
// FIN in one direction is passed on as a half-close; an error in either
// direction (a reset, a failed write) resets both sides at once.
func (rl *relay) run(log *zap.Logger) {
	opts := bytecopy.Options{Buffers: bytecopy.FromSyncPool(rl.bufs), Logger: log}
	if c, ok := rl.upstream.(SegmentCounter); ok {
		rl.counter = c
		opts.OnCopy = rl.report
	}
	// The stack's shutdown ends relays through abort, not a context.
	bytecopy.Run(context.Background(), &clientConn{TCPConn: rl.client, rl: rl}, rl.upstream, opts)
}

// abort resets both sides: the client gets a RST, and so does the
// destination when the upstream is a TCP socket. It may come before run,
// during it or after it; a running relay then fails, and closes the
// client's connection itself (gVisor's Close must not race the relay's
// reads).
func (rl *relay) abort() {
	rl.abortClient()
	bytecopy.Abort(rl.upstream)
}

func (rl *relay) abortClient() {
	rl.aborted.Store(true)
	rl.abortOnce.Do(rl.ep.Abort)
}

// report tells the counter the packets counted since the last report in
// dir, after each write.
func (rl *relay) report(dir bytecopy.Direction, _ int) {
	if dir == bytecopy.AToB {
		now := rl.counts.in.Load()
		if d := now - rl.reportedIn.Swap(now); d > 0 {
			rl.counter.CountSegments(d, 0)
		}
		return
	}
	now := rl.counts.out.Load()
	if d := now - rl.reportedOut.Swap(now); d > 0 {
		rl.counter.CountSegments(0, d)
	}
}

// reportRest reports the packets counted since the copies last reported.
func (rl *relay) reportRest() {
	in, out := rl.counts.in.Load(), rl.counts.out.Load()
	rl.counter.CountSegments(in-rl.reportedIn.Swap(in), out-rl.reportedOut.Swap(out))
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

// clientConn is the client's connection as package relay sees it, with
// the capabilities that spare the gVisor side a system call per read.
type clientConn struct {
	*gonet.TCPConn
	rl *relay

	sawEOF, sentFIN atomic.Bool
}

var (
	_ bytecopy.ReadWaiter  = (*clientConn)(nil)
	_ bytecopy.TryReader   = (*clientConn)(nil)
	_ bytecopy.Aborter     = (*clientConn)(nil)
	_ bytecopy.CloseWriter = (*clientConn)(nil)
)

// readEvents are the events after which a read does not block.
const readEvents = waiter.ReadableEvents | waiter.EventHUp | waiter.EventErr

// WaitReadable implements relay.ReadWaiter: gVisor tells readiness
// without a system call, and wakes the waiter on data, FIN, RST or abort.
func (c *clientConn) WaitReadable() error {
	ep := c.rl.ep
	if ep.Readiness(readEvents) != 0 {
		return nil
	}
	e, ch := waiter.NewChannelEntry(readEvents)
	c.rl.wq.EventRegister(&e)
	defer c.rl.wq.EventUnregister(&e)
	if ep.Readiness(readEvents) == 0 {
		<-ch
	}
	return nil
}

// TryRead implements relay.TryReader.
func (c *clientConn) TryRead(p []byte) (int, bool, error) {
	if c.rl.ep.Readiness(readEvents) == 0 {
		return 0, false, nil
	}
	n, err := c.Read(p)
	return n, true, err
}

func (c *clientConn) Read(p []byte) (int, error) {
	n, err := c.TCPConn.Read(p)
	if err == io.EOF {
		c.sawEOF.Store(true)
	}
	return n, err
}

func (c *clientConn) CloseWrite() error {
	err := c.TCPConn.CloseWrite()
	if err == nil {
		c.sentFIN.Store(true)
	}
	return err
}

// Abort implements relay.Aborter: the client gets a RST.
func (c *clientConn) Abort() { c.rl.abortClient() }

// Close waits, after a clean end both ways, briefly, for the client to
// take the last of the data and our FIN, so that the flow's final counts
// include every segment; and reports those counts. The relay closes the
// client before the upstream, which the counts are reported through.
func (c *clientConn) Close() error {
	if c.sawEOF.Load() && c.sentFIN.Load() && !c.rl.aborted.Load() {
		c.rl.awaitClosed()
	}
	if c.rl.counter != nil {
		c.rl.reportRest()
	}
	return c.TCPConn.Close()
}
