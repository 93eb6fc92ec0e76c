package netstacktest

import (
	"sync"

	"golang.zx2c4.com/wireguard/tun"
)

// Join carries packets between two devices, both ways, as a wire would,
// until either device is closed. The returned func waits for both copies
// to stop; close the devices first.
func Join(a, b tun.Device) (wait func()) {
	return JoinWith(a, b, JoinOptions{})
}

// JoinOptions configure the wire of JoinWith. The zero value is a wire
// that loses nothing.
type JoinOptions struct {
	// Drop, if set, is asked about every packet, in the order each
	// direction carries them; a packet it returns true for is lost, as on
	// a lossy link. aToB tells the direction, i the packet's place in the
	// batch one Read returned (a GSO send cut into packets comes in one
	// batch). It is called from one goroutine per direction.
	Drop func(aToB bool, i int, pkt []byte) bool
}

// JoinWith is Join over a wire that opts describe.
func JoinWith(a, b tun.Device, opts JoinOptions) (wait func()) {
	var wg sync.WaitGroup
	wg.Add(2)
	go copyPackets(b, a, true, opts.Drop, &wg)
	go copyPackets(a, b, false, opts.Drop, &wg)
	return wg.Wait
}

func copyPackets(dst, src tun.Device, aToB bool, drop func(bool, int, []byte) bool, wg *sync.WaitGroup) {
	defer wg.Done()
	bufs := make([][]byte, max(src.BatchSize(), 1))
	sizes := make([]int, len(bufs))
	for i := range bufs {
		bufs[i] = make([]byte, 65535+16) // the largest packet behind a virtio header
	}
	out := make([][]byte, 0, len(bufs))
	for {
		n, err := src.Read(bufs, sizes, 0)
		if err != nil {
			return
		}
		out = out[:0]
		for i := range n {
			if p := bufs[i][:sizes[i]]; drop == nil || !drop(aToB, i, p) {
				out = append(out, p)
			}
		}
		if len(out) == 0 {
			continue
		}
		if _, err := dst.Write(out, 0); err != nil {
			return
		}
	}
}
