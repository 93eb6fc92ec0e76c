package netstack_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.zx2c4.com/wireguard/tun"

	"github.com/sluice-vpn/sluice/netstack"
	"github.com/sluice-vpn/sluice/netstack/netstacktest"
)

var (
	aV4 = netip.MustParseAddr("10.7.0.1")
	aV6 = netip.MustParseAddr("fd07::1")
	bV4 = netip.MustParseAddr("10.7.0.2")
	bV6 = netip.MustParseAddr("fd07::2")
)

// newClient builds a client stack that the test closes.
func newClient(t *testing.T, opts netstack.ClientOptions) *netstack.Client {
	t.Helper()
	c, err := netstack.NewClient(opts)
	if err != nil {
		t.Fatalf("NewClient: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func hostPrefixes(addrs ...netip.Addr) []netip.Prefix {
	var out []netip.Prefix
	for _, a := range addrs {
		out = append(out, netip.PrefixFrom(a, a.BitLen()))
	}
	return out
}

// newPair builds two client stacks, a and b, with an address of each
// family, joined by a wire.
func newPair(t *testing.T) (a, b *netstack.Client) {
	t.Helper()
	a = newClient(t, netstack.ClientOptions{Addrs: hostPrefixes(aV4, aV6)})
	b = newClient(t, netstack.ClientOptions{Addrs: hostPrefixes(bV4, bV6)})
	wait := netstacktest.Join(a, b)
	t.Cleanup(func() {
		a.Close()
		b.Close()
		wait()
	})
	return a, b
}

func TestClientOptions(t *testing.T) {
	v4 := hostPrefixes(aV4)
	both := hostPrefixes(aV4, aV6)
	for _, tc := range []struct {
		name string
		opts netstack.ClientOptions
		want string // in the error; "" for none
	}{
		{"defaults", netstack.ClientOptions{Addrs: both}, ""},
		{"no address", netstack.ClientOptions{}, "ClientOptions.Addrs"},
		{"invalid address", netstack.ClientOptions{Addrs: []netip.Prefix{{}}}, "ClientOptions.Addrs"},
		{"unspecified address", netstack.ClientOptions{Addrs: hostPrefixes(netip.IPv4Unspecified())}, "ClientOptions.Addrs"},
		{"invalid route", netstack.ClientOptions{Addrs: v4, Routes: []netip.Prefix{{}}}, "ClientOptions.Routes"},
		{"small MTU for IPv4", netstack.ClientOptions{Addrs: v4, MTU: 1000}, ""},
		{"small MTU for IPv6", netstack.ClientOptions{Addrs: both, MTU: 1000}, "ClientOptions.MTU"},
		{"huge MTU", netstack.ClientOptions{Addrs: v4, MTU: 70000}, "ClientOptions.MTU"},
		{"negative MTU", netstack.ClientOptions{Addrs: v4, MTU: -1}, "ClientOptions.MTU"},
		{"negative queue", netstack.ClientOptions{Addrs: v4, QueueLen: -1}, "ClientOptions.QueueLen"},
		{"negative batch", netstack.ClientOptions{Addrs: v4, BatchSize: -1}, "ClientOptions.BatchSize"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := netstack.NewClient(tc.opts)
			if tc.want == "" {
				if err != nil {
					t.Fatalf("NewClient: %v", err)
				}
				c.Close()
				return
			}
			if err == nil {
				c.Close()
				t.Fatalf("NewClient succeeded; want an error naming %s", tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("NewClient: %v; want an error naming %s", err, tc.want)
			}
		})
	}

	c := newClient(t, netstack.ClientOptions{Addrs: []netip.Prefix{
		netip.MustParsePrefix("10.7.0.1/24"),
		netip.MustParsePrefix("::ffff:10.7.0.3/128"), // mapped: an IPv4 address
		netip.MustParsePrefix("fd07::1/64"),
	}})
	if mtu, _ := c.MTU(); mtu != 1420 {
		t.Errorf("MTU = %d, want the default 1420", mtu)
	}
	if n := c.BatchSize(); n != 64 {
		t.Errorf("BatchSize = %d, want the default 64", n)
	}
	want := []netip.Addr{aV4, netip.MustParseAddr("10.7.0.3"), aV6}
	if got := c.Addrs(); len(got) != len(want) || got[0] != want[0] || got[1] != want[1] || got[2] != want[2] {
		t.Errorf("Addrs = %v, want %v", got, want)
	}
	if ev := <-c.Events(); ev != tun.EventUp {
		t.Errorf("first event = %v, want EventUp", ev)
	}
}

func TestClientTCP(t *testing.T) {
	a, b := newPair(t)
	ln, err := b.ListenTCP(netip.AddrPortFrom(netip.IPv6Unspecified(), 0), true)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := uint16(ln.Addr().(*net.TCPAddr).Port)
	if got, want := ln.Addr().String(), netip.AddrPortFrom(netip.IPv6Unspecified(), port).String(); got != want {
		t.Errorf("listener Addr = %s, want %s", got, want)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				// Echo until the client half-closes, then say goodbye.
				io.Copy(c, c)
				io.WriteString(c, "bye")
			}()
		}
	}()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, dst := range []netip.Addr{bV4, bV6} {
		c, err := a.DialTCP(ctx, netip.AddrPortFrom(dst, port))
		if err != nil {
			t.Fatalf("DialTCP %s: %v", dst, err)
		}
		if got := c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap(); got != dst {
			t.Errorf("RemoteAddr = %s, want %s", got, dst)
		}
		msg := bytes.Repeat([]byte("through the stack "), 20000) // several windows' worth
		go func() {
			c.Write(msg)
			c.(interface{ CloseWrite() error }).CloseWrite()
		}()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		got, err := io.ReadAll(c)
		c.Close()
		if err != nil {
			t.Fatalf("to %s: read: %v", dst, err)
		}
		if want := append(msg, "bye"...); !bytes.Equal(got, want) {
			t.Fatalf("to %s: got %d bytes back, want the %d sent and bye", dst, len(got), len(msg))
		}
	}
}

