package kerneltun

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"

	"github.com/songgao/water"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/tun"
)

// Device is a kernel TUN interface. It implements tun.Device with one packet
// per Read and is safe for concurrent use.
type Device struct {
	log *zap.Logger
	// file is the TUN descriptor, non-blocking and registered with the
	// runtime poller, so that Close wakes a blocked Read.
	file *os.File
	// handed is the caller's Options.File, closed with the device; nil
	// when Open created the interface.
	handed *os.File
	// control is a socket in the interface's network namespace for MTU
	// queries; nil when the interface lives in another namespace.
	control *os.File
	// name and mtu are what Open found, for when the live values cannot be
	// read.
	name   string
	mtu    int
	events chan tun.Event
	// virtio is set when every packet carries a virtio_net_hdr.
	virtio bool

	dropped   atomic.Uint64
	closed    atomic.Bool
	closeOnce sync.Once
	closeErr  error
}

var _ tun.Device = (*Device)(nil)

// Open creates and brings up a TUN interface, or adopts Options.File; see
// Options. On Linux the caller needs CAP_NET_ADMIN to create an interface
// but not to use a handed-in File. Open works in the network namespace of
// the calling thread: lock the goroutine to a thread that has entered the
// namespace to open a device elsewhere.
func Open(opts Options) (*Device, error) {
	if err := opts.fill(); err != nil {
		return nil, err
	}
	var (
		d   *Device
		err error
	)
	if opts.File != nil {
		d, err = adopt(opts)
	} else {
		d, err = create(opts)
	}
	if err != nil {
		return nil, err
	}
	d.events <- tun.EventUp
	d.log.Info("opened", zap.String("name", d.name), zap.Int("mtu", d.mtu), zap.Bool("handed", d.handed != nil),
		zap.Bool("offload", d.virtio))
	return d, nil
}

func create(opts Options) (*Device, error) {
	if opts.VirtioNetHdr {
		return createVirtio(opts)
	}
	ifce, err := water.New(water.Config{
		DeviceType:             water.TUN,
		PlatformSpecificParams: water.PlatformSpecificParams{Name: opts.Name},
	})
	if err != nil {
		return nil, fmt.Errorf("kerneltun: create %q: %w", opts.Name, err)
	}
	// water opens the device non-blocking and wraps it with os.NewFile,
	// which is what puts it under the runtime poller.
	file, ok := ifce.ReadWriteCloser.(*os.File)
	if !ok {
		ifce.Close()
		return nil, fmt.Errorf("kerneltun: create %q: water returned %T, not a file", opts.Name, ifce.ReadWriteCloser)
	}
	d := &Device{log: opts.Logger, file: file, name: ifce.Name(), mtu: opts.MTU, events: make(chan tun.Event, 1)}
	if err := d.setup(opts.MTU); err != nil {
		d.release()
		return nil, fmt.Errorf("kerneltun: create %s: %w", d.name, err)
	}
	return d, nil
}

// createVirtio creates the interface with IFF_VNET_HDR, which water cannot
// ask for, and turns on TCP segmentation offload.
func createVirtio(opts Options) (*Device, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("kerneltun: create %q: %w", opts.Name, os.NewSyscallError("open /dev/net/tun", err))
	}
	ifr, err := unix.NewIfreq(opts.Name)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("kerneltun: create %q: %w", opts.Name, err)
	}
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("kerneltun: create %q: %w", opts.Name, os.NewSyscallError("ioctl TUNSETIFF", err))
	}
	if err := enableOffload(fd); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("kerneltun: create %s: %w", ifr.Name(), err)
	}
	// os.NewFile puts a non-blocking descriptor under the runtime poller.
	file := os.NewFile(uintptr(fd), "/dev/net/tun")
	d := &Device{log: opts.Logger, file: file, name: ifr.Name(), mtu: opts.MTU, events: make(chan tun.Event, 1), virtio: true}
	if err := d.setup(opts.MTU); err != nil {
		d.release()
		return nil, fmt.Errorf("kerneltun: create %s: %w", d.name, err)
	}
	return d, nil
}

