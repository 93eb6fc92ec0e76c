package proxy_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-vpn/sluice/pkg/proxy"
)

// startSOCKS serves a SOCKS5 proxy on a loopback port until the test ends.
func startSOCKS(t testing.TB, opts proxy.SOCKS5Options) (*proxy.SOCKS5Server, string) {
	t.Helper()
	srv, err := proxy.NewSOCKS5(opts)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-served; !errors.Is(err, proxy.ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
	return srv, ln.Addr().String()
}

func TestSOCKS5Connect(t *testing.T) {
	d := newHostDialer()
	echo := startEcho(t)
	d.set("echo.test", netip.MustParseAddr("127.0.0.1"))
	_, addr := startSOCKS(t, proxy.SOCKS5Options{Dialer: d})

	for _, host := range []string{"127.0.0.1", "echo.test"} {
		c := dialSOCKS(t, addr)
		code, err := c.connect(host, uint16(echo.Port))
		if err != nil || code != 0 {
			t.Fatalf("CONNECT %s: reply %d, %v", host, code, err)
		}
		msg := bytes.Repeat([]byte(host), 10000)
		go c.conn.Write(msg)
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(c.conn, got); err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("echo through CONNECT %s: %v", host, err)
		}
		// A half-close reaches the server, whose echo ends.
		c.conn.(*net.TCPConn).CloseWrite()
		if n, err := c.conn.Read(got); n != 0 || err != io.EOF {
			t.Fatalf("after CloseWrite: %d bytes, %v; want EOF", n, err)
		}
	}
}

func TestSOCKS5Replies(t *testing.T) {
	d := newHostDialer()
	d.fail = func(ctx context.Context, host string) error {
		switch host {
		case "unreachable.test":
			return syscall.ENETUNREACH
		case "nohost.test":
			return syscall.EHOSTUNREACH
		case "slow.test":
			<-ctx.Done()
			return ctx.Err()
		}
		return nil
	}
	_, addr := startSOCKS(t, proxy.SOCKS5Options{Dialer: d, DialTimeout: 200 * time.Millisecond})
	refused := netip.MustParseAddrPort(refusedPort(t))

	for _, tc := range []struct {
		name string
		cmd  byte
		host string
		port uint16
		want byte
	}{
		{"refused", 1, refused.Addr().String(), refused.Port(), 5},
		{"not allowed", 1, "192.0.2.1", 80, 2},
		{"network unreachable", 1, "unreachable.test", 80, 3},
		{"host unreachable", 1, "nohost.test", 80, 4},
		{"no such name", 1, "missing.test", 80, 4},
		{"timeout", 1, "slow.test", 80, 6},
		{"BIND", 2, "127.0.0.1", 80, 7},
	} {
		c := dialSOCKS(t, addr)
		if m, err := c.greet(0); err != nil || m != 0 {
			t.Fatalf("%s: greeting: %d, %v", tc.name, m, err)
		}
		code, _, err := c.request(tc.cmd, tc.host, tc.port)
		if err != nil || code != tc.want {
			t.Errorf("%s: reply %d, %v; want %d", tc.name, code, err, tc.want)
		}
	}

	// An address type that does not exist.
	c := dialSOCKS(t, addr)
	c.greet(0)
	c.conn.Write([]byte{5, 1, 0, 9, 1, 2, 3, 4, 0, 80})
	if code, _, err := readReply(c.conn); err != nil || code != 8 {
		t.Errorf("address type 9: reply %d, %v; want 8", code, err)
	}
}

func TestSOCKS5Auth(t *testing.T) {
	d := newHostDialer()
	echo := startEcho(t)
	_, addr := startSOCKS(t, proxy.SOCKS5Options{Dialer: d, Credentials: &proxy.Credentials{Username: "alice", Password: "s3cret"}})

	c := dialSOCKS(t, addr)
	if m, err := c.greet(0); err != nil || m != 0xff {
		t.Errorf("no-auth client: method %#x, %v; want 0xff", m, err)
	}

	c = dialSOCKS(t, addr)
	if m, err := c.greet(0, 2); err != nil || m != 2 {
		t.Fatalf("method %d, %v; want 2", m, err)
	}
	if st, err := c.login("alice", "wrong"); err != nil || st == 0 {
		t.Errorf("wrong password: status %d, %v", st, err)
	}
	if _, err := c.conn.Read(make([]byte, 1)); err == nil {
		t.Error("the connection stayed open after a failed login")
	}

	c = dialSOCKS(t, addr)
	c.greet(2)
	if st, err := c.login("alice", "s3cret"); err != nil || st != 0 {
		t.Fatalf("right password: status %d, %v", st, err)
	}
	if code, _, err := c.request(1, "127.0.0.1", uint16(echo.Port)); err != nil || code != 0 {
		t.Fatalf("CONNECT after login: %d, %v", code, err)
	}
}

