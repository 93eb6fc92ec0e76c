package netstack

import (
	"os"
	"sync"
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/stack/gro"
)

// link is the stack's only NIC. Packets the stack sends queue up until the
// tunnel side reads them; packets the tunnel writes are delivered straight
// into the stack on the writer's goroutine.
type link struct {
	mtu uint32

	mu         sync.RWMutex
	dispatcher stack.NetworkDispatcher

	out       chan *stack.PacketBuffer
	done      chan struct{}
	closeOnce sync.Once

	outDropped atomic.Uint64 // queue full
	outTooBig  atomic.Uint64 // larger than the reader's buffer

	// trustChecksums skips checksum checks and enables GRO: the packets
	// were authenticated by the tunnel.
	trustChecksums bool
	// virtio puts a virtio_net_hdr in front of every packet each way, and
	// GSO packets cross whole: the kernel cuts and merges them.
	virtio  bool
	inbound sync.Pool // of *inbound

	// The reader's segmenter, with the GSO packet in hand.
	seg segmenter

	counts packetCounters
}

var (
	_ stack.LinkEndpoint = (*link)(nil)
	_ stack.GSOEndpoint  = (*link)(nil)
)

func newLink(mtu, queueLen int, trustChecksums, virtio bool) *link {
	l := &link{
		mtu:            uint32(mtu),
		out:            make(chan *stack.PacketBuffer, queueLen),
		done:           make(chan struct{}),
		trustChecksums: trustChecksums,
		virtio:         virtio,
	}
	l.inbound.New = func() any {
		in := new(inbound)
		// GRO is only sound where checksums need no checking: merged
		// segments carry the first segment's IP checksum.
		in.gro.Init(trustChecksums)
		return in
	}
	return l
}

// inbound is one Write's batch on its way into the stack. With checksum
// offload (packets the tunnel has authenticated), consecutive TCP
// segments of a flow are merged by GRO before the stack sees them, which
// saves most of the per-segment work of a bulk upload.
type inbound struct {
	gro gro.GRO
	n   int
}

// begin starts a batch; it returns nil when the link is not attached.
func (l *link) begin() *inbound {
	l.mu.RLock()
	d := l.dispatcher
	l.mu.RUnlock()
	if d == nil {
		return nil
	}
	in := l.inbound.Get().(*inbound)
	in.gro.Dispatcher = d
	return in
}

// deliver queues one IP packet of the batch, which stands for segs packets
// on the wire. b is copied.
func (l *link) deliver(in *inbound, proto tcpip.NetworkProtocolNumber, b []byte, segs uint64) {
	l.counts.count(b, true, segs)
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(b)})
	pkt.NetworkProtocolNumber = proto
	pkt.RXChecksumValidated = l.offloadsRX()
	in.gro.Enqueue(pkt)
	pkt.DecRef()
	in.n++
}

// end hands the batch to the stack.
func (l *link) end(in *inbound) {
	in.gro.Flush()
	in.n = 0
	l.inbound.Put(in)
}

// enqueue queues a packet toward the tunnel, taking a reference. Like a
// NIC's transmit ring it drops rather than blocks when full: TCP recovers,
// and the stack's goroutines never wait on a slow reader.
func (l *link) enqueue(pkt *stack.PacketBuffer) bool {
	select {
	case <-l.done:
		return false
	default:
	}
	pkt.IncRef()
	select {
	case l.out <- pkt:
		return true
	default:
		pkt.DecRef()
		l.outDropped.Add(1)
		return false
	}
}

// read fills bufs with queued packets: it blocks for the first one and then
// takes whatever else is already queued, up to len(bufs). A GSO packet is
// cut into MTU-sized packets here; one that does not fit the bufs left is
// carried over to the next read. read has one caller at a time.
func (l *link) read(bufs [][]byte, sizes []int, offset int) (int, error) {
	n := 0
	for n < len(bufs) {
		if l.seg.busy {
			size, ok := l.seg.next(bufs[n][offset:])
			if !ok {
				l.outTooBig.Add(1)
				continue
			}
			sizes[n] = size
			n++
			continue
		}
		var pkt *stack.PacketBuffer
		if n == 0 {
			select {
			case pkt = <-l.out:
			case <-l.done:
				l.seg.release()
				return 0, os.ErrClosed
			}
		} else {
			select {
			case pkt = <-l.out:
			default:
				return n, nil
			}
		}
		if pkt.GSOOptions.Type != stack.GSONone && !l.virtio {
			if l.seg.load(pkt) {
				l.counts.count(l.seg.hdr, false, uint64(l.seg.segments()))
			} else {
				l.outTooBig.Add(1)
			}
			pkt.DecRef()
			continue
		}
		if size, ok := l.copyOut(bufs[n][offset:], pkt); ok {
			sizes[n] = size
			n++
		} else {
			l.outTooBig.Add(1)
		}
		pkt.DecRef()
	}
	return n, nil
}

