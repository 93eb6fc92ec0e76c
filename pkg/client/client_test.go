package client_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/sluice-vpn/sluice/pkg/client"
	"github.com/sluice-vpn/sluice/tunnel/wireguard"
)

// newClient starts a client with conf and waits for its handshake.
func newClient(t testing.TB, conf *wireguard.Config, mod func(*client.Options)) *client.Client {
	t.Helper()
	opts := client.Options{Config: conf}
	if mod != nil {
		mod(&opts)
	}
	c, err := client.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Up(ctx); err != nil {
		t.Fatal(err)
	}
	return c
}

func TestFetchThroughTunnel(t *testing.T) {
	l := startLab(t)
	body := bytes.Repeat([]byte("sluice client "), 1<<20/14+1)[:1<<20]
	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write(body) }))
	defer web.Close()
	port := web.Listener.Addr().(*net.TCPAddr).Port
	l.dns.set("web.sluice.test", netip.MustParseAddr("127.0.0.1"))

	c := newClient(t, l.mustAddClient(t), nil)
	start := time.Now()
	resp, err := c.HTTPClient().Get("http://web.sluice.test:" + strconv.Itoa(port) + "/")
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(got) != sha256.Sum256(body) {
		t.Fatalf("got %d bytes, want the same %d bytes", len(got), len(body))
	}
	t.Logf("1 MiB in %v", time.Since(start).Round(time.Millisecond))
	// It came through the gateway: a flow of this client's is in its table.
	peers, err := l.gw.Peers()
	if err != nil || len(peers) != 1 || peers[0].RxBytes < 1<<10 {
		t.Fatalf("gateway peers %+v, %v: want the client's traffic counted", peers, err)
	}
	if st := l.gw.Stats(); st.DNS.Answered == 0 {
		t.Errorf("the gateway answered no DNS query: %+v", st.DNS)
	}
}

func TestLookupThroughTunnel(t *testing.T) {
	l := startLab(t)
	l.dns.set("dual.sluice.test", netip.MustParseAddr("192.0.2.7"), netip.MustParseAddr("2001:db8::7"))
	l.dns.set("big.sluice.test", netip.MustParseAddr("192.0.2.8"))
	l.dns.setTCPOnly("big.sluice.test")
	c := newClient(t, l.mustAddClient(t), nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	for _, tc := range []struct {
		network, host string
		want          []string
	}{
		{"ip", "dual.sluice.test", []string{"192.0.2.7", "2001:db8::7"}},
		{"ip4", "DUAL.sluice.test.", []string{"192.0.2.7"}},
		{"ip6", "dual.sluice.test", []string{"2001:db8::7"}},
		{"ip4", "big.sluice.test", []string{"192.0.2.8"}}, // truncated over UDP: asked again over TCP
		{"ip", "192.0.2.1", []string{"192.0.2.1"}},
	} {
		before := l.dns.queries.Load()
		addrs, err := c.LookupNetIP(ctx, tc.network, tc.host)
		if err != nil {
			t.Errorf("LookupNetIP(%s, %s): %v", tc.network, tc.host, err)
			continue
		}
		var got []string
		for _, a := range addrs {
			got = append(got, a.String())
		}
		if strings.Join(got, " ") != strings.Join(tc.want, " ") {
			t.Errorf("LookupNetIP(%s, %s) = %v, want %v", tc.network, tc.host, got, tc.want)
		}
		if _, err := netip.ParseAddr(tc.host); err != nil && l.dns.queries.Load() == before {
			t.Errorf("LookupNetIP(%s, %s): the gateway's upstream was not asked", tc.network, tc.host)
		}
	}

	_, err := c.LookupNetIP(ctx, "ip", "missing.sluice.test")
	var de *net.DNSError
	if !errors.As(err, &de) || !de.IsNotFound {
		t.Errorf("missing name: %v, want a not-found *net.DNSError", err)
	}
	// The host's resolver knows nothing of these names; dialing one works,
	// so the name went through the tunnel.
	if _, err := net.DefaultResolver.LookupNetIP(ctx, "ip", "dual.sluice.test"); err == nil {
		t.Log("the host resolves dual.sluice.test too; the test proves less")
	}

	cancelled, cancelNow := context.WithCancel(context.Background())
	cancelNow()
	if _, err := c.LookupNetIP(cancelled, "ip", "dual.sluice.test"); !errors.Is(err, context.Canceled) {
		t.Errorf("lookup with a cancelled context: %v, want context.Canceled", err)
	}
}

func TestWrongServerKeyNeverUp(t *testing.T) {
	l := startLab(t)
	conf := l.mustAddClient(t)
	wrong, err := wireguard.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	conf.Peers[0].PublicKey = wrong.PublicKey()
	c, err := client.New(client.Options{Config: conf})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	start := time.Now()
	err = c.Up(ctx)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Up with a wrong server key: %v, want the context's deadline error", err)
	}
	if d := time.Since(start); d < 900*time.Millisecond {
		t.Fatalf("Up gave up after %v, before its context ended", d)
	}
	peers, err := c.Peers()
	if err != nil || len(peers) != 1 || !peers[0].LastHandshake.IsZero() || peers[0].TxBytes == 0 {
		t.Fatalf("peers %+v, %v: want handshakes sent and none completed", peers, err)
	}
}

