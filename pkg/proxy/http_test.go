package proxy_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/sluice-vpn/sluice/pkg/proxy"
)

// startHTTPProxy serves an HTTP proxy on a loopback port until the test
// ends.
func startHTTPProxy(t testing.TB, opts proxy.HTTPOptions) (*proxy.HTTPServer, string) {
	t.Helper()
	srv, err := proxy.NewHTTP(opts)
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
		// Close waited for each connection's last state change; after
		// it, net/http's goroutine only returns.
		if stacks := proxyGoroutinesAfter(time.Second); stacks != "" {
			t.Errorf("goroutines of the proxy's after Close:\n%s", stacks)
		}
	})
	return srv, ln.Addr().String()
}

// viaProxy is an HTTP client that uses the proxy at addr.
func viaProxy(addr string, user *url.Userinfo) *http.Client {
	u := &url.URL{Scheme: "http", Host: addr, User: user}
	return &http.Client{
		Transport: &http.Transport{Proxy: http.ProxyURL(u), DisableKeepAlives: true},
		Timeout:   10 * time.Second,
	}
}

// connectVia opens a CONNECT tunnel by hand and returns the connection
// and the status line.
func connectVia(t testing.TB, proxyAddr, target, auth string) (net.Conn, *bufio.Reader, string) {
	t.Helper()
	c, err := net.Dial("tcp", proxyAddr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n%s\r\n", target, target, auth)
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		t.Fatalf("CONNECT %s: %v", target, err)
	}
	return c, br, resp.Status
}

func TestHTTPConnect(t *testing.T) {
	echo := startEcho(t)
	d := newHostDialer()
	d.set("echo.test", netip.MustParseAddr("127.0.0.1"))
	_, addr := startHTTPProxy(t, proxy.HTTPOptions{Dialer: d})

	c, br, status := connectVia(t, addr, fmt.Sprintf("echo.test:%d", echo.Port), "")
	if status != "200 Connection established" {
		t.Fatalf("CONNECT: %s", status)
	}
	msg := bytes.Repeat([]byte("tunnelled "), 50000)
	go c.Write(msg)
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(br, got); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("echo through the tunnel: %v", err)
	}

	refused := refusedPort(t)
	for _, tc := range []struct{ target, want string }{
		{refused, "502 Bad Gateway"},
		{"192.0.2.1:443", "403 Forbidden"},
		{"missing.test:443", "502 Bad Gateway"},
		{"noport.test", "400 Bad Request"},
	} {
		if _, _, status := connectVia(t, addr, tc.target, ""); status != tc.want {
			t.Errorf("CONNECT %s: %s, want %s", tc.target, status, tc.want)
		}
	}
}

func TestHTTPForward(t *testing.T) {
	var got http.Header
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got = r.Header.Clone()
		if r.Method == http.MethodPost {
			io.Copy(w, r.Body)
			return
		}
		w.Header().Set("Connection", "X-Hop")
		w.Header().Set("X-Hop", "should not reach the client")
		w.Header().Set("X-End", "kept")
		fmt.Fprintf(w, "%s %s", r.Method, r.URL.RequestURI())
	}))
	defer origin.Close()
	d := newHostDialer()
	d.set("origin.test", netip.MustParseAddr("127.0.0.1"))
	_, addr := startHTTPProxy(t, proxy.HTTPOptions{Dialer: d})
	originURL := strings.Replace(origin.URL, "127.0.0.1", "origin.test", 1)

	req, _ := http.NewRequest(http.MethodGet, originURL+"/path?a=1;b=2", nil)
	req.Header.Set("Connection", "X-Secret")
	req.Header.Set("X-Secret", "hop-by-hop")
	req.Header.Set("Keep-Alive", "timeout=5")
	req.Header.Set("X-Forwarded-For", "198.51.100.1")
	req.Header.Set("X-End", "end-to-end")
	resp, err := viaProxy(addr, nil).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "GET /path?a=1;b=2" {
		t.Fatalf("GET: %s %q", resp.Status, body)
	}
	for _, h := range []string{"X-Secret", "Keep-Alive", "Proxy-Authorization"} {
		if v := got.Get(h); v != "" {
			t.Errorf("the origin got hop-by-hop header %s: %q", h, v)
		}
	}
	if got.Get("X-End") != "end-to-end" || got.Get("X-Forwarded-For") != "198.51.100.1" {
		t.Errorf("end-to-end headers changed: %v", got)
	}
	if resp.Header.Get("X-Hop") != "" || resp.Header.Get("X-End") != "kept" {
		t.Errorf("response headers: %v", resp.Header)
	}

	post := bytes.Repeat([]byte("posted "), 200000)
	resp, err = viaProxy(addr, nil).Post(originURL+"/echo", "application/octet-stream", bytes.NewReader(post))
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if !bytes.Equal(body, post) {
		t.Fatalf("POST echo: %d bytes back, want %d", len(body), len(post))
	}

	for _, tc := range []struct {
		url  string
		want int
	}{
		{"http://" + refusedPort(t) + "/", 502},
		{"http://192.0.2.1/", 403},
		{"http://missing.test/", 502},
	} {
		resp, err := viaProxy(addr, nil).Get(tc.url)
		if err != nil {
			t.Fatalf("GET %s: %v", tc.url, err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Errorf("GET %s: %s, want %d", tc.url, resp.Status, tc.want)
		}
	}

	// Not a proxy request.
	resp, err = http.Get("http://" + addr + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 400 {
		t.Errorf("origin-form request: %s, want 400", resp.Status)
	}
}

// TestHTTPStreams checks that a response reaches the client as the origin
// writes it, not when it ends.
func TestHTTPStreams(t *testing.T) {
	release := make(chan struct{})
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "first\n")
		w.(http.Flusher).Flush()
		select {
		case <-release:
		case <-r.Context().Done():
		}
		io.WriteString(w, "second\n")
	}))
	defer origin.Close()
	defer close(release)
	_, addr := startHTTPProxy(t, proxy.HTTPOptions{Dialer: newHostDialer()})
	resp, err := viaProxy(addr, nil).Get(origin.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	line, err := bufio.NewReader(resp.Body).ReadString('\n')
	if err != nil || line != "first\n" {
		t.Fatalf("first line while the origin waits: %q, %v", line, err)
	}
}

