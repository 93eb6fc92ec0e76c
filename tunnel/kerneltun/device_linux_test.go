package kerneltun

import (
	"bytes"
	"errors"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/tun"
)

const readTimeout = 3 * time.Second

// open opens a device on the namespace's thread and closes it when the test
// ends.
func open(t *testing.T, ns *netns, opts Options) *Device {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = zaptest.NewLogger(t)
	}
	var d *Device
	err := ns.do(func() error {
		var err error
		d, err = Open(opts)
		return err
	})
	if err != nil {
		t.Fatalf("Open(%+v): %v", opts, err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// readUDP reads packets from d until an IPv4 UDP packet for dst arrives,
// skipping anything else the kernel sends on its own, and returns it parsed.
func readUDP(t *testing.T, d *Device, dst netip.AddrPort) udp4Packet {
	t.Helper()
	type result struct {
		raw []byte
		err error
	}
	got := make(chan result, 1)
	go func() {
		bufs, sizes := [][]byte{make([]byte, 16+MaxMTU)}, []int{0}
		for {
			n, err := d.Read(bufs, sizes, 16)
			if err != nil {
				got <- result{err: err}
				return
			}
			if n != 1 {
				got <- result{err: errors.New("Read returned no packet and no error")}
				return
			}
			p := bufs[0][16 : 16+sizes[0]]
			if len(p) >= 24 && p[0]>>4 == 4 && p[9] == 17 {
				u := netip.AddrPortFrom(netip.AddrFrom4([4]byte(p[16:20])), uint16(p[22])<<8|uint16(p[23]))
				if u == dst {
					got <- result{raw: bytes.Clone(p)}
					return
				}
			}
		}
	}()
	select {
	case r := <-got:
		if r.err != nil {
			t.Fatalf("Read: %v", r.err)
		}
		u, err := parseUDP4(r.raw)
		if err != nil {
			t.Fatalf("packet read from the device: %v", err)
		}
		return u
	case <-time.After(readTimeout):
		// The reader ends when the test's cleanup closes the device.
		t.Fatalf("no packet for %v within %v", dst, readTimeout)
		return udp4Packet{}
	}
}

// interfaceState returns the interface as the namespace sees it.
func interfaceState(t *testing.T, ns *netns, name string) (*net.Interface, error) {
	t.Helper()
	var ifi *net.Interface
	err := ns.do(func() error {
		var err error
		ifi, err = net.InterfaceByName(name)
		return err
	})
	return ifi, err
}

func TestOptionsValidation(t *testing.T) {
	for _, tc := range []struct {
		opts  Options
		field string
	}{
		{Options{MTU: -1}, "Options.MTU"},
		{Options{MTU: MinMTU - 1}, "Options.MTU"},
		{Options{MTU: MaxMTU + 1}, "Options.MTU"},
		{Options{Name: "a-name-of-16-chr"}, "Options.Name"},
	} {
		d, err := Open(tc.opts)
		if err == nil {
			d.Close()
		}
		if err == nil || !strings.Contains(err.Error(), tc.field) {
			t.Errorf("Open(%+v) = %v; want an error naming %s", tc.opts, err, tc.field)
		}
	}
}

func TestPacketHelpers(t *testing.T) {
	src := netip.MustParseAddrPort("10.1.2.3:1000")
	dst := netip.MustParseAddrPort("10.3.2.1:53")
	p := udp4(src, dst, []byte("odd-length payload!"))
	u, err := parseUDP4(p)
	if err != nil {
		t.Fatalf("parse of a built packet: %v", err)
	}
	if u.src != src || u.dst != dst || string(u.payload) != "odd-length payload!" {
		t.Fatalf("parsed %v -> %v %q", u.src, u.dst, u.payload)
	}
	for _, i := range []int{5, 15, 21, len(p) - 1} {
		bad := bytes.Clone(p)
		bad[i] ^= 0x10
		if _, err := parseUDP4(bad); err == nil {
			t.Errorf("flipping a bit in byte %d went unnoticed", i)
		}
	}
}

// TestCreateReadWrite creates an interface, routes a datagram from the
// namespace into it and reads it from the device, then writes a datagram
// into the device and receives it on a socket in the namespace.
func TestCreateReadWrite(t *testing.T) {
	ns := newNetns(t)
	d := open(t, ns, Options{Name: "sluicekt0", MTU: 1400})
	ns.quietIPv6(t, "sluicekt0")

	if name, err := d.Name(); name != "sluicekt0" || err != nil {
		t.Errorf("Name() = %q, %v", name, err)
	}
	if mtu, err := d.MTU(); mtu != 1400 || err != nil {
		t.Errorf("MTU() = %d, %v; want 1400", mtu, err)
	}
	if d.BatchSize() != 1 {
		t.Errorf("BatchSize() = %d", d.BatchSize())
	}
	if d.File() == nil {
		t.Error("File() is nil")
	}
	select {
	case ev := <-d.Events():
		if ev != tun.EventUp {
			t.Errorf("first event %v; want EventUp", ev)
		}
	default:
		t.Error("no EventUp queued")
	}
	ifi, err := interfaceState(t, ns, "sluicekt0")
	if err != nil {
		t.Fatalf("interface in the namespace: %v", err)
	}
	if ifi.MTU != 1400 || ifi.Flags&net.FlagUp == 0 || ifi.Flags&net.FlagRunning == 0 {
		t.Errorf("interface: MTU %d, flags %v; want MTU 1400, up and running", ifi.MTU, ifi.Flags)
	}
	if addrs, _ := ifi.Addrs(); len(addrs) != 0 {
		// Addresses are the operator's business, not Open's.
		t.Errorf("Open assigned addresses %v", addrs)
	}
	ns.ip(t, "addr", "add", "10.250.0.1/24", "dev", "sluicekt0")

	// Out of the namespace's stack, into the device.
	peer := netip.MustParseAddrPort("10.250.0.2:9")
	var local netip.AddrPort
	err = ns.do(func() error {
		c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(peer))
		if err != nil {
			return err
		}
		t.Cleanup(func() { c.Close() })
		local = c.LocalAddr().(*net.UDPAddr).AddrPort()
		_, err = c.Write([]byte("from the kernel"))
		return err
	})
	if err != nil {
		t.Fatalf("send into the TUN: %v", err)
	}
	u := readUDP(t, d, peer)
	if u.src.Addr() != netip.MustParseAddr("10.250.0.1") || u.src.Port() != local.Port() || string(u.payload) != "from the kernel" {
		t.Errorf("read %v -> %v %q; want 10.250.0.1:%d -> %v %q", u.src, u.dst, u.payload, local.Port(), peer, "from the kernel")
	}

	// Out of the device, into a socket in the namespace.
	var sock *net.UDPConn
	err = ns.do(func() error {
		var err error
		sock, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(10, 250, 0, 1)})
		return err
	})
	if err != nil {
		t.Fatalf("listen in the namespace: %v", err)
	}
	t.Cleanup(func() { sock.Close() })
	dst := sock.LocalAddr().(*net.UDPAddr).AddrPort()
	const off = 16
	good := append(make([]byte, off), udp4(peer, dst, []byte("from the device"))...)
	garbage := append(make([]byte, off), make([]byte, 40)...) // IP version 0
	n, err := d.Write([][]byte{garbage, make([]byte, off), good}, off)
	if n != 3 || err != nil {
		t.Fatalf("Write = %d, %v; want 3, nil with the bad packet dropped", n, err)
	}
	if got := d.DroppedWrites(); got != 1 {
		t.Errorf("DroppedWrites() = %d; want 1", got)
	}
	sock.SetReadDeadline(time.Now().Add(readTimeout))
	buf := make([]byte, 100)
	nr, from, err := sock.ReadFromUDPAddrPort(buf)
	if err != nil {
		t.Fatalf("receive what the device wrote: %v", err)
	}
	if from != peer || string(buf[:nr]) != "from the device" {
		t.Errorf("received %q from %v; want %q from %v", buf[:nr], from, "from the device", peer)
	}
}