func TestSOCKS5UDPAssociate(t *testing.T) {
	d := newHostDialer()
	echo := startUDPEcho(t)
	d.set("udp-echo.test", echo.Addr())
	_, addr := startSOCKS(t, proxy.SOCKS5Options{Dialer: d, UDPIdleTimeout: 400 * time.Millisecond})

	c := dialSOCKS(t, addr)
	c.greet(0)
	code, relay, err := c.request(3, "0.0.0.0", 0)
	if err != nil || code != 0 {
		t.Fatalf("UDP ASSOCIATE: reply %d, %v", code, err)
	}
	if !relay.Addr().IsLoopback() {
		t.Fatalf("relay on %s, want loopback like the proxy", relay)
	}
	u, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(relay))
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	u.SetDeadline(time.Now().Add(5 * time.Second))
	for _, host := range []string{echo.Addr().String(), "udp-echo.test"} {
		msg := []byte("datagram to " + host)
		if _, err := u.Write(append(appendSOCKSAddr([]byte{0, 0, 0}, host, echo.Port()), msg...)); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 1500)
		n, err := u.Read(buf)
		if err != nil {
			t.Fatalf("reply to %s: %v", host, err)
		}
		// RSV RSV FRAG, then the source as an address, then the data.
		code, from, err := readReply(bytes.NewReader(append([]byte{5}, buf[1:n]...)))
		if err != nil || code != 0 || from != echo {
			t.Fatalf("reply header: %d %s %v; want the echo server %s", code, from, err, echo)
		}
		if payload := buf[n-len(msg) : n]; !bytes.Equal(payload, msg) {
			t.Fatalf("payload %q, want %q", payload, msg)
		}
	}
	// A fragment is dropped; so is a datagram to a destination the
	// Dialer refuses. Neither ends the association.
	u.Write(append(appendSOCKSAddr([]byte{0, 0, 1}, echo.Addr().String(), echo.Port()), "frag"...))
	u.Write(append(appendSOCKSAddr([]byte{0, 0, 0}, "192.0.2.1", 9), "elsewhere"...))
	u.Write(append(appendSOCKSAddr([]byte{0, 0, 0}, echo.Addr().String(), echo.Port()), "after"...))
	buf := make([]byte, 1500)
	if n, err := u.Read(buf); err != nil || !bytes.HasSuffix(buf[:n], []byte("after")) {
		t.Fatalf("after the dropped datagrams: %q, %v", buf[:n], err)
	}

	// Closing the control connection ends the association: the relay
	// socket is gone and the kernel refuses the next datagram.
	c.conn.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		u.Write(append(appendSOCKSAddr([]byte{0, 0, 0}, echo.Addr().String(), echo.Port()), "late"...))
		u.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		_, err := u.Read(buf)
		if errors.Is(err, syscall.ECONNREFUSED) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the relay still works after the control connection closed: %v", err)
		}
	}

	// An idle association ends by itself and closes its control
	// connection.
	c = dialSOCKS(t, addr)
	c.greet(0)
	// The clock starts before the request, so that the association
	// cannot have begun earlier.
	start := time.Now()
	if code, _, err := c.request(3, "0.0.0.0", 0); err != nil || code != 0 {
		t.Fatalf("second UDP ASSOCIATE: %d, %v", code, err)
	}
	if n, err := c.conn.Read(buf); n != 0 || err == nil {
		t.Fatalf("control connection: %d bytes, %v; want it closed", n, err)
	}
	if d := time.Since(start); d < 400*time.Millisecond || d > 5*time.Second {
		t.Errorf("idle association ended after %v, want about 400ms", d)
	}
}

