//go:build !linux

package kerneltun

import (
	"errors"
	"fmt"
	"os"
	"runtime"

	"golang.zx2c4.com/wireguard/tun"
)

// Device is a kernel TUN device. It is only implemented on Linux; elsewhere
// Open always fails.
type Device struct{}

var _ tun.Device = (*Device)(nil)

var errUnsupported = fmt.Errorf("kerneltun: not supported on %s: %w", runtime.GOOS, errors.ErrUnsupported)

// Open fails: kernel TUN devices are only supported on Linux.
func Open(opts Options) (*Device, error) {
	if err := opts.fill(); err != nil {
		return nil, err
	}
	return nil, errUnsupported
}

// File returns nil.
func (d *Device) File() *os.File { return nil }

// Read fails.
func (d *Device) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	return 0, errUnsupported
}

// Write fails.
func (d *Device) Write(bufs [][]byte, offset int) (int, error) { return 0, errUnsupported }

// MTU fails.
func (d *Device) MTU() (int, error) { return 0, errUnsupported }

// Name fails.
func (d *Device) Name() (string, error) { return "", errUnsupported }

// Events returns nil.
func (d *Device) Events() <-chan tun.Event { return nil }

// Close does nothing.
func (d *Device) Close() error { return nil }

// BatchSize returns 1.
func (d *Device) BatchSize() int { return 1 }

// DroppedWrites returns 0.
func (d *Device) DroppedWrites() uint64 { return 0 }

// VirtioNetHdr returns false.
func (d *Device) VirtioNetHdr() bool { return false }