// enableOffload sets the header size the device uses (another holder may
// have changed it) and lets the kernel hand over TCP segments whole and
// with their checksums unfinished. UDP segmentation offload stays off: the
// stack takes datagrams one at a time.
func enableOffload(fd int) error {
	if err := unix.IoctlSetPointerInt(fd, unix.TUNSETVNETHDRSZ, VirtioNetHdrLen); err != nil {
		return os.NewSyscallError("ioctl TUNSETVNETHDRSZ", err)
	}
	if err := unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, unix.TUN_F_CSUM|unix.TUN_F_TSO4|unix.TUN_F_TSO6); err != nil {
		return os.NewSyscallError("ioctl TUNSETOFFLOAD", err)
	}
	return nil
}

// setup finishes an interface that Open created: close-on-exec (water does
// not set it, and the descriptor must not leak into child processes), then
// MTU, then up.
func (d *Device) setup(mtu int) error {
	if err := withFd(d.file, func(fd int) error { unix.CloseOnExec(fd); return nil }); err != nil {
		return err
	}
	control, err := controlSocket()
	if err != nil {
		return err
	}
	d.control = control
	return withFd(control, func(sock int) error {
		if err := setMTU(sock, d.name, mtu); err != nil {
			return fmt.Errorf("set MTU %d: %w", mtu, err)
		}
		if err := setUp(sock, d.name); err != nil {
			return fmt.Errorf("bring up: %w", err)
		}
		return nil
	})
}

func adopt(opts Options) (*Device, error) {
	// Work on a duplicate registered with the runtime poller: a descriptor
	// someone else wrapped with os.NewFile while it was blocking never
	// joins the poller, and then nothing could interrupt a Read.
	var dup int
	err := withFd(opts.File, func(fd int) error {
		var err error
		dup, err = unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
		return os.NewSyscallError("fcntl F_DUPFD_CLOEXEC", err)
	})
	if err != nil {
		return nil, fmt.Errorf("kerneltun: Options.File: %w", err)
	}
	name, flags, err := tunInfo(dup)
	virtio := false
	switch {
	case err == nil:
		if err := checkFlags(flags, opts.VirtioNetHdr); err != nil {
			unix.Close(dup)
			return nil, fmt.Errorf("kerneltun: Options.File %s: %w", name, err)
		}
		if flags&unix.IFF_VNET_HDR != 0 {
			if err := enableOffload(dup); err != nil {
				unix.Close(dup)
				return nil, fmt.Errorf("kerneltun: Options.File %s: %w", name, err)
			}
			virtio = true
		}
	case errors.Is(err, unix.EPERM), errors.Is(err, unix.EACCES), errors.Is(err, unix.ENOSYS):
		// A sandbox may filter the ioctl; the descriptor can still work.
		opts.Logger.Warn("cannot read interface name of handed-in TUN; assuming IFF_TUN|IFF_NO_PI", zap.Error(err))
	default:
		unix.Close(dup)
		return nil, fmt.Errorf("kerneltun: Options.File is not a usable TUN descriptor: %w", err)
	}
	if err := unix.SetNonblock(dup, true); err != nil {
		unix.Close(dup)
		return nil, fmt.Errorf("kerneltun: Options.File: set non-blocking: %w", err)
	}
	d := &Device{
		log:    opts.Logger,
		file:   os.NewFile(uintptr(dup), "tun"),
		handed: opts.File,
		name:   name,
		mtu:    opts.MTU,
		events: make(chan tun.Event, 1),
		virtio: virtio,
	}
	if name != "" {
		d.adoptControl()
	}
	return d, nil
}

