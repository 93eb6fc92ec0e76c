package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
	xproxy "golang.org/x/net/proxy"

	"github.com/sluice-vpn/sluice/nat"
	"github.com/sluice-vpn/sluice/pkg/gateway"
	"github.com/sluice-vpn/sluice/tunnel/wireguard"
)

// The connect tests run `sluice connect` in this process against a gateway
// from pkg/gateway on loopback, whose DNS forwards to a server of the
// test's own that knows the names below. The servers the proxies reach
// are on the host's loopback too.
const (
	ctWebName  = "web.connect.test"
	ctEchoName = "echo.connect.test"
)

var ctLoopback = netip.MustParseAddr("127.0.0.1")

// ctGateway is a WireGuard gateway on loopback that lets one client in.
type ctGateway struct {
	gw   *gateway.Server
	conf string // the client's wg-quick file
	key  wireguard.Key
}

func ctStartGateway(t *testing.T) *ctGateway {
	t.Helper()
	dns := ctStartDNS(t, map[string]netip.Addr{ctWebName + ".": ctLoopback, ctEchoName + ".": ctLoopback})
	gwKey, err := wireguard.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	gwV4 := netip.MustParseAddr("100.96.0.1")
	gw, err := gateway.New(gateway.Options{
		WireGuard:    &gateway.WireGuardOptions{PrivateKey: gwKey, Bind: wireguard.NewAddrBind(ctLoopback)},
		Addrs:        []netip.Addr{gwV4},
		DNSUpstreams: []netip.AddrPort{dns},
		Egress:       nat.EgressOptions{Ports: nat.PortRange{Lo: 43000, Hi: 43999}, DialTimeout: 2 * time.Second},
		Policy:       nat.PolicyOptions{Allow: []nat.Rule{{Prefix: netip.MustParsePrefix("127.0.0.0/8")}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := gw.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { gw.Close() })

	key, err := wireguard.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.MustParseAddr("100.96.0.2")
	if err := gw.AddPeer(gateway.Peer{Name: "laptop", PublicKey: key.PublicKey(), Addrs: []netip.Addr{addr}}); err != nil {
		t.Fatal(err)
	}
	conf := &wireguard.Config{
		Interface: wireguard.Interface{PrivateKey: key, Addresses: []netip.Prefix{netip.PrefixFrom(addr, 32)}, DNS: []netip.Addr{gwV4}},
		Peers: []wireguard.ConfigPeer{{
			PublicKey:  gw.PublicKey(),
			Endpoint:   netip.AddrPortFrom(ctLoopback, uint16(gw.ListenPort())).String(),
			AllowedIPs: []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")},
		}},
	}
	path := filepath.Join(t.TempDir(), "client.conf")
	if err := os.WriteFile(path, []byte(conf.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	return &ctGateway{gw: gw, conf: path, key: gwKey}
}

// ctStartDNS answers A queries for names over UDP on loopback; other
// names do not exist.
func ctStartDNS(t *testing.T, names map[string]netip.Addr) netip.AddrPort {
	t.Helper()
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { pc.Close(); <-done })
	go func() {
		defer close(done)
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			var m dnsmessage.Message
			if m.Unpack(buf[:n]) != nil || len(m.Questions) != 1 {
				continue
			}
			q := m.Questions[0]
			m.Response, m.RecursionAvailable, m.Additionals = true, true, nil
			if a, ok := names[strings.ToLower(q.Name.String())]; !ok {
				m.RCode = dnsmessage.RCodeNameError
			} else if q.Type == dnsmessage.TypeA {
				m.Answers = []dnsmessage.Resource{{
					Header: dnsmessage.ResourceHeader{Name: q.Name, Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET, TTL: 60},
					Body:   &dnsmessage.AResource{A: a.As4()},
				}}
			}
			if b, err := m.Pack(); err == nil {
				pc.WriteTo(b, from)
			}
		}
	}()
	return netip.MustParseAddrPort(pc.LocalAddr().String())
}

// ctWeb serves a page that names the path it was asked for.
func ctWeb(t *testing.T) (port string) {
	t.Helper()
	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "through the tunnel: %s\n", r.URL.Path)
	}))
	t.Cleanup(web.Close)
	_, port, _ = net.SplitHostPort(web.Listener.Addr().String())
	return port
}

// ctUDPEcho echoes datagrams on loopback.
func ctUDPEcho(t *testing.T) (port uint16) {
	t.Helper()
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { pc.Close(); <-done })
	go func() {
		defer close(done)
		buf := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(buf[:n], from)
		}
	}()
	return uint16(pc.LocalAddr().(*net.UDPAddr).Port)
}

// ctBuffer is an io.Writer that can be read while it is written.
type ctBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *ctBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *ctBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// ctRun runs sluice with args in this process until ctx is done or it
// returns; its result arrives on the channel.
func ctRun(ctx context.Context, args ...string) (<-chan error, *ctBuffer, *ctBuffer) {
	stdout, stderr := new(ctBuffer), new(ctBuffer)
	root := newRootCmd()
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetIn(strings.NewReader(""))
	done := make(chan error, 1)
	go func() { done <- root.ExecuteContext(ctx) }()
	return done, stdout, stderr
}

