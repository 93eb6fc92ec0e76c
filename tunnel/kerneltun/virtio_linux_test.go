package kerneltun

import (
	"bytes"
	"encoding/binary"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestVirtioReadWrite opens an interface with virtio headers and TCP
// offloads and checks both directions against the kernel: what it reads
// is a header and then the IP packet, with a checksum the kernel left
// for the receiver to finish; what it writes behind a header saying the
// same is finished by the kernel and delivered.
func TestVirtioReadWrite(t *testing.T) {
	ns := newNetns(t)
	d := open(t, ns, Options{Name: "sluicekt5", VirtioNetHdr: true})
	ns.quietIPv6(t, "sluicekt5")
	if !d.VirtioNetHdr() {
		t.Fatal("VirtioNetHdr() is false for an interface created with it")
	}
	ns.ip(t, "addr", "add", "10.250.0.1/24", "dev", "sluicekt5")
	local := netip.MustParseAddr("10.250.0.1")
	peer := netip.MustParseAddrPort("10.250.0.2:9")

	// Into the device: a datagram from a socket in the namespace.
	var from netip.AddrPort
	err := ns.do(func() error {
		c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(peer))
		if err != nil {
			return err
		}
		t.Cleanup(func() { c.Close() })
		from = c.LocalAddr().(*net.UDPAddr).AddrPort()
		_, err = c.Write([]byte("from the kernel"))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	hdr, p := readVirtio(t, d, peer)
	if len(p) != 20+8+15 || !bytes.Equal(p[28:], []byte("from the kernel")) ||
		binary.BigEndian.Uint16(p[20:]) != from.Port() {
		t.Fatalf("read %x; want the datagram from port %d", p, from.Port())
	}
	switch {
	case hdr[1] != 0:
		t.Errorf("gso_type %d for a small datagram", hdr[1])
	case hdr[0]&1 != 0: // NEEDS_CSUM: the field holds the pseudo-header sum
		if got, want := binary.BigEndian.Uint16(p[26:]), uint16(udpPseudoSum(local, peer.Addr(), 8+15)); got != want {
			t.Errorf("unfinished UDP checksum %#04x; want the pseudo-header sum %#04x", got, want)
		}
	default:
		if _, err := parseUDP4(p); err != nil {
			t.Errorf("a packet with a finished checksum: %v", err)
		}
	}

	// Out of the device: one datagram with its checksum finished, one left
	// for the kernel, as the gateway sends them.
	var sock *net.UDPConn
	err = ns.do(func() error {
		var err error
		sock, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(10, 250, 0, 1)})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sock.Close()
	dst := sock.LocalAddr().(*net.UDPAddr).AddrPort()
	finished := udp4(peer, dst, []byte("finished"))
	partial := udp4(peer, dst, []byte("for the kernel"))
	binary.BigEndian.PutUint16(partial[26:], uint16(udpPseudoSum(peer.Addr(), dst.Addr(), len(partial)-20)))
	const off = 16
	buf := func(flags byte, pkt []byte) []byte {
		b := make([]byte, off+VirtioNetHdrLen, off+VirtioNetHdrLen+len(pkt))
		b[off] = flags
		if flags&1 != 0 {
			binary.LittleEndian.PutUint16(b[off+6:], 20) // csum_start: the UDP header
			binary.LittleEndian.PutUint16(b[off+8:], 6)  // csum_offset: its checksum
		}
		return append(b, pkt...)
	}
	if n, err := d.Write([][]byte{buf(0, finished), buf(1, partial)}, off); n != 2 || err != nil {
		t.Fatalf("Write = %d, %v", n, err)
	}
	for _, want := range []string{"finished", "for the kernel"} {
		sock.SetReadDeadline(time.Now().Add(readTimeout))
		b := make([]byte, 100)
		n, src, err := sock.ReadFromUDPAddrPort(b)
		if err != nil {
			t.Fatalf("waiting for %q: %v", want, err)
		}
		if src != peer || string(b[:n]) != want {
			t.Errorf("received %q from %v; want %q from %v", b[:n], src, want, peer)
		}
	}
	if got := d.DroppedWrites(); got != 0 {
		t.Errorf("DroppedWrites() = %d", got)
	}
}

// readVirtio reads until a UDP packet for dst arrives and returns its
// virtio header and the IP packet behind it.
func readVirtio(t *testing.T, d *Device, dst netip.AddrPort) (hdr, pkt []byte) {
	t.Helper()
	type result struct{ hdr, pkt []byte }
	got := make(chan result, 1)
	go func() {
		bufs, sizes := [][]byte{make([]byte, 16+VirtioNetHdrLen+MaxMTU)}, []int{0}
		for {
			n, err := d.Read(bufs, sizes, 16)
			if err != nil || n != 1 {
				close(got)
				return
			}
			b := bufs[0][16 : 16+sizes[0]]
			if len(b) < VirtioNetHdrLen {
				continue
			}
			p := b[VirtioNetHdrLen:]
			if len(p) >= 24 && p[0]>>4 == 4 && p[9] == 17 &&
				netip.AddrPortFrom(netip.AddrFrom4([4]byte(p[16:20])), binary.BigEndian.Uint16(p[22:])) == dst {
				got <- result{bytes.Clone(b[:VirtioNetHdrLen]), bytes.Clone(p)}
				return
			}
		}
	}()
	select {
	case r, ok := <-got:
		if !ok {
			t.Fatal("Read failed")
		}
		return r.hdr, r.pkt
	case <-time.After(readTimeout):
		t.Fatal("no packet for", dst)
	}
	return nil, nil
}

// TestAdoptVirtio adopts descriptors with and without IFF_VNET_HDR when
// virtio headers are welcome: each works the way it was opened.
func TestAdoptVirtio(t *testing.T) {
	ns := newNetns(t)
	for _, tc := range []struct {
		name   string
		flags  uint16
		virtio bool
	}{
		{"sluicekt6", unix.IFF_TUN | unix.IFF_NO_PI | unix.IFF_VNET_HDR, true},
		{"sluicekt7", unix.IFF_TUN | unix.IFF_NO_PI, false},
	} {
		f := makeTUN(t, ns, tc.name, tc.flags)
		var d *Device
		err := ns.do(func() error {
			var err error
			d, err = Open(Options{File: f, VirtioNetHdr: true})
			return err
		})
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if d.VirtioNetHdr() != tc.virtio {
			t.Errorf("%s: VirtioNetHdr() = %v; want %v", tc.name, d.VirtioNetHdr(), tc.virtio)
		}
		d.Close()
	}
}