// checkFlags refuses interfaces whose packets would not be IP, or would
// carry a virtio header the caller did not ask for. It cannot check
// IFF_NO_PI: TUNGETIFF reports the read-only IFF_NOFILTER in the same bit
// (0x1000) whenever no socket filter is attached.
func checkFlags(flags uint16, virtio bool) error {
	switch {
	case flags&(unix.IFF_TUN|unix.IFF_TAP) != unix.IFF_TUN:
		return errors.New("not a TUN (IFF_TUN) interface")
	case flags&unix.IFF_VNET_HDR != 0 && !virtio:
		return errors.New("packets carry a virtio-net header (IFF_VNET_HDR set) and Options.VirtioNetHdr is not set")
	}
	return nil
}

// adoptControl sets up live MTU queries for a handed-in interface, if it is
// in our network namespace; an interface of the same name in another
// namespace would give a wrong answer, so then MTU reports Options.MTU.
func (d *Device) adoptControl() {
	control, err := controlSocket()
	if err != nil {
		d.log.Warn("no control socket; MTU reports Options.MTU", zap.Error(err))
		return
	}
	var (
		same, known bool
		mtu         int
		mtuErr      error
	)
	err = withFd(d.file, func(tunFd int) error {
		return withFd(control, func(sock int) error {
			same, known = sameNetns(tunFd, sock)
			if !known || same {
				mtu, mtuErr = getMTU(sock, d.name)
			}
			return nil
		})
	})
	switch {
	case err != nil:
	case known && !same:
		d.log.Info("interface is in another network namespace; MTU reports Options.MTU", zap.String("name", d.name))
	case mtuErr != nil:
		d.log.Warn("cannot read interface MTU; MTU reports Options.MTU", zap.String("name", d.name), zap.Error(mtuErr))
	default:
		d.mtu = mtu
		d.control = control
		return
	}
	control.Close()
}

// File returns the TUN descriptor. Calling Fd on it switches it to blocking
// mode, after which Close can no longer interrupt a pending Read.
func (d *Device) File() *os.File { return d.file }

// BatchSize returns 1: a TUN descriptor yields one packet per read (with
// a virtio header, that packet may be a 64 KiB TCP segment).
func (d *Device) BatchSize() int { return 1 }

// VirtioNetHdr reports whether every packet that Read returns and Write
// takes begins with a VirtioNetHdrLen-byte virtio_net_hdr; see
// Options.VirtioNetHdr.
func (d *Device) VirtioNetHdr() bool { return d.virtio }

// Events returns a channel that delivers tun.EventUp once and is closed by
// Close. MTU changes are not reported; MTU reads the current value.
func (d *Device) Events() <-chan tun.Event { return d.events }

// Name returns the interface's current name, which follows renames.
func (d *Device) Name() (string, error) {
	var name string
	err := withFd(d.file, func(fd int) error {
		var err error
		name, _, err = tunInfo(fd)
		return err
	})
	if err != nil {
		if d.closed.Load() {
			return d.name, os.ErrClosed
		}
		if d.name == "" {
			return "", fmt.Errorf("kerneltun: name: %w", err)
		}
		return d.name, nil
	}
	return name, nil
}

// MTU returns the interface's current MTU, or the MTU Open found or was
// given when the interface cannot be queried (see Options.File).
func (d *Device) MTU() (int, error) {
	if d.control == nil {
		return d.mtu, nil
	}
	name, err := d.Name()
	if err != nil {
		return d.mtu, err
	}
	var mtu int
	err = withFd(d.control, func(sock int) error {
		var err error
		mtu, err = getMTU(sock, name)
		return err
	})
	if err != nil {
		if d.closed.Load() {
			return d.mtu, os.ErrClosed
		}
		return d.mtu, fmt.Errorf("kerneltun: %s: %w", name, err)
	}
	return mtu, nil
}