func (l *link) close() {
	l.closeOnce.Do(func() {
		close(l.done)
		for {
			select {
			case pkt := <-l.out:
				pkt.DecRef()
			default:
				return
			}
		}
	})
}

// WritePackets implements stack.LinkWriter.
func (l *link) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	n := 0
	for _, pkt := range pkts.AsSlice() {
		if !l.enqueue(pkt) {
			select {
			case <-l.done:
				return n, &tcpip.ErrClosedForSend{}
			default:
			}
			// A drop on a full queue counts as sent, as on a real NIC.
		}
		n++
	}
	return n, nil
}

// MTU implements stack.NetworkLinkEndpoint.
func (l *link) MTU() uint32 { return atomic.LoadUint32(&l.mtu) }

// SetMTU implements stack.NetworkLinkEndpoint.
func (l *link) SetMTU(mtu uint32) { atomic.StoreUint32(&l.mtu, mtu) }

// MaxHeaderLength implements stack.NetworkLinkEndpoint: IP packets carry no
// link header.
func (*link) MaxHeaderLength() uint16 { return 0 }

// LinkAddress implements stack.NetworkLinkEndpoint.
func (*link) LinkAddress() tcpip.LinkAddress { return "" }

// SetLinkAddress implements stack.NetworkLinkEndpoint.
func (*link) SetLinkAddress(tcpip.LinkAddress) {}

// offloadsRX tells whether the stack may skip checksum checks: the tunnel
// authenticated every packet, or the virtio header vouched for it (the link
// verifies those it does not vouch for).
func (l *link) offloadsRX() bool { return l.trustChecksums || l.virtio }

// Capabilities implements stack.NetworkLinkEndpoint.
func (l *link) Capabilities() stack.LinkEndpointCapabilities {
	if l.offloadsRX() {
		return stack.CapabilityRXChecksumOffload
	}
	return 0
}

// Attach implements stack.NetworkLinkEndpoint.
func (l *link) Attach(d stack.NetworkDispatcher) {
	l.mu.Lock()
	l.dispatcher = d
	l.mu.Unlock()
}

// IsAttached implements stack.NetworkLinkEndpoint.
func (l *link) IsAttached() bool {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.dispatcher != nil
}

// Wait implements stack.NetworkLinkEndpoint: the link owns no goroutines.
func (*link) Wait() {}

// ARPHardwareType implements stack.NetworkLinkEndpoint.
func (*link) ARPHardwareType() header.ARPHardwareType { return header.ARPHardwareNone }

// AddHeader implements stack.NetworkLinkEndpoint.
func (*link) AddHeader(*stack.PacketBuffer) {}

// ParseHeader implements stack.NetworkLinkEndpoint.
func (*link) ParseHeader(*stack.PacketBuffer) bool { return true }

// Close implements stack.NetworkLinkEndpoint.
func (l *link) Close() { l.close() }

// SetOnCloseAction implements stack.NetworkLinkEndpoint.
func (*link) SetOnCloseAction(func()) {}

// copyOut writes a packet for the tunnel into dst, behind a virtio header
// when the link has them, and returns the bytes written.
func (l *link) copyOut(dst []byte, pkt *stack.PacketBuffer) (int, bool) {
	if !l.virtio {
		size, ok := copyPacket(dst, pkt)
		if ok {
			l.counts.count(dst[:size], false, 1)
		}
		return size, ok
	}
	if len(dst) < VirtioNetHdrLen {
		return 0, false
	}
	h := virtioHdrFor(pkt)
	size, ok := copyPacket(dst[VirtioNetHdrLen:], pkt)
	if !ok {
		return 0, false
	}
	h.encode(dst)
	l.counts.count(dst[VirtioNetHdrLen:VirtioNetHdrLen+size], false, gsoSegments(&h, size))
	return VirtioNetHdrLen + size, true
}

// gsoSegments is the number of packets a packet of size bytes with header
// h stands for on the wire.
func gsoSegments(h *virtioHdr, size int) uint64 {
	if h.gsoType == virtioGSONone || h.gsoSize == 0 || size <= int(h.hdrLen) {
		return 1
	}
	return uint64((size - int(h.hdrLen) + int(h.gsoSize) - 1) / int(h.gsoSize))
}

func copyPacket(dst []byte, pkt *stack.PacketBuffer) (int, bool) {
	if pkt.Size() > len(dst) {
		return 0, false
	}
	n := 0
	for _, s := range pkt.AsSlices() {
		n += copy(dst[n:], s)
	}
	return n, true
}