func TestHTTPAuth(t *testing.T) {
	leaked := make(chan string, 10)
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if v := r.Header.Get("Proxy-Authorization"); v != "" {
			leaked <- v
		}
		io.WriteString(w, "ok")
	}))
	defer origin.Close()
	echo := startEcho(t)
	_, addr := startHTTPProxy(t, proxy.HTTPOptions{Dialer: newHostDialer(), Credentials: &proxy.Credentials{Username: "bob", Password: "pw"}})

	for _, tc := range []struct {
		user *url.Userinfo
		want int
	}{
		{nil, 407},
		{url.UserPassword("bob", "wrong"), 407},
		{url.UserPassword("bob", "pw"), 200},
	} {
		resp, err := viaProxy(addr, tc.user).Get(origin.URL)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Errorf("GET as %v: %s, want %d", tc.user, resp.Status, tc.want)
		}
		if tc.want == 407 && resp.Header.Get("Proxy-Authenticate") == "" {
			t.Error("407 without Proxy-Authenticate")
		}
	}
	select {
	case v := <-leaked:
		t.Errorf("the origin got the proxy's credentials: %q", v)
	default:
	}
	target := echo.String()
	if _, _, status := connectVia(t, addr, target, ""); status != "407 Proxy Authentication Required" {
		t.Errorf("CONNECT without credentials: %s", status)
	}
	if _, _, status := connectVia(t, addr, target, "Proxy-Authorization: Basic Ym9iOnB3\r\n"); status != "200 Connection established" {
		t.Errorf("CONNECT with credentials: %s", status)
	}
}

func TestHTTPMaxConns(t *testing.T) {
	echo := startEcho(t)
	_, addr := startHTTPProxy(t, proxy.HTTPOptions{Dialer: newHostDialer(), MaxConns: 1})
	first, _, status := connectVia(t, addr, echo.String(), "")
	if status != "200 Connection established" {
		t.Fatalf("first CONNECT: %s", status)
	}
	if _, _, status := connectVia(t, addr, echo.String(), ""); status != "503 Service Unavailable" {
		t.Fatalf("second CONNECT, over the limit: %s, want 503", status)
	}
	first.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, _, status := connectVia(t, addr, echo.String(), "")
		if status == "200 Connection established" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no slot after the first connection closed: %s", status)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestHTTPTimeout(t *testing.T) {
	d := newHostDialer()
	d.fail = func(ctx context.Context, host string) error {
		<-ctx.Done()
		return ctx.Err()
	}
	_, addr := startHTTPProxy(t, proxy.HTTPOptions{Dialer: d, DialTimeout: 100 * time.Millisecond})
	if _, _, status := connectVia(t, addr, "slow.test:443", ""); status != "504 Gateway Timeout" {
		t.Errorf("CONNECT to a destination that does not answer: %s, want 504", status)
	}
	resp, err := viaProxy(addr, nil).Get("http://slow.test/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 504 {
		t.Errorf("GET from a destination that does not answer: %s, want 504", resp.Status)
	}
}
