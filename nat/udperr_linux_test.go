package nat

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/sluice-vpn/sluice/nat/nattest"
	"golang.org/x/sys/unix"
)

type icmpReport struct {
	remote, client netip.AddrPort
	payload        string
	err            ICMPError
}

// closedPort returns a loopback UDP port that nothing listens on.
func closedPort(t *testing.T, network, addr string) netip.AddrPort {
	t.Helper()
	c, err := net.ListenPacket(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	ap := c.LocalAddr().(*net.UDPAddr).AddrPort()
	c.Close()
	return ap
}

// TestUDPPortUnreachable: a datagram to a closed port comes back as the
// kernel's port unreachable, which the mapper hands on for the flow it
// belongs to; the mapping stays up, and the next send, to a live server,
// neither fails with that error nor is lost.
func TestUDPPortUnreachable(t *testing.T) {
	for _, fam := range []struct{ network, addr string }{{"udp4", "127.0.0.1:0"}, {"udp6", "[::1]:0"}} {
		t.Run(fam.network, func(t *testing.T) {
			reports := make(chan icmpReport, 8)
			f := newUDPFixture(t, FilterAddressPortDependent, TableOptions{}, func(o *UDPOptions) {
				o.DeliverError = func(remote, client netip.AddrPort, payload []byte, e ICMPError) {
					reports <- icmpReport{remote, client, string(payload), e}
				}
			})
			client := client1
			if fam.network == "udp6" {
				client = client6
			}
			closed := closedPort(t, fam.network, fam.addr)
			if err := f.udp.Send("p", client, closed, []byte("anyone there?")); err != nil {
				t.Fatal(err)
			}
			var r icmpReport
			select {
			case r = <-reports:
			case <-time.After(3 * time.Second):
				t.Fatal("no ICMP error reported")
			}
			if r.remote != closed || r.client != client || r.payload != "anyone there?" {
				t.Errorf("reported %+v, want %v -> %v with the payload", r, client, closed)
			}
			if !errors.Is(r.err, syscall.ECONNREFUSED) || r.err.TimeExceeded || r.err.From != closed.Addr() {
				t.Errorf("error %+v, want connection refused from %v", r.err, closed.Addr())
			}
			if got := f.udp.Stats().ICMPErrors; got != 1 {
				t.Errorf("ICMPErrors = %d, want 1", got)
			}

			// Another closed port: its error is pending on the socket when
			// the next send, to a live server, goes out.
			closed2 := closedPort(t, fam.network, fam.addr)
			if err := f.udp.Send("p", client, closed2, []byte("again")); err != nil {
				t.Fatal(err)
			}
			time.Sleep(50 * time.Millisecond)
			srv := startUDPServer(t, fam.network, fam.addr)
			if err := f.udp.Send("p", client, srv.addr, []byte("hello")); err != nil {
				t.Fatalf("send to a live server after a refusal: %v", err)
			}
			if d := f.sink.next(t); d.src != srv.addr || d.dst != client {
				t.Errorf("delivered %+v", d)
			}
			select {
			case r = <-reports:
				if r.remote != closed2 {
					t.Errorf("second error for %v, want %v", r.remote, closed2)
				}
			case <-time.After(3 * time.Second):
				t.Fatal("no ICMP error reported for the second closed port")
			}
			if f.udp.Stats().Mappings != 1 {
				t.Errorf("%d mappings, want the one still open", f.udp.Stats().Mappings)
			}
		})
	}
}

// ttlServer is a loopback UDP server that reports the TTL (hop limit) of
// each datagram it reads.
func ttlServer(t *testing.T, network, addr string) (netip.AddrPort, <-chan int) {
	t.Helper()
	pc, err := net.ListenPacket(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	c := pc.(*net.UDPConn)
	t.Cleanup(func() { c.Close() })
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	rc.Control(func(fd uintptr) {
		if network == "udp4" {
			err = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_RECVTTL, 1)
		} else {
			err = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_RECVHOPLIMIT, 1)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	ttls := make(chan int, 16)
	go func() {
		buf, oob := make([]byte, 2048), make([]byte, 128)
		for {
			_, oobn, _, _, err := c.ReadMsgUDP(buf, oob)
			if err != nil {
				return
			}
			ttl := -1
			cmsgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
			for _, m := range cmsgs {
				if (m.Header.Type == unix.IP_TTL || m.Header.Type == unix.IPV6_HOPLIMIT) && len(m.Data) >= 4 {
					ttl = int(*(*int32)(unsafe.Pointer(&m.Data[0])))
				}
			}
			ttls <- ttl
		}
	}()
	return c.LocalAddr().(*net.UDPAddr).AddrPort(), ttls
}

// TestUDPSendTTL: a low TTL leaves with the datagram; a high one or none
// leaves the kernel's default.
func TestUDPSendTTL(t *testing.T) {
	for _, fam := range []struct{ network, addr string }{{"udp4", "127.0.0.1:0"}, {"udp6", "[::1]:0"}} {
		t.Run(fam.network, func(t *testing.T) {
			f := newUDPFixture(t, FilterAddressPortDependent, TableOptions{})
			client := client1
			if fam.network == "udp6" {
				client = client6
			}
			srv, ttls := ttlServer(t, fam.network, fam.addr)
			for _, tc := range []struct {
				ttl  uint8
				want int
			}{{3, 3}, {1, 1}, {31, 31}, {0, defaultTTL}, {127, defaultTTL}, {63, defaultTTL}, {32, defaultTTL}} {
				if err := f.udp.SendTTL("p", client, srv, []byte("probe"), tc.ttl); err != nil {
					t.Fatal(err)
				}
				f.udp.Flush()
				select {
				case got := <-ttls:
					if got != tc.want {
						t.Errorf("SendTTL with %d: arrived with TTL %d, want %d", tc.ttl, got, tc.want)
					}
				case <-time.After(3 * time.Second):
					t.Fatalf("SendTTL with %d: nothing arrived", tc.ttl)
				}
			}
		})
	}
}

// TestUDPSendTTLBatches: datagrams with an ordinary TTL (a Linux client's
// 64, less the gateway's hop) still leave batched.
func TestUDPSendTTLBatches(t *testing.T) {
	f := newUDPFixture(t, FilterAddressPortDependent, TableOptions{})
	srv, ttls := ttlServer(t, "udp4", "127.0.0.1:0")
	for range 4 {
		if err := f.udp.SendTTL("p", client1, srv, []byte("same size"), 63); err != nil {
			t.Fatal(err)
		}
	}
	f.udp.Flush()
	for range 4 {
		select {
		case <-ttls:
		case <-time.After(3 * time.Second):
			t.Fatal("a datagram did not arrive")
		}
	}
	// The first leaves at once; the three behind it wait for Flush.
	if f.udp.noGSO.Load() {
		t.Skip("this kernel does not segment UDP: nothing is coalesced")
	}
	if got := f.udp.Stats().Coalesced; got != 3 {
		t.Errorf("%d datagrams left coalesced, want 3", got)
	}
}

// TestUDPTimeExceeded: a router's time exceeded for a client's datagram
// is handed on with the router's address. No router runs on loopback, so
// the test plays one with a raw socket (root only), from 127.0.0.5.
func TestUDPTimeExceeded(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("sending a router's ICMP error needs a raw socket (root)")
	}
	reports := make(chan icmpReport, 8)
	f := newUDPFixture(t, FilterAddressPortDependent, TableOptions{}, func(o *UDPOptions) {
		o.DeliverError = func(remote, client netip.AddrPort, payload []byte, e ICMPError) {
			reports <- icmpReport{remote, client, string(payload), e}
		}
	})
	srv, ttls := ttlServer(t, "udp4", "127.0.0.1:0")
	if err := f.udp.SendTTL("p", client1, srv, []byte("probe"), 2); err != nil {
		t.Fatal(err)
	}
	<-ttls
	v, ok := f.udp.maps.Load(client1)
	if !ok {
		t.Fatal("no mapping")
	}
	egress := v.(*udpMapping).egress

	// The datagram as the router saw it, TTL run out, quoted after the
	// ICMP header.
	q := make([]byte, 28, 28+5)
	q[0], q[8], q[9] = 0x45, 1, 17
	binary.BigEndian.PutUint16(q[2:4], 28+5)
	copy(q[12:16], egress.Addr().AsSlice())
	copy(q[16:20], srv.Addr().AsSlice())
	binary.BigEndian.PutUint16(q[20:22], egress.Port())
	binary.BigEndian.PutUint16(q[22:24], srv.Port())
	binary.BigEndian.PutUint16(q[24:26], 8+5)
	q = append(q, "probe"...)
	router := netip.MustParseAddr("127.0.0.5")
	nattest.SendTimeExceeded(t, router, egress.Addr(), q)
	select {
	case r := <-reports:
		if !r.err.TimeExceeded || r.err.From != router || r.remote != srv || r.client != client1 || r.payload != "probe" {
			t.Errorf("reported %+v, want time exceeded at %s for %v -> %v", r, router, client1, srv)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("no time exceeded reported")
	}
}

func icmpChecksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}

// TestUDPReadDoesNotAllocate: the reader's path for a datagram allocates
// nothing, as ReadFromUDPAddrPort did before errors were read too.
func TestUDPReadDoesNotAllocate(t *testing.T) {
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	sender, err := net.DialUDP("udp4", nil, pc.LocalAddr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer sender.Close()
	rc, err := pc.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	r := newUDPReader(rc, make([]byte, 2048), func(queuedError) {})
	msg := []byte("x")
	allocs := testing.AllocsPerRun(100, func() {
		sender.Write(msg)
		n, from, err := r.next()
		if err != nil || n != 1 || from != sender.LocalAddr().(*net.UDPAddr).AddrPort() {
			t.Fatalf("read %d from %v: %v", n, from, err)
		}
	})
	if allocs > 0 {
		t.Errorf("%.1f allocations per datagram, want 0", allocs)
	}
}

// TestUDPTimeExceeded6 is TestUDPTimeExceeded over IPv6, with the router
// at ::1 (loopback has no other address): the error's type is what is
// checked.
func TestUDPTimeExceeded6(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("sending a router's ICMPv6 error needs a raw socket (root)")
	}
	reports := make(chan icmpReport, 8)
	f := newUDPFixture(t, FilterAddressPortDependent, TableOptions{}, func(o *UDPOptions) {
		o.DeliverError = func(remote, client netip.AddrPort, payload []byte, e ICMPError) {
			reports <- icmpReport{remote, client, string(payload), e}
		}
	})
	srv, ttls := ttlServer(t, "udp6", "[::1]:0")
	if err := f.udp.SendTTL("p", client6, srv, []byte("probe"), 2); err != nil {
		t.Fatal(err)
	}
	<-ttls
	v, ok := f.udp.maps.Load(client6)
	if !ok {
		t.Fatal("no mapping")
	}
	egress := v.(*udpMapping).egress

	q := make([]byte, 48, 48+5)
	q[0], q[6], q[7] = 0x60, 17, 0
	binary.BigEndian.PutUint16(q[4:6], 8+5)
	copy(q[8:24], egress.Addr().AsSlice())
	copy(q[24:40], srv.Addr().AsSlice())
	binary.BigEndian.PutUint16(q[40:42], egress.Port())
	binary.BigEndian.PutUint16(q[42:44], srv.Port())
	binary.BigEndian.PutUint16(q[44:46], 8+5)
	q = append(q, "probe"...)
	msg := append([]byte{3, 0, 0, 0, 0, 0, 0, 0}, q...) // the kernel sums ICMPv6

	rs, err := unix.Socket(unix.AF_INET6, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMPV6)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(rs)
	if err := unix.Sendto(rs, msg, 0, &unix.SockaddrInet6{Addr: egress.Addr().As16()}); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-reports:
		if !r.err.TimeExceeded || r.err.From != netip.IPv6Loopback() || r.remote != srv || r.client != client6 || r.payload != "probe" {
			t.Errorf("reported %+v, want time exceeded at ::1 for %v -> %v", r, client6, srv)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("no time exceeded reported")
	}
}
