package gateway

import (
	"errors"
	"os"
	"time"

	"go.uber.org/zap"
	"golang.zx2c4.com/wireguard/tun"

	"github.com/sluice-vpn/sluice/netstack"
)

// pumpOffset is the headroom left in front of each packet, for devices
// that prepend a header of their own (a virtio-net header is 10 bytes).
const pumpOffset = 16

// pump moves batches of packets from src to dst until either is closed.
func (s *Server) pump(name string, dst, src tun.Device) {
	defer s.workers.Done()
	batch := max(src.BatchSize(), 1)
	bufs := make([][]byte, batch)
	sizes := make([]int, batch)
	for i := range bufs {
		// Room for the largest IP packet behind a virtio header.
		bufs[i] = make([]byte, pumpOffset+netstack.VirtioNetHdrLen+65535)
	}
	out := make([][]byte, batch)
	var lastLog time.Time
	for {
		n, err := src.Read(bufs, sizes, pumpOffset)
		if err != nil {
			if !errors.Is(err, os.ErrClosed) {
				s.log.Warn("pump stopped: read failed", zap.String("pump", name), zap.Error(err))
			}
			return
		}
		for i := range n {
			out[i] = bufs[i][:pumpOffset+sizes[i]]
		}
		if _, err := dst.Write(out[:n], pumpOffset); err != nil {
			if errors.Is(err, os.ErrClosed) {
				return
			}
			// One bad batch must not stop the gateway.
			if time.Since(lastLog) > 10*time.Second {
				lastLog = time.Now()
				s.log.Warn("write failed", zap.String("pump", name), zap.Error(err))
			}
		}
	}
}
