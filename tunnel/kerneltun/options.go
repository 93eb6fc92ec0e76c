// Package kerneltun is a kernel TUN device (Linux) as a tun.Device: IP
// packets, one per Read, with no packet-information header, and with a
// virtio-net header and TCP segmentation offload when asked for
// (Options.VirtioNetHdr).
//
// It either creates the interface itself (through github.com/songgao/water),
// sets its MTU and brings it up, or takes a TUN file descriptor that someone
// else created, such as a container runtime handing one to an unprivileged
// process. It never assigns addresses or routes: those belong to the operator.
package kerneltun

import (
	"fmt"
	"os"

	"go.uber.org/zap"
)

// DefaultMTU is the MTU set on an interface that Open creates when
// Options.MTU is zero: WireGuard's usual 1420.
const DefaultMTU = 1420

// Interface MTU limits accepted by Options.MTU; the kernel refuses anything
// outside them on a TUN device.
const (
	MinMTU = 68
	MaxMTU = 65535
)

// VirtioNetHdrLen is the length of the virtio_net_hdr that precedes each
// packet of a Device whose VirtioNetHdr is true.
const VirtioNetHdrLen = 10

// ifNameSize is IFNAMSIZ: interface names have at most 15 bytes.
const ifNameSize = 16

// Options configures Open. The zero value creates an interface with a name
// the kernel picks and an MTU of 1420.
type Options struct {
	// Name is the interface to create, e.g. "sluice0"; empty lets the
	// kernel choose (tun0, tun1, ...). Ignored when File is set.
	Name string
	// File is an open TUN file descriptor for an interface created by
	// someone else. It must have been set up with IFF_TUN | IFF_NO_PI, and
	// with IFF_VNET_HDR only if VirtioNetHdr is set; Open refuses TAP
	// devices, but the kernel does not let it tell whether IFF_NO_PI was
	// set. When set, Open creates nothing; with VirtioNetHdr it sets the
	// interface's virtio header size and offloads, which every holder of
	// the interface then sees. The Device takes ownership of File and
	// closes it on Close. File is switched to non-blocking
	// mode, which other holders of the same open file will see too.
	File *os.File
	// MTU is set on the interface when Open creates it. With File it is
	// only what MTU reports if the interface's own MTU cannot be read.
	// Default 1420.
	MTU int
	// VirtioNetHdr asks for a virtio_net_hdr in front of every packet and
	// for TCP segmentation offload: Open creates the interface with
	// IFF_VNET_HDR, and with File it accepts a descriptor opened that way
	// (one opened without it still works, plainly). Device.VirtioNetHdr
	// reports which it got. With the header, Read returns and Write takes
	// TCP segments of up to 64 KiB that the kernel merged or is to cut and
	// checksum (see netstack.Options.VirtioNetHdr), which spares a system
	// call and a pass through both stacks for every MTU-sized packet; Read's
	// buffers must then hold VirtioNetHdrLen + 65535 bytes.
	VirtioNetHdr bool
	// Logger receives open/close and dropped-packet notices; nil means no
	// logs.
	Logger *zap.Logger
}

func (o *Options) fill() error {
	switch {
	case o.MTU == 0:
		o.MTU = DefaultMTU
	case o.MTU < MinMTU || o.MTU > MaxMTU:
		return fmt.Errorf("kerneltun: Options.MTU %d out of range [%d, %d]", o.MTU, MinMTU, MaxMTU)
	}
	if o.File == nil && len(o.Name) >= ifNameSize {
		return fmt.Errorf("kerneltun: Options.Name %q longer than %d bytes", o.Name, ifNameSize-1)
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	o.Logger = o.Logger.Named("kerneltun")
	return nil
}
