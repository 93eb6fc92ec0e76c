package nat

import (
	"errors"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// Limits of one UDP GSO send (UDP_SEGMENT): the kernel takes at most 64
// segments, and the whole must fit one IP packet.
const (
	gsoMaxSegments = 64
	gsoMaxBytes    = 65535 - 8 - 40
)

// gsoMaxSegment is the largest datagram that is coalesced: each segment
// must fit the egress route's MTU, which is not known here, so a
// 1500-byte Ethernet MTU is assumed; larger datagrams leave one by one.
func gsoMaxSegment(dst netip.AddrPort) int {
	if dst.Addr().Is4() {
		return 1500 - 20 - 8
	}
	return 1500 - 40 - 8
}

// udpBatch is a mapping's datagrams to one destination that wait to leave
// in a single sendmsg with UDP_SEGMENT: the kernel's UDP and IP layers
// then run once for the lot, and a veth or loopback carries it whole.
type udpBatch struct {
	mu      sync.Mutex
	dst     netip.AddrPort
	seg     int     // size of each datagram; only the last may be shorter
	n       int     // datagrams in buf
	buf     *[]byte // from batchBufs while n > 0
	queued  bool    // on the mapper's pending list
	started bool    // a datagram went out since the last Flush
}

var batchBufs = sync.Pool{New: func() any { b := make([]byte, 0, gsoMaxBytes); return &b }}

// SendLater is Send, except that the datagram may wait, coalesced with
// the datagrams that follow it to the same destination, until Flush. It
// suits a caller that hands over datagrams in batches, as a tunnel does:
// a run of equal-sized datagrams then costs one system call.
//
// The first datagram a client source sends after each Flush leaves at
// once, as with Send, so that the socket's errors (an unreachable network,
// a prohibited destination) still come back for the caller to answer;
// errors of the datagrams that waited are counted in UDPStats.SendErrors
// and logged.
func (u *UDPMapper) SendLater(peer string, src, dst netip.AddrPort, payload []byte) error {
	dst = sameFamily(dst, src.Addr())
	if u.noGSO.Load() || len(payload) == 0 || len(payload) > gsoMaxSegment(dst) {
		u.flushSource(src)
		return u.Send(peer, src, dst, payload)
	}
	for {
		m, err := u.mapping(peer, src, dst)
		if err != nil {
			return err
		}
		if m.noGSO.Load() || m.first() {
			u.flushSource(src)
			return u.Send(peer, src, dst, payload)
		}
		f, err := m.flowTo(dst)
		if err != nil {
			return err
		}
		if f == nil {
			continue // the mapping closed under us, as in Send
		}
		f.CountOrig(len(payload), 1)
		m.queue(dst, payload)
		return nil
	}
}

// flushSource sends what the mapping of src holds: a NAT keeps a client's
// datagrams in order.
func (u *UDPMapper) flushSource(src netip.AddrPort) {
	if v, ok := u.maps.Load(src); ok {
		m := v.(*udpMapping)
		m.batch.mu.Lock()
		m.flushLocked()
		m.batch.mu.Unlock()
	}
}

// first reports whether this is the first datagram of m's client since
// the last Flush, and marks the next ones as not.
func (m *udpMapping) first() bool {
	b := &m.batch
	b.mu.Lock()
	if b.started {
		b.mu.Unlock()
		return false
	}
	b.started = true
	enlist := !b.queued
	b.queued = true
	b.mu.Unlock()
	if enlist {
		m.u.enlist(m)
	}
	return true
}

// enlist puts m on the list of mappings that Flush visits.
func (u *UDPMapper) enlist(m *udpMapping) {
	u.pmu.Lock()
	u.pending = append(u.pending, m)
	u.pmu.Unlock()
}

// Flush sends every datagram that SendLater holds.
func (u *UDPMapper) Flush() {
	u.pmu.Lock()
	ms := u.pending
	u.pending = nil
	u.pmu.Unlock()
	for _, m := range ms {
		b := &m.batch
		b.mu.Lock()
		m.flushLocked()
		b.queued, b.started = false, false
		b.mu.Unlock()
	}
}

// queue adds a datagram to m's batch, sending what the batch holds first
// if the datagram cannot join it.
func (m *udpMapping) queue(dst netip.AddrPort, payload []byte) {
	b := &m.batch
	b.mu.Lock()
	if b.n > 0 {
		buf := *b.buf
		if b.dst != dst || len(payload) > b.seg || len(buf)%b.seg != 0 ||
			b.n == gsoMaxSegments || len(buf)+len(payload) > gsoMaxBytes {
			m.flushLocked()
		}
	}
	if b.n == 0 {
		b.dst, b.seg = dst, len(payload)
		b.buf = batchBufs.Get().(*[]byte)
	}
	*b.buf = append(*b.buf, payload...)
	b.n++
	queued := b.queued
	b.queued = true
	b.mu.Unlock()
	if !queued {
		m.u.enlist(m)
	}
}

// flushLocked sends the batch; b.mu is held.
func (m *udpMapping) flushLocked() {
	b := &m.batch
	if b.n == 0 {
		return
	}
	u := m.u
	buf := *b.buf
	var err error
	if b.n == 1 || u.noGSO.Load() {
		err = m.sendEach(buf, b.seg, b.dst)
	} else {
		_, _, err = m.conn.WriteMsgUDPAddrPort(buf, udpSegment(b.seg), b.dst)
		if err != nil && asyncSendError(err) {
			// An earlier datagram's ICMP error, as in write.
			_, _, err = m.conn.WriteMsgUDPAddrPort(buf, udpSegment(b.seg), b.dst)
		}
		switch {
		case err == nil:
			u.coalesced.Add(uint64(b.n))
		case gsoUnsupported(err):
			if !u.noGSO.Swap(true) {
				u.log.Info("UDP segmentation offload unavailable; sending datagrams one by one", zap.Error(err))
			}
			err = m.sendEach(buf, b.seg, b.dst)
		case errors.Is(err, syscall.EMSGSIZE), errors.Is(err, syscall.EINVAL):
			// A segment larger than the route's MTU: alone, each
			// datagram is fragmented instead. This client's path has
			// such a route, so its datagrams stop waiting.
			m.noGSO.Store(true)
			err = m.sendEach(buf, b.seg, b.dst)
		}
	}
	if err != nil && !errors.Is(err, net.ErrClosed) {
		u.sendErrors.Add(1)
		u.logSendError(m, b.dst, err)
	}
	*b.buf = buf[:0]
	batchBufs.Put(b.buf)
	b.buf, b.n = nil, 0
}

// udpSegment is the control message that asks the kernel to cut a send
// into datagrams of seg bytes.
func udpSegment(seg int) []byte {
	b := make([]byte, unix.CmsgSpace(2))
	h := (*unix.Cmsghdr)(unsafe.Pointer(&b[0]))
	h.Level, h.Type = unix.SOL_UDP, unix.UDP_SEGMENT
	h.SetLen(unix.CmsgLen(2))
	*(*uint16)(unsafe.Pointer(&b[unix.CmsgLen(0)])) = uint16(seg)
	return b
}

// sendEach sends buf as datagrams of seg bytes, the last maybe shorter.
func (m *udpMapping) sendEach(buf []byte, seg int, dst netip.AddrPort) error {
	var first error
	for len(buf) > 0 {
		n := min(seg, len(buf))
		if err := m.write(buf[:n], dst, 0); err != nil && first == nil {
			first = err
		}
		buf = buf[n:]
	}
	return first
}

// gsoUnsupported tells the errors of a kernel or device that cannot
// segment UDP at all.
func gsoUnsupported(err error) bool {
	return errors.Is(err, syscall.EIO) || errors.Is(err, syscall.ENOPROTOOPT) ||
		errors.Is(err, syscall.EOPNOTSUPP)
}

// logSendError logs a failed batched send, at most once a minute.
func (u *UDPMapper) logSendError(m *udpMapping, dst netip.AddrPort, err error) {
	now := time.Now().UnixNano()
	last := u.lastErrLog.Load()
	if now-last < int64(time.Minute) || !u.lastErrLog.CompareAndSwap(last, now) {
		return
	}
	u.log.Warn("UDP send failed; further failures within a minute are only counted",
		zap.Stringer("client", m.client), zap.Stringer("dst", dst), zap.Error(err))
}
