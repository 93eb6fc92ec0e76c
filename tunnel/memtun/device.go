// Package memtun is an in-memory tun.Device pair: what is written to one end
// is read from the other. It stands in for a kernel TUN device in tests and in
// programs that embed the gateway and produce IP packets themselves.
//
// The link behaves like a pipe of packets: each direction has a bounded queue,
// writers block while the peer's queue is full, and closing one end lets the
// other drain what was already queued before its reads report os.ErrClosed.
package memtun

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"golang.zx2c4.com/wireguard/tun"
)

// Defaults for the zero Options.
const (
	DefaultMTU       = 1420
	DefaultBatchSize = 128
	DefaultQueueLen  = 1024
	DefaultName      = "memtun"
)

// MaxPacketSize is the largest packet Write accepts: the largest IPv4 or
// (non-jumbo) IPv6 packet. Packets above the MTU are allowed because the link
// is in memory and the stack above may hand it offloaded segments; a hard
// ceiling keeps the memory a queue can pin bounded by QueueLen.
const MaxPacketSize = 65535

// Options configures NewPair. The zero value gives a 1420-byte MTU, 128-packet
// batches and 1024-packet queues.
type Options struct {
	// MTU is what both ends report from MTU. It does not limit what Write
	// accepts (see MaxPacketSize). Default 1420.
	MTU int
	// BatchSize is the most packets one Read returns, and what BatchSize
	// reports. Default 128.
	BatchSize int
	// QueueLen is how many packets each direction holds before Write blocks.
	// Default 1024.
	QueueLen int
	// Name is what both ends report from Name. Default "memtun".
	Name string
}

func (o *Options) fill() error {
	switch {
	case o.MTU == 0:
		o.MTU = DefaultMTU
	case o.MTU < 0 || o.MTU > MaxPacketSize:
		return fmt.Errorf("memtun: Options.MTU %d out of range [1, %d]", o.MTU, MaxPacketSize)
	}
	switch {
	case o.BatchSize == 0:
		o.BatchSize = DefaultBatchSize
	case o.BatchSize < 0:
		return fmt.Errorf("memtun: Options.BatchSize %d is negative", o.BatchSize)
	}
	switch {
	case o.QueueLen == 0:
		o.QueueLen = DefaultQueueLen
	case o.QueueLen < 0:
		return fmt.Errorf("memtun: Options.QueueLen %d is negative", o.QueueLen)
	}
	if o.Name == "" {
		o.Name = DefaultName
	}
	return nil
}

// Device is one end of an in-memory link. It implements tun.Device and is
// safe for concurrent use; concurrent Reads (or Writes) on one end interleave
// at packet granularity, so order is only kept per calling goroutine.
type Device struct {
	opts   Options
	pools  *pools
	in     *queue // packets the peer wrote, read by this end
	out    *queue // packets this end writes, read by the peer
	events chan tun.Event

	closeOnce sync.Once
}

var _ tun.Device = (*Device)(nil)

// NewPair returns the two connected ends of a new in-memory link: packets
// written to a are read from b, and packets written to b are read from a.
func NewPair(opts Options) (a, b *Device, err error) {
	if err := opts.fill(); err != nil {
		return nil, nil, err
	}
	p := newPools(opts.MTU)
	ab := newQueue(opts.QueueLen, p)
	ba := newQueue(opts.QueueLen, p)
	a = newDevice(opts, p, ba, ab)
	b = newDevice(opts, p, ab, ba)
	return a, b, nil
}

func newDevice(opts Options, p *pools, in, out *queue) *Device {
	d := &Device{
		opts:   opts,
		pools:  p,
		in:     in,
		out:    out,
		events: make(chan tun.Event, 1),
	}
	d.events <- tun.EventUp
	return d
}

// File returns nil: there is no file descriptor behind an in-memory link.
func (d *Device) File() *os.File { return nil }

// MTU returns Options.MTU.
func (d *Device) MTU() (int, error) { return d.opts.MTU, nil }

// Name returns Options.Name.
func (d *Device) Name() (string, error) { return d.opts.Name, nil }

// Events returns a channel that delivers tun.EventUp once and is closed by
// Close.
func (d *Device) Events() <-chan tun.Event { return d.events }

// BatchSize returns Options.BatchSize.
func (d *Device) BatchSize() int { return d.opts.BatchSize }

// Close shuts this end down. Pending and later Reads and Writes on this end
// return os.ErrClosed, as do the peer's Writes; the peer's Reads return what
// this end had already written and then os.ErrClosed. Close is idempotent.
func (d *Device) Close() error {
	d.closeOnce.Do(func() {
		d.in.closeReader()
		d.out.closeWriter()
		close(d.events)
	})
	return nil
}

// Read blocks until at least one packet is queued for this end, then copies
// up to min(len(bufs), BatchSize) packets into bufs[i][offset:], setting
// sizes[i], and returns how many it copied. A packet that does not fit its
// buffer is dropped and reported as an error when it is first in line;
// otherwise the batch ends before it and the next Read reports it.
func (d *Device) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	max := min(len(bufs), len(sizes), d.opts.BatchSize)
	if max == 0 {
		return 0, nil
	}
	return d.in.read(bufs[:max], sizes, offset)
}

// Write copies each bufs[i][offset:] into the peer's queue, blocking while
// the queue is full, and returns how many packets it took. Empty packets are
// skipped but counted as written, since they carry nothing to deliver. Write
// returns os.ErrClosed (wrapped) once either end is closed.
func (d *Device) Write(bufs [][]byte, offset int) (int, error) {
	return d.out.write(bufs, offset)
}

// errClosedPeer is what a Write sees when the reading end has gone away;
// errors.Is(err, os.ErrClosed) holds so callers need one check.
var errClosedPeer = fmt.Errorf("memtun: peer closed: %w", os.ErrClosed)

// errOffset reports an offset beyond a buffer, which is the caller's bug; it
// is an error rather than a panic so one bad call cannot take a process down.
var errOffset = errors.New("memtun: offset beyond buffer")