func TestReadShortBuffer(t *testing.T) {
	ns := newNetns(t)
	d := open(t, ns, Options{Name: "sluicekt0"})
	ns.quietIPv6(t, "sluicekt0")
	ns.ip(t, "addr", "add", "10.250.0.1/24", "dev", "sluicekt0")
	err := ns.do(func() error {
		c, err := net.Dial("udp4", "10.250.0.2:9")
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.Write(make([]byte, 300))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	// Anything small the kernel sends on its own fits; the 328-byte packet
	// does not and must not come back as a size beyond the buffer.
	bufs, sizes := [][]byte{make([]byte, 100)}, []int{0}
	deadline := time.AfterFunc(readTimeout, func() { d.Close() })
	defer deadline.Stop()
	for {
		n, err := d.Read(bufs, sizes, 0)
		if errors.Is(err, os.ErrClosed) {
			t.Fatal("no error for a packet larger than the buffer")
		}
		if err != nil {
			if !strings.Contains(err.Error(), "truncated") {
				t.Errorf("error %v; want one about truncation", err)
			}
			return
		}
		if n != 1 || sizes[0] > len(bufs[0]) {
			t.Fatalf("Read = %d with size %d into a %d-byte buffer", n, sizes[0], len(bufs[0]))
		}
	}
}

func TestCloseUnblocksRead(t *testing.T) {
	ns := newNetns(t)
	// No name: the kernel picks one.
	d := open(t, ns, Options{})
	name, err := d.Name()
	if err != nil || name == "" {
		t.Fatalf("Name() = %q, %v", name, err)
	}
	if ifi, err := interfaceState(t, ns, name); err != nil || ifi.MTU != DefaultMTU {
		t.Fatalf("interface %s: %+v, %v; want MTU %d", name, ifi, err, DefaultMTU)
	}

	got := make(chan error, 1)
	go func() {
		// Nothing is routed into the device; only what the kernel sends on
		// its own (IPv6 router solicitations and the like) can arrive.
		for {
			if _, err := d.Read([][]byte{make([]byte, 2000)}, []int{0}, 0); err != nil {
				got <- err
				return
			}
		}
	}()
	select {
	case err := <-got:
		t.Fatalf("Read returned %v before Close", err)
	case <-time.After(100 * time.Millisecond):
	}
	if err := d.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	select {
	case err := <-got:
		if err != os.ErrClosed {
			t.Fatalf("Read after Close: %v; want os.ErrClosed", err)
		}
	case <-time.After(time.Second):
		t.Fatal("Close did not unblock Read")
	}

	if _, err := d.Read([][]byte{make([]byte, 2000)}, []int{0}, 0); err != os.ErrClosed {
		t.Errorf("Read on a closed device: %v", err)
	}
	if _, err := d.Write([][]byte{udp4(netip.MustParseAddrPort("10.0.0.1:1"), netip.MustParseAddrPort("10.0.0.2:2"), nil)}, 0); err != os.ErrClosed {
		t.Errorf("Write on a closed device: %v", err)
	}
	if err := d.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	for range d.Events() { // EventUp, then closed
	}
	if _, err := interfaceState(t, ns, name); err == nil {
		t.Errorf("interface %s still exists after Close", name)
	}
}

// makeTUN creates an interface the way a container runtime would, outside
// Open, with a blocking descriptor, on the namespace's thread.
func makeTUN(t *testing.T, ns *netns, name string, flags uint16) *os.File {
	t.Helper()
	var f *os.File
	err := ns.do(func() error {
		fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		ifr, err := unix.NewIfreq(name)
		if err != nil {
			unix.Close(fd)
			return err
		}
		ifr.SetUint16(flags)
		if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
			unix.Close(fd)
			return err
		}
		f = os.NewFile(uintptr(fd), name)
		return nil
	})
	if err != nil {
		t.Fatalf("create %s by hand: %v", name, err)
	}
	return f
}

func TestAdoptFile(t *testing.T) {
	ns := newNetns(t)
	f := makeTUN(t, ns, "sluicekt1", unix.IFF_TUN|unix.IFF_NO_PI)
	ns.quietIPv6(t, "sluicekt1")
	ns.ip(t, "link", "set", "sluicekt1", "mtu", "1380", "up")
	ns.ip(t, "addr", "add", "10.250.1.1/24", "dev", "sluicekt1")

	d := open(t, ns, Options{File: f, Name: "ignored", MTU: 1300})
	if name, err := d.Name(); name != "sluicekt1" || err != nil {
		t.Errorf("Name() = %q, %v; want sluicekt1", name, err)
	}
	if mtu, err := d.MTU(); mtu != 1380 || err != nil {
		t.Errorf("MTU() = %d, %v; want the interface's 1380", mtu, err)
	}
	ns.ip(t, "link", "set", "sluicekt1", "mtu", "1360")
	if mtu, err := d.MTU(); mtu != 1360 || err != nil {
		t.Errorf("MTU() after change = %d, %v; want 1360", mtu, err)
	}
	ns.ip(t, "link", "set", "sluicekt1", "name", "sluicekt2")
	if name, err := d.Name(); name != "sluicekt2" || err != nil {
		t.Errorf("Name() after rename = %q, %v; want sluicekt2", name, err)
	}
	if mtu, err := d.MTU(); mtu != 1360 || err != nil {
		t.Errorf("MTU() after rename = %d, %v; want 1360", mtu, err)
	}

	peer := netip.MustParseAddrPort("10.250.1.2:9")
	err := ns.do(func() error {
		c, err := net.Dial("udp4", peer.String())
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.Write([]byte("handed in"))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if u := readUDP(t, d, peer); string(u.payload) != "handed in" {
		t.Errorf("read %q", u.payload)
	}

	// The caller's descriptor was blocking; Close must still wake a Read.
	got := make(chan error, 1)
	go func() {
		for {
			if _, err := d.Read([][]byte{make([]byte, 2000)}, []int{0}, 0); err != nil {
				got <- err
				return
			}
		}
	}()
	time.Sleep(100 * time.Millisecond)
	d.Close()
	select {
	case err := <-got:
		if err != os.ErrClosed {
			t.Fatalf("Read after Close: %v; want os.ErrClosed", err)
		}
	case <-time.After(time.Second):
		t.Fatal("Close did not unblock Read on a handed-in descriptor")
	}
	if err := f.Close(); !errors.Is(err, os.ErrClosed) {
		t.Errorf("handed-in File still open after Close (Close: %v)", err)
	}
}

func TestAdoptRejects(t *testing.T) {
	ns := newNetns(t)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	unattached, err := os.OpenFile("/dev/net/tun", os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		file *os.File
	}{
		{"TAP", makeTUN(t, ns, "sluicetap0", unix.IFF_TAP|unix.IFF_NO_PI)},
		{"virtio header", makeTUN(t, ns, "sluicekt4", unix.IFF_TUN|unix.IFF_NO_PI|unix.IFF_VNET_HDR)},
		{"no interface yet", unattached},
		{"pipe", r},
	} {
		t.Run(tc.name, func(t *testing.T) {
			defer tc.file.Close()
			var d *Device
			err := ns.do(func() error {
				var err error
				d, err = Open(Options{File: tc.file})
				return err
			})
			if err == nil {
				d.Close()
				t.Fatal("Open accepted it")
			}
			t.Logf("refused: %v", err)
			if !strings.Contains(err.Error(), "Options.File") {
				t.Errorf("error %q does not name Options.File", err)
			}
			// On failure the caller keeps the file.
			if err := withFd(tc.file, func(int) error { return nil }); err != nil {
				t.Errorf("Open closed the caller's file on failure: %v", err)
			}
		})
	}
}

func TestCreateNameTaken(t *testing.T) {
	ns := newNetns(t)
	err := ns.do(func() error {
		d, err := Open(Options{Name: "lo"})
		if err == nil {
			d.Close()
		}
		return err
	})
	if err == nil || !strings.Contains(err.Error(), `"lo"`) {
		t.Fatalf("Open over the loopback interface: %v; want an error naming it", err)
	}
}