// ctProxyAddrs waits for serving connect to print its proxies' addresses.
func ctProxyAddrs(t *testing.T, done <-chan error, out *ctBuffer) (socks, httpProxy string) {
	t.Helper()
	deadline := time.After(15 * time.Second)
	for {
		for line := range strings.Lines(out.String()) {
			if s, ok := strings.CutPrefix(line, "SOCKS5 proxy: socks5h://"); ok {
				socks = strings.TrimSpace(s)
			}
			if s, ok := strings.CutPrefix(line, "HTTP proxy:   http://"); ok {
				httpProxy = strings.TrimSpace(s)
			}
		}
		if socks != "" && httpProxy != "" {
			return socks, httpProxy
		}
		select {
		case err := <-done:
			t.Fatalf("connect ended before serving: %v\n%s", err, out)
		case <-deadline:
			t.Fatalf("connect did not print its proxies: %q", out)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func TestConnectServesProxies(t *testing.T) {
	gw := ctStartGateway(t)
	webPort := ctWeb(t)
	echoPort := ctUDPEcho(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done, out, _ := ctRun(ctx, "connect", "--config", gw.conf, "--socks5", "127.0.0.1:0", "--http-proxy", "127.0.0.1:0", "--log-level", "warn")
	socksAddr, httpAddr := ctProxyAddrs(t, done, out)
	page := func(path string) string { return "through the tunnel: " + path + "\n" }
	webURL := "http://" + net.JoinHostPort(ctWebName, webPort)

	t.Run("SOCKS5Connect", func(t *testing.T) {
		d, err := xproxy.SOCKS5("tcp", socksAddr, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		// The name goes to the proxy as a name: the tunnel's DNS
		// resolves it, the host's knows nothing of it.
		hc := &http.Client{Transport: &http.Transport{Dial: d.Dial}, Timeout: 10 * time.Second}
		ctCheckGet(t, hc, webURL+"/socks", page("/socks"))
	})

	t.Run("SOCKS5UDPAssociate", func(t *testing.T) {
		ctSOCKSUDPEcho(t, socksAddr, ctEchoName, echoPort)
	})

	t.Run("HTTPPlain", func(t *testing.T) {
		hc := &http.Client{Transport: &http.Transport{Proxy: http.ProxyURL(&url.URL{Scheme: "http", Host: httpAddr})}, Timeout: 10 * time.Second}
		ctCheckGet(t, hc, webURL+"/plain", page("/plain"))
	})

	t.Run("HTTPConnect", func(t *testing.T) {
		c, err := net.Dial("tcp", httpAddr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		target := net.JoinHostPort(ctWebName, webPort)
		fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", target, target)
		br := bufio.NewReader(c)
		resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("CONNECT: %v %v", resp, err)
		}
		fmt.Fprintf(c, "GET /connect HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", target)
		resp, err = http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		if string(body) != page("/connect") {
			t.Fatalf("through the CONNECT tunnel: %q", body)
		}
	})

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("connect after an interrupt: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("connect did not stop when interrupted")
	}
	if _, err := net.Dial("tcp", socksAddr); err == nil {
		t.Error("the SOCKS5 proxy still listens after connect returned")
	}
}

func ctCheckGet(t *testing.T, hc *http.Client, u, want string) {
	t.Helper()
	resp, err := hc.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != 200 || string(body) != want {
		t.Fatalf("GET %s: %s %q %v; want %q", u, resp.Status, body, err, want)
	}
}

// ctSOCKSUDPEcho sends a datagram through a SOCKS5 UDP association to
// host:port and checks the echo and the header that comes with it.
func ctSOCKSUDPEcho(t *testing.T, socksAddr, host string, port uint16) {
	t.Helper()
	c, err := net.Dial("tcp", socksAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	// No authentication; UDP ASSOCIATE from 0.0.0.0:0.
	c.Write([]byte{5, 1, 0})
	var b [10]byte
	if _, err := io.ReadFull(c, b[:2]); err != nil || b[1] != 0 {
		t.Fatalf("greeting: %v %v", b[:2], err)
	}
	c.Write([]byte{5, 3, 0, 1, 0, 0, 0, 0, 0, 0})
	if _, err := io.ReadFull(c, b[:10]); err != nil || b[1] != 0 || b[3] != 1 {
		t.Fatalf("UDP ASSOCIATE reply %v, %v", b, err)
	}
	relay := netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[4:8])), binary.BigEndian.Uint16(b[8:10]))
	u, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(relay))
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	msg := append([]byte{0, 0, 0, 3, byte(len(host))}, host...)
	msg = binary.BigEndian.AppendUint16(msg, port)
	msg = append(msg, "ping over UDP"...)
	buf := make([]byte, 1500)
	for attempt := 0; ; attempt++ {
		u.Write(msg)
		u.SetReadDeadline(time.Now().Add(time.Second))
		n, err := u.Read(buf)
		if err == nil {
			want := binary.BigEndian.AppendUint16(append([]byte{0, 0, 0, 1}, ctLoopback.AsSlice()...), port)
			want = append(want, "ping over UDP"...)
			if !bytes.Equal(buf[:n], want) {
				t.Fatalf("UDP reply % x, want % x", buf[:n], want)
			}
			return
		}
		if attempt == 4 {
			t.Fatalf("no UDP echo through the association: %v", err)
		}
	}
}

// TestConnectCurl lets curl use the proxies, as a program that is not Go
// would: --socks5-hostname and --proxy by hand, then the environment that
// connect gives the command it runs.
func TestConnectCurl(t *testing.T) {
	if _, err := exec.LookPath("curl"); err != nil {
		if os.Geteuid() != 0 {
			t.Skip("curl is not installed (make deps installs it as root); skipping the curl test")
		}
		t.Fatal("curl is not installed; make deps should have installed it")
	}
	gw := ctStartGateway(t)
	webPort := ctWeb(t)
	web := "http://" + net.JoinHostPort(ctWebName, webPort)
	script := strings.Join([]string{
		`unset NO_PROXY no_proxy`,
		`curl -sS --fail --max-time 10 --socks5-hostname "${ALL_PROXY#socks5h://}" ` + web + `/socks5-hostname`,
		`curl -sS --fail --max-time 10 --proxy "$HTTP_PROXY" ` + web + `/proxy`,
		`curl -sS --fail --max-time 10 -p --proxy "$HTTPS_PROXY" ` + web + `/proxytunnel`,
		`curl -sS --fail --max-time 10 ` + web + `/environment`,
	}, " && ")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	done, out, stderr := ctRun(ctx, "connect", "--config", gw.conf, "--", "sh", "-c", script)
	if err := <-done; err != nil {
		t.Fatalf("connect -- sh -c ...: %v\nstdout: %s\nstderr: %s", err, out, stderr)
	}
	want := ""
	for _, p := range []string{"/socks5-hostname", "/proxy", "/proxytunnel", "/environment"} {
		want += "through the tunnel: " + p + "\n"
	}
	if out.String() != want {
		t.Fatalf("curl printed %q, want %q\nstderr: %s", out, want, stderr)
	}
}

func TestConnectCommandExitStatus(t *testing.T) {
	if _, err := exec.LookPath("sh"); err != nil {
		t.Skip("no sh")
	}
	gw := ctStartGateway(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// The command sees the proxies, with the credentials in the URLs,
	// and connect exits with its status.
	check := `case "$ALL_PROXY $all_proxy $HTTPS_PROXY $http_proxy" in
	"socks5h://me:p%40ss@127.0.0.1:"*" socks5h://me:p%40ss@127.0.0.1:"*" http://me:p%40ss@127.0.0.1:"*" http://me:p%40ss@127.0.0.1:"*) exit 7;;
	esac
	echo "unexpected environment: $ALL_PROXY $all_proxy $HTTPS_PROXY $http_proxy" >&2
	exit 1`
	done, _, stderr := ctRun(ctx, "connect", "-c", gw.conf, "--proxy-auth", "me:p@ss", "--", "sh", "-c", check)
	err := <-done
	var st interface{ ExitStatus() int }
	if !errors.As(err, &st) || st.ExitStatus() != 7 {
		t.Fatalf("connect -- sh: %v (stderr %s), want exit status 7", err, stderr)
	}
}

func TestConnectFlagErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"connect", "--config", "x.conf", "--socks5", "0.0.0.0:1080"}, "--proxy-insecure"},
		{[]string{"connect", "--config", "x.conf", "--http-proxy", ":8080"}, "--proxy-insecure"},
		{[]string{"connect", "--config", "x.conf", "--socks5", "", "--http-proxy", ""}, "both empty"},
		{[]string{"connect", "--config", "x.conf", "--proxy-auth", "nocolon"}, "USER:PASSWORD"},
		{[]string{"connect", "--config", "/nonexistent/client.conf"}, "--config: open /nonexistent/client.conf"},
		{[]string{"connect"}, `"config" not set`},
		{[]string{"connect", "--config", "x.conf", "curl", "--", "x"}, "after --"},
	} {
		done, _, _ := ctRun(context.Background(), tc.args...)
		err := <-done
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("sluice %s: %v, want an error mentioning %q", strings.Join(tc.args, " "), err, tc.want)
		}
	}
}

func TestConnectWrongServerKey(t *testing.T) {
	gw := ctStartGateway(t)
	text, err := os.ReadFile(gw.conf)
	if err != nil {
		t.Fatal(err)
	}
	wrong, _ := wireguard.GeneratePrivateKey()
	bad := strings.Replace(string(text), gw.gw.PublicKey().String(), wrong.PublicKey().String(), 1)
	path := filepath.Join(t.TempDir(), "wrong.conf")
	os.WriteFile(path, []byte(bad), 0o600)
	start := time.Now()
	done, _, _ := ctRun(context.Background(), "connect", "-c", path, "--handshake-timeout", "700ms", "--socks5", "127.0.0.1:0", "--http-proxy", "127.0.0.1:0")
	err = <-done
	if err == nil || !strings.Contains(err.Error(), "no handshake") || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("connect with a wrong server key: %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("gave up after %v, want about 700ms", d)
	}
}