func TestDialErrors(t *testing.T) {
	l := startLab(t)
	conf := l.mustAddClient(t)
	// Only loopback is routed through the tunnel.
	conf.Peers[0].AllowedIPs = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128"), netip.MustParsePrefix("100.96.0.0/24")}
	c := newClient(t, conf, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	// A port nothing listens on: the gateway's dial is refused, and so is
	// the client's.
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().String()
	ln.Close()
	if _, err := c.DialContext(ctx, "tcp", closed); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("dial a closed port: %v, want ECONNREFUSED", err)
	}

	// Outside AllowedIPs: refused at once, nothing sent.
	start := time.Now()
	if _, err := c.DialContext(ctx, "tcp", "192.0.2.1:80"); !errors.Is(err, syscall.ENETUNREACH) {
		t.Errorf("dial outside AllowedIPs: %v, want ENETUNREACH", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("dial outside AllowedIPs took %v", d)
	}

	for _, tc := range []struct{ network, addr string }{
		{"sctp", "127.0.0.1:1"},
		{"tcp", "127.0.0.1"},
		{"tcp6", "127.0.0.1:80"},
		{"udp4", "[::1]:53"},
		{"tcp", ":80"},
	} {
		if conn, err := c.DialContext(ctx, tc.network, tc.addr); err == nil {
			conn.Close()
			t.Errorf("DialContext(%s, %s) worked", tc.network, tc.addr)
		}
	}

	cancelled, cancelNow := context.WithCancel(ctx)
	cancelNow()
	if _, err := c.DialContext(cancelled, "tcp", closed); !errors.Is(err, context.Canceled) {
		t.Errorf("dial with a cancelled context: %v", err)
	}
}

func TestUDPThroughTunnel(t *testing.T) {
	l := startLab(t)
	c := newClient(t, l.mustAddClient(t), nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	for _, network := range []string{"udp4", "udp6"} {
		echo := startUDPEcho(t, network)
		if echo == nil {
			continue
		}
		l.dns.set("echo-"+network+".sluice.test", echo.Addr())
		conn, err := c.DialContext(ctx, network, net.JoinHostPort("echo-"+network+".sluice.test", strconv.Itoa(int(echo.Port()))))
		if err != nil {
			t.Fatal(err)
		}
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		msg := []byte("datagram over " + network)
		if _, err := conn.Write(msg); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 100)
		n, err := conn.Read(buf)
		if err != nil || !bytes.Equal(buf[:n], msg) {
			t.Errorf("%s echo: %q, %v", network, buf[:n], err)
		}
		conn.Close()
	}
}

// startUDPEcho starts a UDP echo server on the loopback address of
// network; nil if the host has none.
func startUDPEcho(t testing.TB, network string) *netip.AddrPort {
	t.Helper()
	addr := "127.0.0.1:0"
	if network == "udp6" {
		addr = "[::1]:0"
	}
	pc, err := net.ListenPacket(network, addr)
	if err != nil {
		t.Logf("no %s loopback: %v", network, err)
		return nil
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(buf[:n], from)
		}
	}()
	ap := netip.MustParseAddrPort(pc.LocalAddr().String())
	return &ap
}