func TestSOCKS5WithoutUDP(t *testing.T) {
	_, addr := startSOCKS(t, proxy.SOCKS5Options{Dialer: tcpOnly{newHostDialer()}})
	c := dialSOCKS(t, addr)
	c.greet(0)
	if code, _, err := c.request(3, "0.0.0.0", 0); err != nil || code != 7 {
		t.Fatalf("UDP ASSOCIATE without a PacketDialer: %d, %v; want 7", code, err)
	}
}

func TestSOCKS5MaxConns(t *testing.T) {
	echo := startEcho(t)
	_, addr := startSOCKS(t, proxy.SOCKS5Options{Dialer: newHostDialer(), MaxConns: 1})
	first := dialSOCKS(t, addr)
	if code, err := first.connect("127.0.0.1", uint16(echo.Port)); err != nil || code != 0 {
		t.Fatalf("first: %d, %v", code, err)
	}
	second := dialSOCKS(t, addr)
	if code, err := second.connect("127.0.0.1", uint16(echo.Port)); err != nil || code != 1 {
		t.Fatalf("second, over the limit: %d, %v; want reply 1", code, err)
	}
	first.conn.Close()
	// The slot comes back once the first connection is done.
	deadline := time.Now().Add(5 * time.Second)
	for {
		third := dialSOCKS(t, addr)
		code, err := third.connect("127.0.0.1", uint16(echo.Port))
		if err == nil && code == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no slot after the first connection closed: %d, %v", code, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestSOCKS5CloseEndsEverything(t *testing.T) {
	echo := startEcho(t)
	srv, err := proxy.NewSOCKS5(proxy.SOCKS5Options{Dialer: newHostDialer()})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	var clients []*socksClient
	for range 3 {
		c := dialSOCKS(t, ln.Addr().String())
		if code, err := c.connect("127.0.0.1", uint16(echo.Port)); err != nil || code != 0 {
			t.Fatalf("CONNECT: %d, %v", code, err)
		}
		clients = append(clients, c)
	}
	c := dialSOCKS(t, ln.Addr().String())
	c.greet(0)
	if code, _, err := c.request(3, "0.0.0.0", 0); err != nil || code != 0 {
		t.Fatalf("UDP ASSOCIATE: %d, %v", code, err)
	}
	clients = append(clients, c)

	srv.Close()
	if err := <-served; !errors.Is(err, proxy.ErrServerClosed) {
		t.Fatalf("Serve: %v", err)
	}
	for i, c := range clients {
		if _, err := c.conn.Read(make([]byte, 1)); err == nil {
			t.Errorf("client %d still connected after Close", i)
		}
	}
	if _, err := net.Dial("tcp", ln.Addr().String()); err == nil {
		t.Error("the listener still accepts after Close")
	}
	// Close waited for the server's goroutines: none is left.
	if stacks := proxyGoroutines(); stacks != "" {
		t.Errorf("goroutines of the proxy's after Close:\n%s", stacks)
	}
}

// proxyGoroutinesAfter is proxyGoroutines once it is empty or d has
// passed.
func proxyGoroutinesAfter(d time.Duration) string {
	deadline := time.Now().Add(d)
	for {
		stacks := proxyGoroutines()
		if stacks == "" || time.Now().After(deadline) {
			return stacks
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// proxyGoroutines returns the stacks of the goroutines running code of
// package proxy (not its tests).
func proxyGoroutines() string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "sluice/pkg/proxy.") {
			out = append(out, g)
		}
	}
	return strings.Join(out, "\n\n")
}

func TestSOCKS5Options(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts proxy.SOCKS5Options
	}{
		{"no dialer", proxy.SOCKS5Options{}},
		{"empty user", proxy.SOCKS5Options{Dialer: newHostDialer(), Credentials: &proxy.Credentials{Password: "x"}}},
		{"negative", proxy.SOCKS5Options{Dialer: newHostDialer(), MaxConns: -1}},
		{"idle", proxy.SOCKS5Options{Dialer: newHostDialer(), UDPIdleTimeout: -1}},
	} {
		if _, err := proxy.NewSOCKS5(tc.opts); err == nil {
			t.Errorf("%s: NewSOCKS5 worked", tc.name)
		}
	}
}
