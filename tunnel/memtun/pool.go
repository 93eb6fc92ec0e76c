package memtun

import "sync"

// packetSlack is head room over the MTU for the common-size pool, so that a
// packet a little over the MTU (an encapsulation header, a sloppy sender)
// still comes from the pool instead of allocating a 64 KiB buffer.
const packetSlack = 128

// packet is a queued copy of one written packet. It is a pointer type so that
// sync.Pool stores it without allocating on Put.
type packet struct {
	b []byte
}

// pools hands out packet buffers in two sizes: MTU+slack for ordinary
// packets and MaxPacketSize for offloaded ones. Keeping large buffers in their
// own pool stops an occasional 64 KiB packet from bloating every ordinary one.
type pools struct {
	smallSize int
	small     sync.Pool
	large     sync.Pool
}

func newPools(mtu int) *pools {
	p := &pools{smallSize: min(mtu+packetSlack, MaxPacketSize)}
	p.small.New = func() any { return &packet{b: make([]byte, 0, p.smallSize)} }
	p.large.New = func() any { return &packet{b: make([]byte, 0, MaxPacketSize)} }
	return p
}

// get returns a packet holding a copy of data; len(data) <= MaxPacketSize.
func (p *pools) get(data []byte) *packet {
	var pk *packet
	if len(data) <= p.smallSize {
		pk = p.small.Get().(*packet)
	} else {
		pk = p.large.Get().(*packet)
	}
	pk.b = append(pk.b[:0], data...)
	return pk
}

func (p *pools) put(pk *packet) {
	if cap(pk.b) == p.smallSize {
		p.small.Put(pk)
	} else {
		p.large.Put(pk)
	}
}
