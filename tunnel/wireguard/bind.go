package wireguard

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"golang.zx2c4.com/wireguard/conn"
)

// socketBufferSize is what AddrBind asks for as its socket buffers, the
// size wireguard-go's own bind uses: the default 208 KiB overflows within
// milliseconds when a gigabit of tunnel traffic arrives in bursts.
const socketBufferSize = 7 << 20

// maxSegments is the most datagrams the kernel coalesces into one UDP GSO
// send or GRO receive.
const maxSegments = 64

// AddrBind is a conn.Bind on one local address, for a gateway that must
// listen on one interface only rather than on every address as
// conn.NewDefaultBind does. Like wireguard-go's bind it moves up to
// conn.IdealBatchSize datagrams per system call (recvmmsg, sendmmsg), uses
// UDP segmentation and receive offload where the kernel has them, and asks
// for 7 MiB socket buffers (beyond net.core.rmem_max when it may). The
// source of what it sends is always its address, so it has no use for
// sticky sources.
type AddrBind struct {
	addr netip.Addr
	msgs sync.Pool // *[]ipv6.Message, conn.IdealBatchSize of them

	mu        sync.Mutex
	pc        *net.UDPConn
	bc        batchConn
	txOffload atomic.Bool // cleared when the kernel refuses a segmented send
	rxOffload bool
}

// batchConn is what ipv4.PacketConn and ipv6.PacketConn have in common;
// their Message types are the same type.
type batchConn interface {
	ReadBatch([]ipv6.Message, int) (int, error)
	WriteBatch([]ipv6.Message, int) (int, error)
}

var _ conn.Bind = (*AddrBind)(nil)

// NewAddrBind returns a bind that listens on addr only.
func NewAddrBind(addr netip.Addr) *AddrBind {
	b := &AddrBind{addr: addr}
	b.msgs.New = func() any {
		msgs := make([]ipv6.Message, conn.IdealBatchSize)
		for i := range msgs {
			msgs[i].Buffers = make(net.Buffers, 0, maxSegments)
			msgs[i].OOB = make([]byte, 0, controlSize)
		}
		return &msgs
	}
	return b
}

// Open implements conn.Bind.
func (b *AddrBind) Open(port uint16) ([]conn.ReceiveFunc, uint16, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.pc != nil {
		return nil, 0, conn.ErrBindAlreadyOpen
	}
	laddr := netip.AddrPortFrom(b.addr, port)
	var rxOffload bool
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var err error
		if cerr := c.Control(func(fd uintptr) { rxOffload, err = setSocketOptions(fd) }); cerr != nil {
			return cerr
		}
		return err
	}}
	network := "udp4"
	if b.addr.Is6() {
		// "udp" keeps a wildcard "::" dual-stack, as before.
		network = "udp"
	}
	c, err := lc.ListenPacket(context.Background(), network, laddr.String())
	if err != nil {
		return nil, 0, fmt.Errorf("wireguard: listen on %s: %w", laddr, err)
	}
	pc := c.(*net.UDPConn)
	var bc batchConn
	if b.addr.Is4() {
		bc = ipv4.NewPacketConn(pc)
	} else {
		bc = ipv6.NewPacketConn(pc)
	}
	b.pc, b.bc, b.rxOffload = pc, bc, rxOffload
	b.txOffload.Store(supportsSegmentation(pc))
	recv := func(bufs [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
		return b.receive(bc, rxOffload, bufs, sizes, eps)
	}
	return []conn.ReceiveFunc{recv}, pc.LocalAddr().(*net.UDPAddr).AddrPort().Port(), nil
}

func (b *AddrBind) getMsgs() []ipv6.Message { return *b.msgs.Get().(*[]ipv6.Message) }

func (b *AddrBind) putMsgs(msgs []ipv6.Message) {
	for i := range msgs {
		msgs[i] = ipv6.Message{Buffers: msgs[i].Buffers[:0], OOB: msgs[i].OOB[:0]}
	}
	b.msgs.Put(&msgs)
}

// receive reads up to len(bufs) datagrams. With receive offload the kernel
// hands over runs of up to maxSegments datagrams glued together, so it
// reads into the last few buffers and splits each run forward into the
// buffers in front of it; the run being split always lies at or after the
// buffer being written.
func (b *AddrBind) receive(bc batchConn, rxOffload bool, bufs [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
	msgs := b.getMsgs()
	defer b.putMsgs(msgs)
	if len(bufs) > len(msgs) {
		bufs = bufs[:len(msgs)]
	}
	first := 0
	if rxOffload {
		first = len(bufs) - max(1, len(bufs)/maxSegments)
	}
	for i := first; i < len(bufs); i++ {
		msgs[i].Buffers = append(msgs[i].Buffers, bufs[i])
		msgs[i].OOB = msgs[i].OOB[:cap(msgs[i].OOB)]
	}
	n, err := bc.ReadBatch(msgs[first:len(bufs)], 0)
	if err != nil {
		return 0, err
	}
	if !rxOffload {
		for i := range n {
			sizes[i] = msgs[i].N
			eps[i] = endpointOf(msgs[i].Addr)
		}
		return n, nil
	}
	out := 0
	for i := first; i < first+n; i++ {
		m := &msgs[i]
		seg, err := segmentSize(m.OOB[:m.NN])
		if err != nil {
			return 0, fmt.Errorf("wireguard: read on %s: %w", b.addr, err)
		}
		if seg <= 0 || seg > m.N {
			seg = max(m.N, 1)
		}
		ep := endpointOf(m.Addr)
		for off := 0; ; off += seg {
			if out > i {
				return 0, fmt.Errorf("wireguard: read on %s: a receive run of %d bytes in %d-byte datagrams does not fit in %d buffers", b.addr, m.N, seg, len(bufs))
			}
			end := min(off+seg, m.N)
			// When out == i, off is 0 and the copy is onto itself.
			sizes[out] = copy(bufs[out], bufs[i][off:end])
			eps[out] = ep
			out++
			if end >= m.N {
				break
			}
		}
	}
	return out, nil
}

// endpointOf returns the endpoint a datagram came from, IPv4 as IPv4 even
// on a dual-stack socket, so that it compares equal to what peers are
// configured with.
func endpointOf(a net.Addr) conn.Endpoint {
	ap := a.(*net.UDPAddr).AddrPort()
	return &conn.StdNetEndpoint{AddrPort: netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())}
}