func TestClientDialRefused(t *testing.T) {
	a, b := newPair(t)
	ln, err := b.ListenTCP(netip.AddrPortFrom(bV4, 0), false)
	if err != nil {
		t.Fatal(err)
	}
	closed := netip.AddrPortFrom(bV4, uint16(ln.Addr().(*net.TCPAddr).Port))
	ln.Close() // the port is free again: b answers a SYN with a RST

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = a.DialTCP(ctx, closed)
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("DialTCP to a closed port: %v; want ECONNREFUSED", err)
	}
	var se *os.SyscallError
	if !errors.As(err, &se) || se.Syscall != "connect" {
		t.Errorf("DialTCP error %#v is not a connect *os.SyscallError", err)
	}
}

// TestClientDialICMPErrors answers the client's SYN with an ICMP error, as
// a router on the way would, and checks the errno DialTCP reports.
func TestClientDialICMPErrors(t *testing.T) {
	for _, tc := range []struct {
		code int
		want syscall.Errno
	}{
		{0, syscall.ENETUNREACH},
		{1, syscall.EHOSTUNREACH},
	} {
		t.Run(tc.want.Error(), func(t *testing.T) {
			a := newClient(t, netstack.ClientOptions{Addrs: hostPrefixes(aV4)})
			router := netip.MustParseAddr("10.7.0.254")
			go func() {
				bufs, sizes := [][]byte{make([]byte, 1500)}, []int{0}
				for {
					if _, err := a.Read(bufs, sizes, 0); err != nil {
						return
					}
					syn := bufs[0][:sizes[0]]
					if len(syn) < 28 || syn[0]>>4 != 4 || syn[9] != 6 {
						continue
					}
					reply := icmpError(t, router, aV4, tc.code, syn)
					if _, err := a.Write([][]byte{reply}, 0); err != nil {
						return
					}
				}
			}()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_, err := a.DialTCP(ctx, netip.MustParseAddrPort("10.7.9.9:80"))
			if !errors.Is(err, tc.want) {
				t.Fatalf("DialTCP answered by ICMP code %d: %v; want %v", tc.code, err, tc.want)
			}
		})
	}
}