func TestListenOnTunnelAddress(t *testing.T) {
	l := startLab(t)
	c := newClient(t, l.mustAddClient(t), nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	own := c.Addrs()

	ln, err := c.Listen("tcp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	accepted := make(chan error, 1)
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				accepted <- err
				return
			}
			io.Copy(conn, conn)
			conn.Close()
		}
	}()
	for _, a := range own {
		conn, err := c.DialContext(ctx, "tcp", netip.AddrPortFrom(a, uint16(port)).String())
		if err != nil {
			t.Fatalf("dial own address %s: %v", a, err)
		}
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		conn.Write([]byte("hello " + a.String()))
		buf := make([]byte, 64)
		n, err := conn.Read(buf)
		if err != nil || string(buf[:n]) != "hello "+a.String() {
			t.Errorf("echo via %s: %q, %v", a, buf[:n], err)
		}
		conn.Close()
	}
	ln.Close()
	if err := <-accepted; !errors.Is(err, net.ErrClosed) {
		t.Errorf("Accept after Close: %v, want net.ErrClosed", err)
	}

	if _, err := c.Listen("tcp", "192.0.2.1:80"); !errors.Is(err, syscall.EADDRNOTAVAIL) {
		t.Errorf("listen on a foreign address: %v, want EADDRNOTAVAIL", err)
	}
	if _, err := c.Listen("udp", ":0"); err == nil {
		t.Error("Listen(udp) worked")
	}

	// A dual-stack UDP socket talks to both families and reports IPv4
	// senders as IPv4.
	pc, err := c.ListenPacket("udp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	for _, network := range []string{"udp4", "udp6"} {
		echo := startUDPEcho(t, network)
		if echo == nil {
			continue
		}
		pc.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := pc.WriteTo([]byte("via "+network), net.UDPAddrFromAddrPort(*echo)); err != nil {
			t.Fatalf("WriteTo %s: %v", echo, err)
		}
		buf := make([]byte, 64)
		n, from, err := pc.ReadFrom(buf)
		if err != nil || string(buf[:n]) != "via "+network || from.String() != echo.String() {
			t.Errorf("ReadFrom: %q from %v, %v; want the echo from %s", buf[:n], from, err, echo)
		}
	}
}