// Close implements conn.Bind.
func (b *AddrBind) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.pc == nil {
		return nil
	}
	err := b.pc.Close()
	b.pc, b.bc = nil, nil
	return err
}

// SetMark implements conn.Bind; marks are not used.
func (b *AddrBind) SetMark(uint32) error { return nil }

// Send implements conn.Bind. With segmentation offload, runs of datagrams
// of one size (the last may be shorter) leave as one message each, the
// kernel cutting them apart; a kernel or device that refuses that (EIO)
// turns it off for good and the datagrams are sent one message each.
func (b *AddrBind) Send(bufs [][]byte, ep conn.Endpoint) error {
	b.mu.Lock()
	pc, bc := b.pc, b.bc
	b.mu.Unlock()
	if pc == nil {
		return net.ErrClosed
	}
	se, ok := ep.(*conn.StdNetEndpoint)
	if !ok {
		return conn.ErrWrongEndpointType
	}
	dst := se.AddrPort
	if b.addr.Is6() && dst.Addr().Is4() {
		dst = netip.AddrPortFrom(netip.AddrFrom16(dst.Addr().As16()), dst.Port())
	}
	ua := net.UDPAddrFromAddrPort(dst)
	msgs := b.getMsgs()
	defer b.putMsgs(msgs)
	for len(bufs) > 0 {
		chunk := bufs[:min(len(bufs), len(msgs))]
		bufs = bufs[len(chunk):]
		offload := b.txOffload.Load()
		err := writeAll(bc, fillMessages(msgs, chunk, ua, offload))
		if err != nil && offload && disablesSegmentation(err) {
			b.txOffload.Store(false)
			err = writeAll(bc, fillMessages(msgs, chunk, ua, false))
		}
		if err != nil {
			return fmt.Errorf("wireguard: send to %s: %w", dst, err)
		}
	}
	return nil
}

// fillMessages lays bufs out in msgs, one datagram per message or, when
// segment is set, runs of equal-sized datagrams per message, and returns
// the messages used.
func fillMessages(msgs []ipv6.Message, bufs [][]byte, to *net.UDPAddr, segment bool) []ipv6.Message {
	maxPayload := 1<<16 - 1 - 8 // the UDP length field
	if to.IP.To4() != nil {
		maxPayload -= 20 // IPv4's total length includes its header
	}
	n := 0
	for i := 0; i < len(bufs); {
		m := &msgs[n]
		m.Buffers = append(m.Buffers[:0], bufs[i])
		m.OOB = m.OOB[:0]
		m.Addr = to
		size, total := len(bufs[i]), len(bufs[i])
		i++
		for segment && i < len(bufs) && len(m.Buffers) < maxSegments &&
			len(bufs[i]) <= size && total+len(bufs[i]) <= maxPayload {
			m.Buffers = append(m.Buffers, bufs[i])
			total += len(bufs[i])
			i++
			if len(m.Buffers[len(m.Buffers)-1]) < size {
				break // only the last segment may be short
			}
		}
		if len(m.Buffers) > 1 {
			m.OOB = appendSegmentSize(m.OOB, uint16(size))
		}
		n++
	}
	return msgs[:n]
}

// writeAll writes msgs, going on where a short batch stopped. A message
// the kernel refuses on its own account (a local firewall's drop, no
// route, too big) is skipped, so the datagrams after it still go out as
// they would have in sendmsg calls of their own; the first such error is
// returned once the rest are sent. Any other error ends the batch.
func writeAll(bc batchConn, msgs []ipv6.Message) error {
	var first error
	for len(msgs) > 0 {
		n, err := bc.WriteBatch(msgs, 0)
		if err != nil {
			if !refusesOne(err) {
				return err
			}
			if first == nil {
				first = err
			}
			n = 1 // sendmmsg stops at the message it refused: skip it
		}
		msgs = msgs[n:]
	}
	return first
}

// ParseEndpoint implements conn.Bind.
func (b *AddrBind) ParseEndpoint(s string) (conn.Endpoint, error) {
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return nil, err
	}
	return &conn.StdNetEndpoint{AddrPort: ap}, nil
}

// BatchSize implements conn.Bind.
func (b *AddrBind) BatchSize() int { return conn.IdealBatchSize }
