package netstack

import (
	"encoding/binary"
	"net/netip"
	"sync"
	"sync/atomic"
)

// packetCounts counts the packets of one relayed TCP connection as they
// cross the link, each way. gVisor's own segment counters see GRO-merged
// and GSO segments, not the packets on the wire.
type packetCounts struct {
	in, out atomic.Uint64 // from the client, to the client
}

// connKey names a relayed connection: the client's address and the
// destination it asked for.
type connKey struct {
	client, server netip.AddrPort
}

// packetCounters is the link's registry of counted connections.
type packetCounters struct {
	m sync.Map // connKey -> *packetCounts
	n atomic.Int32
}

func (pc *packetCounters) register(k connKey) *packetCounts {
	c := new(packetCounts)
	pc.m.Store(k, c)
	pc.n.Add(1)
	return c
}

func (pc *packetCounters) unregister(k connKey) {
	if _, ok := pc.m.LoadAndDelete(k); ok {
		pc.n.Add(-1)
	}
}

// count adds segs TCP packets, given the first one's IP header and on, to
// the connection they belong to; fromClient tells which way they go. segs
// is more than one for a segment that the kernel cuts or has merged
// (virtio GSO).
func (pc *packetCounters) count(b []byte, fromClient bool, segs uint64) {
	if pc.n.Load() == 0 || len(b) < 1 {
		return
	}
	var src, dst netip.Addr
	var l4 []byte
	switch b[0] >> 4 {
	case 4:
		if len(b) < 20 || b[9] != protoTCP {
			return
		}
		ihl := int(b[0]&0x0f) * 4
		if len(b) < ihl+4 {
			return
		}
		src, dst, l4 = netip.AddrFrom4([4]byte(b[12:16])), netip.AddrFrom4([4]byte(b[16:20])), b[ihl:]
	case 6:
		if len(b) < 44 || b[6] != protoTCP {
			return
		}
		src, dst, l4 = netip.AddrFrom16([16]byte(b[8:24])), netip.AddrFrom16([16]byte(b[24:40])), b[40:]
	default:
		return
	}
	sp := netip.AddrPortFrom(src, binary.BigEndian.Uint16(l4[0:2]))
	dp := netip.AddrPortFrom(dst, binary.BigEndian.Uint16(l4[2:4]))
	k := connKey{client: sp, server: dp}
	if !fromClient {
		k = connKey{client: dp, server: sp}
	}
	v, ok := pc.m.Load(k)
	if !ok {
		return
	}
	if fromClient {
		v.(*packetCounts).in.Add(segs)
	} else {
		v.(*packetCounts).out.Add(segs)
	}
}