// Read reads one packet, behind its virtio header if the device has them,
// into bufs[0][offset:] and sets sizes[0]. It blocks until a packet arrives
// or the device is closed, then returns os.ErrClosed.
// A packet larger than the buffer is lost and reported as an error.
func (d *Device) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	if len(bufs) == 0 || len(sizes) == 0 {
		return 0, nil
	}
	if offset < 0 || offset >= len(bufs[0]) {
		return 0, fmt.Errorf("kerneltun: read %s: offset %d leaves no room in a %d-byte buffer", d.name, offset, len(bufs[0]))
	}
	buf := bufs[0][offset:]
	n, err := d.file.Read(buf)
	if err != nil {
		if d.closed.Load() || errors.Is(err, os.ErrClosed) {
			return 0, os.ErrClosed
		}
		return 0, fmt.Errorf("kerneltun: read %s: %w", d.name, err)
	}
	// The kernel silently cuts a packet to the buffer; only the IP header
	// still tells how long it was.
	if n >= len(buf) {
		hdr := 0
		if d.virtio {
			hdr = VirtioNetHdrLen
		}
		if full := hdr + ipLength(buf[min(hdr, n):min(n, len(buf))]); full > len(buf) || n > len(buf) {
			return 0, fmt.Errorf("kerneltun: read %s: packet of %d bytes truncated to a %d-byte buffer", d.name, max(full, n), len(buf))
		}
	}
	sizes[0] = n
	return 1, nil
}

// ipLength returns the length an IP packet's header declares, or 0 when it
// does not say (too short, not IP, IPv6 jumbogram).
func ipLength(p []byte) int {
	switch {
	case len(p) >= 20 && p[0]>>4 == 4:
		return int(binary.BigEndian.Uint16(p[2:]))
	case len(p) >= 40 && p[0]>>4 == 6:
		if l := int(binary.BigEndian.Uint16(p[4:])); l > 0 {
			return 40 + l
		}
	}
	return 0
}

// Write writes each bufs[i][offset:] as one packet and returns how many it
// consumed. A packet the kernel refuses (not IPv4 or IPv6, too short, too
// long, interface down) or has no memory for is dropped and counted in
// DroppedWrites, so that one bad packet cannot stop the device; other errors
// end the call. Empty packets are skipped.
func (d *Device) Write(bufs [][]byte, offset int) (int, error) {
	for i, b := range bufs {
		if offset < 0 || offset > len(b) {
			return i, fmt.Errorf("kerneltun: write %s: offset %d beyond a %d-byte buffer", d.name, offset, len(b))
		}
		pkt := b[offset:]
		if len(pkt) == 0 {
			continue
		}
		_, err := d.file.Write(pkt)
		switch {
		case err == nil:
		case d.closed.Load() || errors.Is(err, os.ErrClosed):
			return i, os.ErrClosed
		case errors.Is(err, unix.EINVAL), errors.Is(err, unix.EIO), errors.Is(err, unix.EMSGSIZE),
			errors.Is(err, unix.ENOBUFS), errors.Is(err, unix.ENOMEM):
			if d.dropped.Add(1) == 1 {
				d.log.Warn("kernel refused a packet; dropping it, later drops are only counted",
					zap.String("name", d.name), zap.Int("size", len(pkt)), zap.Error(err))
			}
		default:
			return i, fmt.Errorf("kerneltun: write %s: %w", d.name, err)
		}
	}
	return len(bufs), nil
}

// DroppedWrites returns how many packets Write dropped because the kernel
// refused them.
func (d *Device) DroppedWrites() uint64 { return d.dropped.Load() }

// Close closes the descriptor, which wakes a blocked Read with os.ErrClosed,
// and closes the Events channel. An interface that Open created goes away
// with it. A handed-in one is left as it is, though the kernel removes it too
// if it is not persistent and this was its last descriptor. Close is
// idempotent.
func (d *Device) Close() error {
	d.closeOnce.Do(func() {
		d.closed.Store(true)
		d.closeErr = d.release()
		close(d.events)
		d.log.Info("closed", zap.String("name", d.name))
	})
	return d.closeErr
}

// release closes every descriptor the device holds.
func (d *Device) release() error {
	err := d.file.Close()
	if d.handed != nil {
		d.handed.Close()
	}
	if d.control != nil {
		d.control.Close()
	}
	if err != nil {
		return fmt.Errorf("kerneltun: close %s: %w", d.name, err)
	}
	return nil
}
