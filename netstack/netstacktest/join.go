package netstacktest

import (
	"sync"

	"golang.zx2c4.com/wireguard/tun"
)

// Join carries packets between two devices, both ways, as a wire would,
// until either device is closed. The returned func waits for both copies
// to stop; close the devices first.
func Join(a, b tun.Device) (wait func()) {
	var wg sync.WaitGroup
	wg.Add(2)
	go copyPackets(a, b, &wg)
	go copyPackets(b, a, &wg)
	return wg.Wait
}

func copyPackets(dst, src tun.Device, wg *sync.WaitGroup) {
	defer wg.Done()
	bufs := make([][]byte, max(src.BatchSize(), 1))
	sizes := make([]int, len(bufs))
	for i := range bufs {
		bufs[i] = make([]byte, 65535+16) // the largest packet behind a virtio header
	}
	out := make([][]byte, len(bufs))
	for {
		n, err := src.Read(bufs, sizes, 0)
		if err != nil {
			return
		}
		for i := range n {
			out[i] = bufs[i][:sizes[i]]
		}
		if _, err := dst.Write(out[:n], 0); err != nil {
			return
		}
	}
}