func TestOptionsErrors(t *testing.T) {
	key, _ := wireguard.GeneratePrivateKey()
	peerKey, _ := wireguard.GeneratePrivateKey()
	good := &wireguard.Config{
		Interface: wireguard.Interface{PrivateKey: key, Addresses: []netip.Prefix{netip.MustParsePrefix("100.96.0.9/32")}},
		Peers:     []wireguard.ConfigPeer{{PublicKey: peerKey.PublicKey(), Endpoint: "127.0.0.1:9", AllowedIPs: []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")}}},
	}
	noAddr := *good
	noAddr.Interface.Addresses = nil
	noPeer := *good
	noPeer.Peers = nil
	for _, tc := range []struct {
		name string
		opts client.Options
		want string
	}{
		{"nothing", client.Options{}, "exactly one of Options.Config"},
		{"two", client.Options{Config: good, ConfigText: good.String()}, "exactly one of Options.Config"},
		{"bad text", client.Options{ConfigText: "[Interface]\nPrivateKey = nope\n"}, "Options.ConfigText"},
		{"missing file", client.Options{ConfigFile: "/nonexistent/client.conf"}, "Options.ConfigFile"},
		{"no address", client.Options{Config: &noAddr}, "no Address"},
		{"no peer", client.Options{Config: &noPeer}, "no [Peer]"},
		{"stale", client.Options{Config: good, StaleAfter: -time.Second}, "Options.StaleAfter"},
	} {
		c, err := client.New(tc.opts)
		if err == nil {
			c.Close()
			t.Errorf("%s: New worked", tc.name)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want it to mention %q", tc.name, err, tc.want)
		}
	}
	c, err := client.New(client.Options{ConfigText: good.String()})
	if err != nil {
		t.Fatalf("a good configuration as text: %v", err)
	}
	c.Close()
	if err := c.Up(context.Background()); !errors.Is(err, client.ErrClosed) {
		t.Errorf("Up after Close: %v", err)
	}
	if _, err := c.DialContext(context.Background(), "tcp", "127.0.0.1:9"); !errors.Is(err, client.ErrClosed) {
		t.Errorf("dial after Close: %v", err)
	}
}

// TestReconnectsWhenGatewayMoves takes the gateway away from the address
// the client's endpoint name resolved to and brings it back, with the same
// key, at another address that the name now resolves to. The client
// notices the silence, resolves the name again, rebinds and handshakes
// with the new gateway, and logs both transitions.
func TestReconnectsWhenGatewayMoves(t *testing.T) {
	first := startLab(t)
	port := first.gw.ListenPort()
	first.dns.set("gw.sluice.test", netip.MustParseAddr("127.0.0.1"))
	conf := first.mustAddClient(t)
	conf.Peers[0].Endpoint = "gw.sluice.test:" + strconv.Itoa(port)

	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("hi"))
			c.Close()
		}
	}()

	core, logs := observer.New(zap.InfoLevel)
	c := newClient(t, conf, func(o *client.Options) {
		o.EndpointResolver = first.dns.resolver()
		o.StaleAfter = 500 * time.Millisecond
		o.Logger = zap.New(core)
	})
	hello := func(timeout time.Duration) error {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		conn, err := c.DialContext(ctx, "tcp", ln.Addr().String())
		if err != nil {
			return err
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(timeout))
		b, err := io.ReadAll(conn)
		if err != nil || string(b) != "hi" {
			return errors.Join(errUnexpected, err)
		}
		return nil
	}
	if err := hello(5 * time.Second); err != nil {
		t.Fatalf("before the move: %v", err)
	}
	portBefore := c.ListenPort()

	// The same gateway, by key, at 127.0.0.2 and the same port.
	second, err := newLab(labOptions{key: first.key, bind: netip.MustParseAddrPort("127.0.0.2:" + strconv.Itoa(port)), dns: first.dns})
	if err != nil {
		t.Skipf("cannot listen on 127.0.0.2:%d: %v", port, err)
	}
	defer second.gw.Close()
	if err := second.gw.AddPeer(gatewayPeer(conf)); err != nil {
		t.Fatal(err)
	}
	first.dns.set("gw.sluice.test", netip.MustParseAddr("127.0.0.2"))
	first.gw.Close()

	deadline := time.Now().Add(15 * time.Second)
	for {
		err := hello(500 * time.Millisecond)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no connection through the moved gateway: %v", err)
		}
	}
	peers, err := c.Peers()
	if err != nil || peers[0].Endpoint != netip.MustParseAddrPort("127.0.0.2:"+strconv.Itoa(port)) {
		t.Errorf("peer after the move: %+v, %v", peers, err)
	}
	if c.ListenPort() == portBefore {
		t.Logf("the rebind kept port %d (possible, but unlikely)", portBefore)
	}
	for _, msg := range []string{"handshake lost: the peer has not answered for a while; re-resolving and rebinding", "endpoint re-resolved"} {
		if logs.FilterMessage(msg).Len() == 0 {
			t.Errorf("no %q in the logs", msg)
		}
	}
	// The monitor logs the new handshake at its next look, which may
	// come after the connection that needed it.
	for deadline := time.Now().Add(2 * time.Second); logs.FilterMessage("handshake up").Len() < 2; {
		if time.Now().After(deadline) {
			t.Errorf("%d \"handshake up\" lines, want one before and one after the move", logs.FilterMessage("handshake up").Len())
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
}