// icmpError builds an IPv4 packet from src to dst carrying an ICMP
// destination-unreachable error of code about quoted.
func icmpError(t *testing.T, src, dst netip.Addr, code int, quoted []byte) []byte {
	t.Helper()
	ihl := int(quoted[0]&0xf) * 4
	msg := icmp.Message{
		Type: ipv4.ICMPTypeDestinationUnreachable,
		Code: code,
		Body: &icmp.DstUnreach{Data: quoted[:ihl+8]},
	}
	body, err := msg.Marshal(nil)
	if err != nil {
		t.Fatal(err)
	}
	return ipv4Packet(src, dst, 1, body)
}

// ipv4Packet wraps payload in an IPv4 header with a correct checksum.
func ipv4Packet(src, dst netip.Addr, proto byte, payload []byte) []byte {
	p := make([]byte, 20+len(payload))
	p[0] = 0x45
	binary.BigEndian.PutUint16(p[2:], uint16(len(p)))
	p[8] = 64
	p[9] = proto
	s4, d4 := src.As4(), dst.As4()
	copy(p[12:], s4[:])
	copy(p[16:], d4[:])
	binary.BigEndian.PutUint16(p[10:], ^sum16(0, p[:20]))
	copy(p[20:], payload)
	return p
}

// sum16 adds b to the ones' complement sum s, as the Internet checksum does.
func sum16(s uint32, b []byte) uint16 {
	for len(b) >= 2 {
		s += uint32(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		s += uint32(b[0]) << 8
	}
	for s > 0xffff {
		s = s>>16 + s&0xffff
	}
	return uint16(s)
}

func TestClientDialEnds(t *testing.T) {
	// Nothing carries a's packets: the SYN goes unanswered.
	a := newClient(t, netstack.ClientOptions{Addrs: hostPrefixes(aV4)})
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := a.DialTCP(ctx, netip.AddrPortFrom(bV4, 80))
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("DialTCP into silence: %v; want the context's deadline", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("DialTCP took %v to notice its context ended", d)
	}
}

func TestClientRoutes(t *testing.T) {
	a := newClient(t, netstack.ClientOptions{
		Addrs:  hostPrefixes(aV4),
		Routes: []netip.Prefix{netip.MustParsePrefix("10.7.0.0/24")},
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// gVisor reports a missing route as an unreachable host (gvisor.dev/issues/8105).
	_, err := a.DialTCP(ctx, netip.MustParseAddrPort("10.8.0.1:80"))
	if !errors.Is(err, syscall.ENETUNREACH) && !errors.Is(err, syscall.EHOSTUNREACH) {
		t.Fatalf("DialTCP outside the routes: %v; want ENETUNREACH or EHOSTUNREACH", err)
	}
	if _, err := a.DialUDP(netip.MustParseAddrPort("10.8.0.1:53")); !errors.Is(err, syscall.ENETUNREACH) && !errors.Is(err, syscall.EHOSTUNREACH) {
		t.Fatalf("DialUDP outside the routes: %v; want ENETUNREACH or EHOSTUNREACH", err)
	}
	// Inside the routes the SYN leaves for the tunnel.
	go func() {
		_, _ = a.DialTCP(ctx, netip.MustParseAddrPort("10.7.0.9:80"))
	}()
	bufs, sizes := [][]byte{make([]byte, 1500)}, []int{0}
	if _, err := a.Read(bufs, sizes, 0); err != nil {
		t.Fatalf("Read: %v", err)
	}
	if got := bufs[0][:sizes[0]]; len(got) < 20 || netip.AddrFrom4([4]byte(got[16:20])) != netip.MustParseAddr("10.7.0.9") {
		t.Fatalf("the stack sent % x; want a packet to 10.7.0.9", got)
	}
}

func TestClientLocal(t *testing.T) {
	// A connection to the client's own address never reaches the tunnel.
	a := newClient(t, netstack.ClientOptions{Addrs: hostPrefixes(aV4)})
	ln, err := a.ListenTCP(netip.AddrPortFrom(aV4, 0), false)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		if c, err := ln.Accept(); err == nil {
			io.WriteString(c, "local")
			c.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := a.DialTCP(ctx, ln.Addr().(*net.TCPAddr).AddrPort())
	if err != nil {
		t.Fatalf("DialTCP to the client's own address: %v", err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if got, err := io.ReadAll(c); err != nil || string(got) != "local" {
		t.Fatalf("read %q, %v; want local", got, err)
	}
}

func TestClientLoopbackPeer(t *testing.T) {
	// A gateway answers from its own loopback: packets from 127.0.0.0/8
	// must come in, which a host's stack would drop as martians.
	lo := netip.MustParseAddr("127.0.0.9")
	a := newClient(t, netstack.ClientOptions{Addrs: hostPrefixes(aV4)})
	b := newClient(t, netstack.ClientOptions{Addrs: hostPrefixes(lo)})
	wait := netstacktest.Join(a, b)
	t.Cleanup(func() { a.Close(); b.Close(); wait() })

	ln, err := b.ListenTCP(netip.AddrPortFrom(lo, 0), false)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		if c, err := ln.Accept(); err == nil {
			io.WriteString(c, "from loopback")
			c.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := a.DialTCP(ctx, ln.Addr().(*net.TCPAddr).AddrPort())
	if err != nil {
		t.Fatalf("DialTCP to a loopback address through the tunnel: %v", err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if got, err := io.ReadAll(c); err != nil || string(got) != "from loopback" {
		t.Fatalf("read %q, %v; want from loopback", got, err)
	}
}

func TestClientListenErrors(t *testing.T) {
	a := newClient(t, netstack.ClientOptions{Addrs: hostPrefixes(aV4, aV6)})
	ln, err := a.ListenTCP(netip.AddrPortFrom(aV4, 0), false)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	taken := ln.Addr().(*net.TCPAddr).AddrPort()
	if _, err := a.ListenTCP(taken, false); !errors.Is(err, syscall.EADDRINUSE) {
		t.Errorf("ListenTCP on a port in use: %v; want EADDRINUSE", err)
	}
	notOurs := netip.AddrPortFrom(bV4, 0)
	if _, err := a.ListenTCP(notOurs, false); !errors.Is(err, syscall.EADDRNOTAVAIL) {
		t.Errorf("ListenTCP on another's address: %v; want EADDRNOTAVAIL", err)
	}
	pc, err := a.ListenUDP(netip.AddrPortFrom(aV6, 0), false)
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	if _, err := a.ListenUDP(pc.LocalAddr().(*net.UDPAddr).AddrPort(), false); !errors.Is(err, syscall.EADDRINUSE) {
		t.Errorf("ListenUDP on a port in use: %v; want EADDRINUSE", err)
	}
	if _, err := a.ListenUDP(notOurs, false); !errors.Is(err, syscall.EADDRNOTAVAIL) {
		t.Errorf("ListenUDP on another's address: %v; want EADDRNOTAVAIL", err)
	}
}

func TestClientUDP(t *testing.T) {
	a, b := newPair(t)
	srv, err := b.ListenUDP(netip.AddrPortFrom(netip.IPv6Unspecified(), 0), true)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	port := uint16(srv.LocalAddr().(*net.UDPAddr).Port)
	if got, want := srv.LocalAddr().String(), netip.AddrPortFrom(netip.IPv6Unspecified(), port).String(); got != want {
		t.Errorf("LocalAddr = %s, want %s", got, want)
	}

	// The dual-stack socket hears both families, names IPv4 senders in
	// 4-byte form, and answers them with the address it named.
	for _, dst := range []netip.Addr{bV4, bV6} {
		c, err := a.DialUDP(netip.AddrPortFrom(dst, port))
		if err != nil {
			t.Fatalf("DialUDP %s: %v", dst, err)
		}
		if _, err := c.Write([]byte("ping " + dst.String())); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 100)
		srv.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, from, err := srv.ReadFrom(buf)
		if err != nil {
			t.Fatalf("ReadFrom: %v", err)
		}
		if string(buf[:n]) != "ping "+dst.String() {
			t.Errorf("got %q", buf[:n])
		}
		ua := from.(*net.UDPAddr)
		wantFrom := aV6
		if dst.Is4() {
			wantFrom = aV4
			if len(ua.IP) != net.IPv4len {
				t.Errorf("IPv4 sender reported as %d-byte %v", len(ua.IP), ua.IP)
			}
		}
		if ua.AddrPort().Addr() != wantFrom {
			t.Errorf("sender %v, want %v", ua, wantFrom)
		}
		if _, err := srv.WriteTo([]byte("pong"), from); err != nil {
			t.Fatalf("WriteTo %v: %v", from, err)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := c.Read(buf); err != nil || string(buf[:n]) != "pong" {
			t.Fatalf("reply: %q, %v", buf[:n], err)
		}
		c.Close()
	}

	// IPv4 destinations in the net package's 16-byte form work too, on
	// both kinds of socket.
	c, err := a.ListenUDP(netip.AddrPortFrom(aV4, 0), false)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	cPort := c.LocalAddr().(*net.UDPAddr).Port
	v4only, err := b.ListenUDP(netip.AddrPortFrom(netip.IPv4Unspecified(), 0), false)
	if err != nil {
		t.Fatal(err)
	}
	defer v4only.Close()
	for _, pc := range []net.PacketConn{srv, v4only} {
		to := &net.UDPAddr{IP: net.ParseIP(aV4.String()), Port: cPort}
		if len(to.IP) != net.IPv6len {
			t.Fatalf("net.ParseIP gave %d bytes", len(to.IP))
		}
		if _, err := pc.WriteTo([]byte("16-byte"), to); err != nil {
			t.Fatalf("%v: WriteTo %v: %v", pc.LocalAddr(), to, err)
		}
		buf := make([]byte, 100)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, _, err := c.ReadFrom(buf); err != nil || string(buf[:n]) != "16-byte" {
			t.Fatalf("%v to %v: got %q, %v", pc.LocalAddr(), to, buf[:n], err)
		}
	}

	// gVisor would send an IPv6 datagram from the IPv4 socket on 0.0.0.0.
	if _, err := v4only.WriteTo([]byte("x"), net.UDPAddrFromAddrPort(netip.AddrPortFrom(aV6, 9))); !errors.Is(err, syscall.EAFNOSUPPORT) {
		t.Errorf("IPv4 socket WriteTo IPv6: %v; want EAFNOSUPPORT", err)
	}
	if _, err := v4only.WriteTo([]byte("x"), &net.TCPAddr{IP: aV4.AsSlice(), Port: 9}); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("WriteTo a TCP address: %v; want EINVAL", err)
	}
}

func TestClientClose(t *testing.T) {
	a, b := newPair(t)
	ln, err := b.ListenTCP(netip.AddrPortFrom(bV4, 0), false)
	if err != nil {
		t.Fatal(err)
	}
	accepted := make(chan net.Conn, 1)
	acceptErr := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			acceptErr <- err
			return
		}
		accepted <- c
		_, err = ln.Accept() // blocks until Close
		acceptErr <- err
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := a.DialTCP(ctx, ln.Addr().(*net.TCPAddr).AddrPort())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var peer net.Conn
	select {
	case peer = <-accepted:
		defer peer.Close()
	case err := <-acceptErr:
		t.Fatalf("Accept: %v", err)
	}

	// Closing the listener wakes the blocked Accept with net.ErrClosed
	// and leaves the accepted connection alone.
	time.Sleep(20 * time.Millisecond)
	ln.Close()
	select {
	case err := <-acceptErr:
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("Accept after Close: %v; want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not wake Accept")
	}
	if _, err := peer.Write([]byte("still here")); err != nil {
		t.Fatalf("accepted connection after the listener closed: %v", err)
	}

	// Closing a's stack aborts its connection and ends its device.
	readErr := make(chan error, 1)
	go func() {
		buf := make([]byte, 100)
		for {
			if _, err := conn.Read(buf); err != nil {
				readErr <- err
				return
			}
		}
	}()
	a.Close()
	select {
	case <-readErr:
	case <-time.After(5 * time.Second):
		t.Fatal("a connection outlived its stack")
	}
	if _, err := a.Read([][]byte{make([]byte, 1500)}, []int{0}, 0); !errors.Is(err, os.ErrClosed) {
		t.Errorf("Read after Close: %v; want os.ErrClosed", err)
	}
	if _, err := a.Write([][]byte{make([]byte, 20)}, 0); !errors.Is(err, os.ErrClosed) {
		t.Errorf("Write after Close: %v; want os.ErrClosed", err)
	}
	if _, err := a.DialTCP(ctx, netip.AddrPortFrom(bV4, 80)); !errors.Is(err, net.ErrClosed) {
		t.Errorf("DialTCP after Close: %v; want net.ErrClosed", err)
	}
	for range a.Events() {
	}
	a.Close() // idempotent
}

func TestClientReadBlocksUntilClose(t *testing.T) {
	a := newClient(t, netstack.ClientOptions{Addrs: hostPrefixes(aV4)})
	done := make(chan error, 1)
	go func() {
		_, err := a.Read([][]byte{make([]byte, 1500)}, []int{0}, 0)
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("Read returned %v with nothing to send", err)
	case <-time.After(50 * time.Millisecond):
	}
	a.Close()
	select {
	case err := <-done:
		if !errors.Is(err, os.ErrClosed) {
			t.Fatalf("blocked Read after Close: %v; want os.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not end a blocked Read")
	}
}

func TestClientBatchesAndQueue(t *testing.T) {
	const queue = 4
	a := newClient(t, netstack.ClientOptions{Addrs: hostPrefixes(aV4), QueueLen: queue})
	c, err := a.DialUDP(netip.AddrPortFrom(bV4, 9))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i := range 3 * queue {
		c.Write([]byte{byte(i)}) // beyond the queue, dropped as a full NIC would
	}
	bufs := make([][]byte, 3*queue)
	sizes := make([]int, len(bufs))
	const offset = 16
	for i := range bufs {
		bufs[i] = make([]byte, offset+1500)
	}
	n, err := a.Read(bufs, sizes, offset)
	if err != nil {
		t.Fatal(err)
	}
	if n != queue {
		t.Fatalf("one Read returned %d packets; want the %d queued", n, queue)
	}
	for i := range n {
		p := bufs[i][offset : offset+sizes[i]]
		if sizes[i] != 20+8+1 || p[0] != 0x45 || p[len(p)-1] != byte(i) {
			t.Fatalf("packet %d: % x; want the IPv4 datagram carrying %d", i, p, i)
		}
	}
}

// TestClientTrustChecksums writes a UDP datagram with a wrong checksum:
// dropped by default, delivered when the tunnel vouches for its packets.
func TestClientTrustChecksums(t *testing.T) {
	for _, trust := range []bool{false, true} {
		a := newClient(t, netstack.ClientOptions{Addrs: hostPrefixes(aV4), TrustChecksums: trust})
		pc, err := a.ListenUDP(netip.AddrPortFrom(aV4, 0), false)
		if err != nil {
			t.Fatal(err)
		}
		port := uint16(pc.LocalAddr().(*net.UDPAddr).Port)
		send := func(payload string, corrupt bool) {
			u := make([]byte, 8+len(payload))
			binary.BigEndian.PutUint16(u[0:], 4000)
			binary.BigEndian.PutUint16(u[2:], port)
			binary.BigEndian.PutUint16(u[4:], uint16(len(u)))
			copy(u[8:], payload)
			// The pseudo-header: addresses, protocol, length.
			s, d := bV4.As4(), aV4.As4()
			ph := append(append(append([]byte{}, s[:]...), d[:]...), 0, 17, 0, byte(len(u)))
			sum := ^sum16(uint32(sum16(0, ph)), u)
			if corrupt {
				sum ^= 0x5a5a
			}
			binary.BigEndian.PutUint16(u[6:], sum)
			if _, err := a.Write([][]byte{ipv4Packet(bV4, aV4, 17, u)}, 0); err != nil {
				t.Fatal(err)
			}
		}
		send("corrupt", true)
		send("good", false)
		pc.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 100)
		n, _, err := pc.ReadFrom(buf)
		if err != nil {
			t.Fatalf("trust %v: ReadFrom: %v", trust, err)
		}
		want := "good"
		if trust {
			want = "corrupt"
		}
		if string(buf[:n]) != want {
			t.Errorf("trust %v: first datagram delivered %q, want %q", trust, buf[:n], want)
		}
		pc.Close()
	}
}
