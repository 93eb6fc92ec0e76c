package edge

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/websocket"

	"github.com/sluice-vpn/sluice/pkg/edge/registry"
	"github.com/sluice-vpn/sluice/pkg/expose"
)

func TestNewValidates(t *testing.T) {
	reg := newRegistry(t, nil)
	dial := newFakeTunnel().Dial
	ca := newTestCA(t)
	for _, c := range []struct {
		opts Options
		want string
	}{
		{Options{Dial: dial}, "Options.Registry"},
		{Options{Registry: reg}, "Options.Dial"},
		{Options{Registry: reg, Dial: dial, HTTPSAddr: ":0"}, "Options.Certificates"},
		{Options{Registry: reg, Dial: dial, Certificates: []tls.Certificate{ca.leaf(t, "a.example.com")}}, "Options.Certificates"},
		{Options{Registry: reg, Dial: dial, DialTimeout: -1}, "Options.DialTimeout"},
		{Options{Registry: reg, Dial: dial, Attempts: -1}, "Options.Attempts"},
		{Options{Registry: reg, Dial: dial, MaxConns: -1}, "Options.MaxConns"},
		{Options{Registry: reg, Dial: dial, HeaderTimeout: -1}, "Options.HeaderTimeout"},
		{Options{Registry: reg, Dial: dial, TCP: []TCPRoute{{Addr: "127.0.0.1:0", Hostname: "nodot"}}}, "Options.TCP[0].Hostname"},
		{Options{Registry: reg, Dial: dial, TCP: []TCPRoute{{Addr: "127.0.0.1", Hostname: "db.example.com"}}}, "Options.TCP[0].Addr"},
		{Options{Registry: reg, Dial: dial, Hostnames: map[string]Policy{"App.example.com": {}}}, `Options.Hostnames["App.example.com"]`},
		{Options{Registry: reg, Dial: dial, Hostnames: map[string]Policy{"app.example.com": {RateTotal: -1}}}, `Options.Hostnames["app.example.com"].RateTotal`},
	} {
		_, err := New(c.opts)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("err = %v, want one naming %s", err, c.want)
		}
	}

	// Start names the address it could not listen on, and leaves
	// nothing listening.
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	e, err := New(Options{Registry: reg, Dial: dial, HTTPAddr: "127.0.0.1:0", TCP: []TCPRoute{{Addr: busy.Addr().String(), Hostname: "db.example.com"}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Start(context.Background()); err == nil || !strings.Contains(err.Error(), "TCP[0].Addr "+busy.Addr().String()) {
		t.Errorf("Start on a busy address: %v", err)
	}
	if e.HTTPAddr() != nil {
		t.Error("a failed Start left the HTTP listener")
	}
	e.Close()
}

func TestHostRoutingAndUnknownHost(t *testing.T) {
	reg := newRegistry(t, nil)
	_, pa := origin(t, named("origin-a"))
	_, pb := origin(t, named("origin-b"))
	register(t, reg, "a.example.com", pa, expose.ProtocolHTTP, nil)
	register(t, reg, "b.example.com", pb, expose.ProtocolHTTP, nil)
	e := startEdge(t, Options{Registry: reg, HTTPAddr: "127.0.0.1:0"})
	c := testClient(e.HTTPAddr())

	for host, want := range map[string]string{
		"a.example.com":      "origin-a",
		"b.example.com":      "origin-b",
		"A.Example.COM:8080": "origin-a",
		"b.example.com.":     "origin-b",
	} {
		req, _ := http.NewRequest("GET", "http://"+e.HTTPAddr().String()+"/x", nil)
		req.Host = host
		resp, body := fetch(t, c, req)
		if resp.StatusCode != 200 || body != want {
			t.Errorf("Host %s: %d %q, want 200 %q", host, resp.StatusCode, body, want)
		}
	}
	resp, body := get(t, c, "http://nope.example.com/")
	// http.Error ends the body with one newline; a message of ours must
	// not add another.
	if resp.StatusCode != http.StatusNotFound || body != "sluice: no service for host nope.example.com\n" {
		t.Errorf("unknown host: %d %q", resp.StatusCode, body)
	}
	resp, _ = get(t, c, "http://"+e.HTTPAddr().String()+"/")
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("an address as Host: %d, want 404", resp.StatusCode)
	}
	mustMetric(t, e, "sluice_edge_unknown_host_total", map[string]string{"listener": "http"}, 2)
	mustMetric(t, e, "sluice_edge_requests_total", map[string]string{"hostname": "a.example.com", "code": "2xx"}, 2)
	mustMetric(t, e, "sluice_edge_request_duration_seconds", map[string]string{"hostname": "b.example.com"}, 2)
	// The client keeps a connection per URL host: the edge's address and
	// nope.example.com.
	mustMetric(t, e, "sluice_edge_connections_total", map[string]string{"listener": "http"}, 2)
	mustMetric(t, e, "sluice_edge_replicas", map[string]string{"hostname": "a.example.com", "health": "healthy"}, 1)
	if _, ok := metric(t, e, "sluice_edge_requests_total", map[string]string{"hostname": "nope.example.com"}); ok {
		t.Error("an unknown hostname got a label of its own")
	}
}

func TestNoReplica503(t *testing.T) {
	// Configured in the registry, so known, but nobody serves it.
	reg := newRegistry(t, map[string]registry.Hostname{"idle.example.com": {}})
	e := startEdge(t, Options{Registry: reg, HTTPAddr: "127.0.0.1:0"})
	resp, body := get(t, testClient(e.HTTPAddr()), "http://idle.example.com/")
	if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(body, "idle.example.com") {
		t.Errorf("no replica: %d %q, want 503 naming the hostname", resp.StatusCode, body)
	}
	mustMetric(t, e, "sluice_edge_refused_total", map[string]string{"hostname": "idle.example.com", "reason": "no_replica"}, 1)
	mustMetric(t, e, "sluice_edge_requests_total", map[string]string{"hostname": "idle.example.com", "code": "5xx"}, 1)
}

func TestWeightedSplit(t *testing.T) {
	reg := newRegistry(t, map[string]registry.Hostname{"w.example.com": {Weights: []registry.Weight{
		{Labels: map[string]string{"release": "stable"}, Weight: 90},
		{Labels: map[string]string{"release": "canary"}, Weight: 10},
	}}})
	_, p1 := origin(t, named("stable"))
	_, p2 := origin(t, named("stable"))
	_, p3 := origin(t, named("canary"))
	register(t, reg, "w.example.com", p1, expose.ProtocolHTTP, map[string]string{"release": "stable"})
	register(t, reg, "w.example.com", p2, expose.ProtocolHTTP, map[string]string{"release": "stable", "zone": "b"})
	register(t, reg, "w.example.com", p3, expose.ProtocolHTTP, map[string]string{"release": "canary"})
	e := startEdge(t, Options{Registry: reg, HTTPAddr: "127.0.0.1:0"})
	c := testClient(e.HTTPAddr())

	counts := map[string]int{}
	for i := 0; i < 1000; i++ {
		resp, body := get(t, c, "http://w.example.com/")
		if resp.StatusCode != 200 {
			t.Fatalf("request %d: %d %s", i, resp.StatusCode, body)
		}
		counts[body]++
	}
	if counts["stable"] < 870 || counts["stable"] > 930 || counts["stable"]+counts["canary"] != 1000 {
		t.Errorf("split %v, want about 900 stable and 100 canary", counts)
	}
}

func TestEvenSplitWithoutWeights(t *testing.T) {
	reg := newRegistry(t, nil)
	for _, n := range []string{"one", "two"} {
		_, p := origin(t, named(n))
		register(t, reg, "even.example.com", p, expose.ProtocolHTTP, nil)
	}
	e := startEdge(t, Options{Registry: reg, HTTPAddr: "127.0.0.1:0"})
	c := testClient(e.HTTPAddr())
	counts := map[string]int{}
	for i := 0; i < 100; i++ {
		_, body := get(t, c, "http://even.example.com/")
		counts[body]++
	}
	if counts["one"] < 40 || counts["two"] < 40 {
		t.Errorf("split %v, want about even", counts)
	}
}

func TestFailoverOnDialFailure(t *testing.T) {
	reg := newRegistry(t, nil)
	tun := newFakeTunnel()
	var goodHits atomic.Int64
	goodSrv, good := origin(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		goodHits.Add(1)
		b, _ := io.ReadAll(r.Body)
		fmt.Fprintf(w, "good %s", b)
	}))
	_, dead1 := origin(t, named("dead"))
	_, dead2 := origin(t, named("dead"))
	for _, p := range []uint16{good, dead1, dead2} {
		register(t, reg, "f.example.com", p, expose.ProtocolHTTP, nil)
	}
	loop := netip.MustParseAddr("127.0.0.1")
	tun.setFail(netip.AddrPortFrom(loop, dead1), fmt.Errorf("peer gone: %w", syscall.EHOSTUNREACH))
	tun.setFail(netip.AddrPortFrom(loop, dead2), fmt.Errorf("peer gone: %w", syscall.ECONNREFUSED))
	e := startEdge(t, Options{Registry: reg, Dial: tun.Dial, HTTPAddr: "127.0.0.1:0"})
	c := testClient(e.HTTPAddr())

	// Dial failures are retried for any request, POSTs with bodies
	// included: nothing reached the replica.
	for i := 0; i < 6; i++ {
		req, _ := http.NewRequest("POST", "http://f.example.com/", strings.NewReader(fmt.Sprint("body-", i)))
		resp, body := fetch(t, c, req)
		if resp.StatusCode != 200 || body != fmt.Sprint("good body-", i) {
			t.Fatalf("request %d: %d %q", i, resp.StatusCode, body)
		}
	}
	if goodHits.Load() != 6 {
		t.Errorf("good origin saw %d requests, want 6", goodHits.Load())
	}
	d1, d2 := tun.dialsTo(netip.AddrPortFrom(loop, dead1)), tun.dialsTo(netip.AddrPortFrom(loop, dead2))
	if d1 == 0 || d2 == 0 {
		t.Errorf("dead replicas dialled %d and %d times; want both tried", d1, d2)
	}
	failed, _ := metric(t, e, "sluice_edge_attempts_failed_total", map[string]string{"hostname": "f.example.com"})
	if failed != float64(d1+d2) {
		t.Errorf("attempts_failed_total = %v, want %d", failed, d1+d2)
	}
	// The registry heard about it.
	for _, s := range reg.Services() {
		for _, r := range s.Replicas {
			if r.Addr.Port() != good && r.Failures == 0 {
				t.Errorf("replica %s: no failure reported", r.ID)
			}
		}
	}

	// With every replica failing, the answer is 502 after Attempts.
	tun.setFail(netip.AddrPortFrom(loop, good), errors.New("peer gone"))
	goodSrv.Close() // and its connections kept alive in the edge's pool
	resp, body := get(t, c, "http://f.example.com/")
	if resp.StatusCode != http.StatusBadGateway || !strings.Contains(body, "f.example.com") {
		t.Errorf("all replicas down: %d %q, want 502 naming the hostname", resp.StatusCode, body)
	}
}

// resetter is an origin that reads a request's header and the first byte
// of its body, if it has one, then resets the connection: a replica that
// dies mid-request.
func resetter(t *testing.T) (uint16, *atomic.Int64) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var n atomic.Int64
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			n.Add(1)
			wg.Add(1)
			go func() {
				defer wg.Done()
				c.SetDeadline(time.Now().Add(5 * time.Second))
				br := bufio.NewReader(c)
				req, err := http.ReadRequest(br)
				if err == nil && req.ContentLength != 0 {
					br.ReadByte()
				}
				c.(*net.TCPConn).SetLinger(0)
				c.Close()
			}()
		}
	}()
	return portOf(t, ln.Addr()), &n
}

func TestRetryAfterResetOnlyWhenSafe(t *testing.T) {
	reg := newRegistry(t, nil)
	var mu sync.Mutex
	var seen []string
	_, good := origin(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		seen = append(seen, r.Method+" "+string(b))
		mu.Unlock()
		io.WriteString(w, "ok")
	}))
	bad, badConns := resetter(t)
	register(t, reg, "r.example.com", good, expose.ProtocolHTTP, nil)
	register(t, reg, "r.example.com", bad, expose.ProtocolHTTP, nil)
	e := startEdge(t, Options{Registry: reg, HTTPAddr: "127.0.0.1:0"})
	c := testClient(e.HTTPAddr())

	// Two POSTs: the replicas take turns, so one of them goes to the
	// resetter, which has read part of it. It must not be repeated.
	var refused []string
	for i := 0; i < 2; i++ {
		id := fmt.Sprint("post-", i)
		req, _ := http.NewRequest("POST", "http://r.example.com/", strings.NewReader(id))
		resp, _ := fetch(t, c, req)
		switch resp.StatusCode {
		case 200:
		case http.StatusBadGateway:
			refused = append(refused, id)
		default:
			t.Fatalf("POST %d: %d", i, resp.StatusCode)
		}
	}
	if badConns.Load() == 0 || len(refused) != 1 {
		t.Fatalf("resetter saw %d connections, %d POSTs failed; want the resetter to get one", badConns.Load(), len(refused))
	}
	mu.Lock()
	for _, s := range seen {
		if s == "POST "+refused[0] {
			t.Errorf("%s reached a second replica after the first had read part of it", refused[0])
		}
	}
	mu.Unlock()

	// GETs, idempotent and without a body, go on to the next replica.
	// (A fresh hostname: the first resetter is cooling down now.)
	bad2, bad2Conns := resetter(t)
	register(t, reg, "g.example.com", bad2, expose.ProtocolHTTP, nil)
	register(t, reg, "g.example.com", good, expose.ProtocolHTTP, nil)
	for i := 0; i < 4; i++ {
		resp, body := get(t, c, "http://g.example.com/")
		if resp.StatusCode != 200 || body != "ok" {
			t.Fatalf("GET %d: %d %q", i, resp.StatusCode, body)
		}
	}
	if bad2Conns.Load() == 0 {
		t.Error("the resetting replica was never tried")
	}
}

func TestForwardedHeaders(t *testing.T) {
	reg := newRegistry(t, nil)
	type seenReq struct {
		host string
		h    http.Header
	}
	seen := make(chan seenReq, 4)
	_, p := origin(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen <- seenReq{r.Host, r.Header.Clone()}
		fmt.Fprint(w, r.URL.RequestURI())
	}))
	register(t, reg, "app.example.com", p, expose.ProtocolHTTP, nil)
	e := startEdge(t, Options{Registry: reg, HTTPAddr: "127.0.0.1:0"})
	c := testClient(e.HTTPAddr())

	req, _ := http.NewRequest("GET", "http://app.example.com/p/a%2Fb?x=1&y=%zz;z", nil)
	req.Header.Set("X-Forwarded-For", "6.6.6.6")
	req.Header.Set("X-Forwarded-Host", "evil.example.com")
	req.Header.Set("X-Forwarded-Proto", "https")
	req.Header.Set("X-Forwarded-Port", "1")
	req.Header.Set("Forwarded", "for=6.6.6.6")
	req.Header.Set("X-Real-IP", "6.6.6.6")
	req.Header.Set("Authorization", "Bearer for-the-origin")
	resp, body := fetch(t, c, req)
	if resp.StatusCode != 200 {
		t.Fatalf("%d %s", resp.StatusCode, body)
	}
	if body != "/p/a%2Fb?x=1&y=%zz;z" {
		t.Errorf("origin saw %q, want the path and query as sent", body)
	}
	got := <-seen
	for k, want := range map[string]string{
		"X-Forwarded-For":   "127.0.0.1",
		"X-Forwarded-Host":  "app.example.com",
		"X-Forwarded-Proto": "http",
		"Forwarded":         "for=127.0.0.1;host=app.example.com;proto=http",
		"X-Forwarded-Port":  "",
		"X-Real-Ip":         "",
		"Authorization":     "Bearer for-the-origin", // not the edge's: no auth policy
	} {
		if v := strings.Join(got.h.Values(k), ", "); v != want {
			t.Errorf("origin saw %s: %q, want %q", k, v, want)
		}
	}
	if got.host != "app.example.com" {
		t.Errorf("origin saw Host %q", got.host)
	}

	// Over IPv6, Forwarded quotes the address.
	ln6, err := net.Listen("tcp", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	}
	ln6.Close()
	e6 := startEdge(t, Options{Registry: reg, HTTPAddr: "[::1]:0"})
	resp, _ = get(t, testClient(e6.HTTPAddr()), "http://app.example.com/")
	if resp.StatusCode != 200 {
		t.Fatalf("over IPv6: %d", resp.StatusCode)
	}
	got = <-seen
	if f := got.h.Get("Forwarded"); f != `for="[::1]";host=app.example.com;proto=http` {
		t.Errorf("Forwarded over IPv6: %q", f)
	}
	if x := got.h.Get("X-Forwarded-For"); x != "::1" {
		t.Errorf("X-Forwarded-For over IPv6: %q", x)
	}
}

func TestForwardedValue(t *testing.T) {
	for _, c := range []struct {
		ip, host, want string
	}{
		{"192.0.2.1", "app.example.com", "for=192.0.2.1;host=app.example.com;proto=https"},
		{"2001:db8::1", "app.example.com:8443", `for="[2001:db8::1]";host="app.example.com:8443";proto=https`},
	} {
		if got := forwarded(netip.MustParseAddr(c.ip), c.host, "https"); got != c.want {
			t.Errorf("forwarded(%s, %s) = %s, want %s", c.ip, c.host, got, c.want)
		}
	}
}

func TestRefusalsNeverReachOrigin(t *testing.T) {
	reg := newRegistry(t, nil)
	var hits atomic.Int64
	auths := make(chan string, 16)
	_, p := origin(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		auths <- r.Header.Get("Authorization")
		io.WriteString(w, "origin")
	}))
	for _, h := range []string{"deny.example.com", "paths.example.com", "auth.example.com", "rate.example.com", "allow.example.com"} {
		register(t, reg, h, p, expose.ProtocolHTTP, nil)
	}
	e := startEdge(t, Options{Registry: reg, HTTPAddr: "127.0.0.1:0", Hostnames: map[string]Policy{
		"deny.example.com":  {Deny: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}},
		"allow.example.com": {Allow: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}},
		"paths.example.com": {Paths: []string{"/api"}},
		"auth.example.com": {
			BearerTokens: []string{HashSecret("t0ken")},
			BasicUsers:   map[string]string{"alice": HashSecret("pw")},
		},
		"rate.example.com": {RatePerClient: 0.5, BurstPerClient: 2},
	}})
	c := testClient(e.HTTPAddr())
	do := func(host, path string, set func(*http.Request)) (*http.Response, string) {
		req, _ := http.NewRequest("GET", "http://"+host+path, nil)
		if set != nil {
			set(req)
		}
		return fetch(t, c, req)
	}

	type want struct {
		code   int
		reason string
	}
	cases := []struct {
		host, path string
		set        func(*http.Request)
		want
	}{
		{"deny.example.com", "/", nil, want{403, "ip"}},
		{"allow.example.com", "/", nil, want{403, "ip"}},
		{"paths.example.com", "/apix", nil, want{403, "path"}},
		{"paths.example.com", "/api/../admin", nil, want{403, "path"}},
		{"paths.example.com", "/api/v1", nil, want{200, ""}},
		{"auth.example.com", "/", nil, want{401, "auth"}},
		{"auth.example.com", "/", func(r *http.Request) { r.Header.Set("Authorization", "Bearer wrong") }, want{401, "auth"}},
		{"auth.example.com", "/", func(r *http.Request) { r.SetBasicAuth("alice", "nope") }, want{401, "auth"}},
		{"auth.example.com", "/", func(r *http.Request) { r.Header.Set("Authorization", "Bearer t0ken") }, want{200, ""}},
		{"auth.example.com", "/", func(r *http.Request) { r.SetBasicAuth("alice", "pw") }, want{200, ""}},
		{"rate.example.com", "/", nil, want{200, ""}},
		{"rate.example.com", "/", nil, want{200, ""}},
		{"rate.example.com", "/", nil, want{429, "rate"}},
	}
	admitted := 0
	refusals := map[[2]string]int{}
	for _, tc := range cases {
		before := hits.Load()
		resp, body := do(tc.host, tc.path, tc.set)
		if resp.StatusCode != tc.code {
			t.Errorf("%s%s: %d %q, want %d", tc.host, tc.path, resp.StatusCode, body, tc.code)
			continue
		}
		if tc.code == 200 {
			admitted++
			if hits.Load() != before+1 {
				t.Errorf("%s%s: admitted but the origin did not see it", tc.host, tc.path)
			}
			if a := <-auths; a != "" {
				t.Errorf("%s%s: the origin saw the edge's credentials %q", tc.host, tc.path, a)
			}
			continue
		}
		refusals[[2]string{tc.host, tc.reason}]++
		if hits.Load() != before {
			t.Errorf("%s%s: refused with %d but the origin saw it", tc.host, tc.path, tc.code)
		}
		switch tc.code {
		case 401:
			ch := resp.Header.Values("WWW-Authenticate")
			if len(ch) != 2 || !strings.HasPrefix(ch[0], `Basic realm="auth.example.com"`) || ch[1] != `Bearer realm="auth.example.com"` {
				t.Errorf("401 challenges %q", ch)
			}
		case 429:
			if resp.Header.Get("Retry-After") != "2" {
				t.Errorf("429 Retry-After %q, want 2", resp.Header.Get("Retry-After"))
			}
		}
	}
	if int(hits.Load()) != admitted {
		t.Errorf("origin saw %d requests, %d were admitted", hits.Load(), admitted)
	}
	for k, n := range refusals {
		mustMetric(t, e, "sluice_edge_refused_total", map[string]string{"hostname": k[0], "reason": k[1]}, float64(n))
	}
	mustMetric(t, e, "sluice_edge_requests_total", map[string]string{"hostname": "auth.example.com", "code": "4xx"}, 3)

	// A reload applies at once: the denied hostname opens up.
	if err := e.SetPolicies(map[string]Policy{"deny.example.com": {Paths: []string{"/"}}}); err != nil {
		t.Fatal(err)
	}
	if resp, _ := do("deny.example.com", "/", nil); resp.StatusCode != 200 {
		t.Errorf("after the reload: %d", resp.StatusCode)
	}
	<-auths
	if err := e.SetPolicies(map[string]Policy{"deny.example.com": {Paths: []string{"nope"}}}); err == nil {
		t.Error("a bad reload was accepted")
	}
	if resp, _ := do("paths.example.com", "/elsewhere", nil); resp.StatusCode != 200 {
		t.Errorf("a bad reload changed the policies: %d", resp.StatusCode)
	}
}

func TestWebSocket(t *testing.T) {
	reg := newRegistry(t, nil)
	_, p := origin(t, websocket.Handler(func(ws *websocket.Conn) {
		io.Copy(ws, ws)
	}))
	register(t, reg, "ws.example.com", p, expose.ProtocolHTTP, nil)
	e := startEdge(t, Options{Registry: reg, HTTPAddr: "127.0.0.1:0"})

	cfg, err := websocket.NewConfig("ws://ws.example.com/echo", "http://ws.example.com/")
	if err != nil {
		t.Fatal(err)
	}
	conn := dialRaw(t, e.HTTPAddr(), 5*time.Second)
	ws, err := websocket.NewClient(cfg, conn)
	if err != nil {
		t.Fatalf("handshake through the edge: %v", err)
	}
	for _, msg := range []string{"hello", strings.Repeat("x", 100000), "bye"} {
		if err := websocket.Message.Send(ws, msg); err != nil {
			t.Fatal(err)
		}
		// The echo server answers in frames of its own sizes: read the
		// stream of their payloads.
		back := make([]byte, len(msg))
		if _, err := io.ReadFull(ws, back); err != nil {
			t.Fatal(err)
		}
		if string(back) != msg {
			t.Fatalf("echo of %d bytes came back different", len(msg))
		}
	}
	mustMetric(t, e, "sluice_edge_connections_active", map[string]string{"listener": "http"}, 1)
	ws.Close()
	eventually(t, "the upgraded connection to be counted closed", func() bool {
		v, _ := metric(t, e, "sluice_edge_connections_active", map[string]string{"listener": "http"})
		return v == 0
	})
	mustMetric(t, e, "sluice_edge_requests_total", map[string]string{"hostname": "ws.example.com", "code": "1xx"}, 1)
}

func TestServerSentEvents(t *testing.T) {
	reg := newRegistry(t, nil)
	next := make(chan struct{})
	_, p := origin(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: one\n\n")
		w.(http.Flusher).Flush()
		select {
		case <-next:
		case <-r.Context().Done():
			return
		}
		io.WriteString(w, "data: two\n\n")
	}))
	register(t, reg, "sse.example.com", p, expose.ProtocolHTTP, nil)
	e := startEdge(t, Options{Registry: reg, HTTPAddr: "127.0.0.1:0"})
	c := testClient(e.HTTPAddr())

	resp, err := c.Get("http://sse.example.com/events")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	readEvent := func() string {
		done := make(chan string, 1)
		go func() {
			var ev strings.Builder
			for {
				line, err := br.ReadString('\n')
				ev.WriteString(line)
				if err != nil || line == "\n" {
					done <- ev.String()
					return
				}
			}
		}()
		select {
		case ev := <-done:
			return ev
		case <-time.After(3 * time.Second):
			t.Fatal("the event did not arrive: the edge holds the stream back")
			return ""
		}
	}
	if ev := readEvent(); ev != "data: one\n\n" {
		t.Fatalf("first event %q", ev)
	}
	close(next)
	if ev := readEvent(); ev != "data: two\n\n" {
		t.Fatalf("second event %q", ev)
	}
}

func TestUploadStreamed(t *testing.T) {
	const size = 32 << 20
	reg := newRegistry(t, nil)
	firstMiB := make(chan struct{})
	_, p := origin(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := sha256.New()
		buf := make([]byte, 64<<10)
		var n int64
		signalled := false
		for {
			k, err := r.Body.Read(buf)
			h.Write(buf[:k])
			n += int64(k)
			if !signalled && n >= 1<<20 {
				close(firstMiB)
				signalled = true
			}
			if err != nil {
				break
			}
		}
		fmt.Fprintf(w, "%d %x", n, h.Sum(nil))
	}))
	register(t, reg, "up.example.com", p, expose.ProtocolHTTP, nil)
	e := startEdge(t, Options{Registry: reg, HTTPAddr: "127.0.0.1:0"})
	c := testClient(e.HTTPAddr())

	pr, pw := io.Pipe()
	want := sha256.New()
	writeErr := make(chan error, 1)
	go func() {
		chunk := make([]byte, 256<<10)
		for i := range chunk {
			chunk[i] = byte(i * 7)
		}
		for written := 0; written < size; written += len(chunk) {
			if written == 1<<20 {
				// The origin must have the first MiB before the
				// client sends more: no one holds the body whole.
				select {
				case <-firstMiB:
				case <-time.After(5 * time.Second):
					pw.CloseWithError(errors.New("the origin never saw the first MiB"))
					writeErr <- errors.New("the origin did not see the first MiB while the client was still sending: the body is buffered")
					return
				}
			}
			want.Write(chunk)
			if _, err := pw.Write(chunk); err != nil {
				writeErr <- err
				return
			}
		}
		writeErr <- pw.Close()
	}()
	req, _ := http.NewRequest("PUT", "http://up.example.com/upload", pr)
	resp, body := fetch(t, c, req)
	if err := <-writeErr; err != nil {
		t.Fatal(err)
	}
	if wantBody := fmt.Sprintf("%d %s", size, hex.EncodeToString(want.Sum(nil))); resp.StatusCode != 200 || body != wantBody {
		t.Fatalf("upload: %d %q, want %q", resp.StatusCode, body, wantBody)
	}
}

func TestMaxConnsHTTP(t *testing.T) {
	reg := newRegistry(t, nil)
	_, p := origin(t, named("ok"))
	register(t, reg, "app.example.com", p, expose.ProtocolHTTP, nil)
	e := startEdge(t, Options{Registry: reg, HTTPAddr: "127.0.0.1:0", MaxConns: 1})

	held := dialRaw(t, e.HTTPAddr(), 0)
	eventually(t, "the first connection to be counted", func() bool {
		v, _ := metric(t, e, "sluice_edge_connections_active", map[string]string{"listener": "http"})
		return v == 1
	})
	over := dialRaw(t, e.HTTPAddr(), 3*time.Second)
	fmt.Fprintf(over, "GET / HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
	if n, err := over.Read(make([]byte, 1)); err == nil {
		t.Fatalf("a connection over MaxConns was served (%d bytes)", n)
	} else if errors.Is(err, syscall.ETIMEDOUT) || isTimeout(err) {
		t.Fatal("a connection over MaxConns was left waiting")
	}
	mustMetric(t, e, "sluice_edge_connections_refused_total", map[string]string{"listener": "http"}, 1)

	// The held connection is served, and once it is gone the next one
	// is too.
	held.SetDeadline(time.Now().Add(3 * time.Second))
	fmt.Fprintf(held, "GET / HTTP/1.1\r\nHost: app.example.com\r\nConnection: close\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(held), nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("the held connection: %v %v", resp, err)
	}
	resp.Body.Close()
	held.Close()
	eventually(t, "the slot to free up", func() bool {
		v, _ := metric(t, e, "sluice_edge_connections_active", map[string]string{"listener": "http"})
		return v == 0
	})
	resp2, body := get(t, testClient(e.HTTPAddr()), "http://app.example.com/")
	if resp2.StatusCode != 200 || body != "ok" {
		t.Fatalf("after the slot freed: %d %q", resp2.StatusCode, body)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func TestShutdownLetsRequestsFinish(t *testing.T) {
	reg := newRegistry(t, nil)
	release := make(chan struct{})
	started := make(chan struct{}, 1)
	_, p := origin(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		started <- struct{}{}
		<-release
		io.WriteString(w, "finished")
	}))
	register(t, reg, "slow.example.com", p, expose.ProtocolHTTP, nil)
	e := startEdge(t, Options{Registry: reg, HTTPAddr: "127.0.0.1:0"})
	addr := e.HTTPAddr().String()
	c := testClient(e.HTTPAddr())

	type result struct {
		code int
		body string
		err  error
	}
	res := make(chan result, 1)
	go func() {
		resp, err := c.Get("http://slow.example.com/")
		if err != nil {
			res <- result{err: err}
			return
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		res <- result{resp.StatusCode, string(b), err}
	}()
	<-started
	shut := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		shut <- e.Shutdown(ctx)
	}()
	eventually(t, "the listener to close", func() bool {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
		}
		return err != nil
	})
	close(release)
	r := <-res
	if r.err != nil || r.code != 200 || r.body != "finished" {
		t.Errorf("in-flight request during Shutdown: %+v", r)
	}
	if err := <-shut; err != nil {
		t.Errorf("Shutdown: %v", err)
	}
}

func TestShutdownDeadlineCloses(t *testing.T) {
	reg := newRegistry(t, nil)
	_, p := origin(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.(http.Flusher).Flush()
		<-r.Context().Done() // a stream that never ends by itself
	}))
	register(t, reg, "stream.example.com", p, expose.ProtocolHTTP, nil)
	e := startEdge(t, Options{Registry: reg, HTTPAddr: "127.0.0.1:0"})
	resp, err := testClient(e.HTTPAddr()).Get("http://stream.example.com/")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := e.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Shutdown with a stream open: %v, want the deadline", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Shutdown took %s past its deadline", d)
	}
	if _, err := io.ReadAll(resp.Body); err == nil {
		t.Error("the stream ended cleanly; want it cut")
	}
}

func TestStartContextCloses(t *testing.T) {
	e, err := New(Options{Registry: newRegistry(t, nil), Dial: newFakeTunnel().Dial, HTTPAddr: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	if err := e.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := e.Start(ctx); err == nil {
		t.Error("a second Start succeeded")
	}
	addr := e.HTTPAddr().String()
	cancel()
	eventually(t, "the edge to close with its context", func() bool {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
		}
		return err != nil
	})
	e.Close()
	if err := e.Start(context.Background()); err == nil {
		t.Error("Start after Close succeeded")
	}
}

func TestCloseEndsUpgradedConnections(t *testing.T) {
	reg := newRegistry(t, nil)
	_, p := origin(t, websocket.Handler(func(ws *websocket.Conn) { io.Copy(ws, ws) }))
	register(t, reg, "ws.example.com", p, expose.ProtocolHTTP, nil)
	e := startEdge(t, Options{Registry: reg, HTTPAddr: "127.0.0.1:0"})
	cfg, _ := websocket.NewConfig("ws://ws.example.com/", "http://ws.example.com/")
	conn := dialRaw(t, e.HTTPAddr(), 5*time.Second)
	ws, err := websocket.NewClient(cfg, conn)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		e.Close()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not return with a WebSocket open")
	}
	if _, err := ws.Read(make([]byte, 1)); err == nil || isTimeout(err) {
		t.Errorf("the WebSocket after Close: %v, want it closed", err)
	}
}

func TestUnderscoreHeadersDropped(t *testing.T) {
	reg := newRegistry(t, nil)
	seen := make(chan http.Header, 1)
	_, p := origin(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen <- r.Header.Clone()
	}))
	register(t, reg, "app.example.com", p, expose.ProtocolHTTP, nil)
	e := startEdge(t, Options{Registry: reg, HTTPAddr: "127.0.0.1:0"})

	// A CGI-style origin would read each of these as an HTTP_* variable
	// of the edge's own making.
	req, _ := http.NewRequest("GET", "http://app.example.com/", nil)
	req.Header["X_Forwarded_For"] = []string{"6.6.6.6"}
	req.Header["x_real_ip"] = []string{"6.6.6.6"}
	req.Header["X-Forwarded_Proto"] = []string{"https"}
	req.Header["Remote_User"] = []string{"admin"}
	req.Header.Set("X-Custom", "kept")
	resp, body := fetch(t, testClient(e.HTTPAddr()), req)
	if resp.StatusCode != 200 {
		t.Fatalf("%d %s", resp.StatusCode, body)
	}
	got := <-seen
	for k, v := range got {
		if strings.Contains(k, "_") {
			t.Errorf("origin saw %s: %q", k, v)
		}
	}
	if v := got.Values("X-Forwarded-For"); len(v) != 1 || v[0] != "127.0.0.1" {
		t.Errorf("origin saw X-Forwarded-For %q, want the edge's alone", v)
	}
	if v := got.Get("X-Custom"); v != "kept" {
		t.Errorf("origin saw X-Custom %q, want it passed through", v)
	}
}

func TestMalformedRequestBodyIsTheClients(t *testing.T) {
	reg := newRegistry(t, nil)
	_, p := origin(t, named("origin"))
	register(t, reg, "app.example.com", p, expose.ProtocolHTTP, nil)
	e := startEdge(t, Options{Registry: reg, HTTPAddr: "127.0.0.1:0"})

	c := dialRaw(t, e.HTTPAddr(), 5*time.Second)
	// A good first chunk, then a chunk size that is not hex.
	io.WriteString(c, "POST / HTTP/1.1\r\nHost: app.example.com\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZZ\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("malformed chunked body: %d %q, want 400", resp.StatusCode, b)
	}
	for _, s := range reg.Services() {
		for _, r := range s.Replicas {
			if r.Failures != 0 || !r.Healthy {
				t.Errorf("replica %s: %d failures, healthy %v; the client's body is no fault of its", r.ID, r.Failures, r.Healthy)
			}
		}
	}
	mustMetric(t, e, "sluice_edge_attempts_failed_total", map[string]string{"hostname": "app.example.com"}, 0)
	mustMetric(t, e, "sluice_edge_requests_total", map[string]string{"hostname": "app.example.com", "code": "4xx"}, 1)

	// The replica still serves.
	resp, body := get(t, testClient(e.HTTPAddr()), "http://app.example.com/")
	if resp.StatusCode != 200 || body != "origin" {
		t.Errorf("after the bad request: %d %q", resp.StatusCode, body)
	}
}

// lateResetConn is a connection to an origin through a tunnel that is
// slow to pass on the origin's reset: a failed read is held back until
// the edge has written again, as when the reset crosses the next
// request on its way. It reports on seen when a read failed.
type lateResetConn struct {
	net.Conn
	seen, poked, closed           chan struct{}
	seenOnce, pokeOnce, closeOnce sync.Once
}

func (c *lateResetConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if err != nil {
		c.seenOnce.Do(func() { close(c.seen) })
		select {
		case <-c.poked:
		case <-c.closed:
		}
	}
	return n, err
}

func (c *lateResetConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	select {
	case <-c.seen:
		c.pokeOnce.Do(func() { close(c.poked) })
	default:
	}
	return n, err
}

func (c *lateResetConn) Close() error {
	c.closeOnce.Do(func() { close(c.closed) })
	return c.Conn.Close()
}

func TestStaleKeepAliveRetried(t *testing.T) {
	// The origin answers one request per connection, keeping it alive,
	// and the test resets the connection once the answer is through.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan net.Conn, 8)
	var bodies sync.Map
	var wg sync.WaitGroup
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
		close(served)
		for c := range served {
			c.Close()
		}
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.SetDeadline(time.Now().Add(5 * time.Second))
			req, err := http.ReadRequest(bufio.NewReader(c))
			if err != nil {
				c.Close()
				continue
			}
			b, _ := io.ReadAll(req.Body)
			bodies.Store(string(b), true)
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
			served <- c
		}
	}()

	reg := newRegistry(t, nil)
	register(t, reg, "app.example.com", portOf(t, ln.Addr()), expose.ProtocolHTTP, nil)
	conns := make(chan *lateResetConn, 8)
	dial := func(ctx context.Context, dst netip.AddrPort) (net.Conn, error) {
		c, err := newFakeTunnel().Dial(ctx, dst)
		if err != nil {
			return nil, err
		}
		lc := &lateResetConn{Conn: c, seen: make(chan struct{}), poked: make(chan struct{}), closed: make(chan struct{})}
		conns <- lc
		return lc, nil
	}
	e := startEdge(t, Options{Registry: reg, Dial: dial, HTTPAddr: "127.0.0.1:0"})
	if e.transport.IdleConnTimeout >= 5*time.Second {
		t.Errorf("IdleConnTimeout %v: origins commonly drop idle connections after 5 s; the edge must let go first", e.transport.IdleConnTimeout)
	}
	c := testClient(e.HTTPAddr())

	post := func(body string) *http.Response {
		req, _ := http.NewRequest("POST", "http://app.example.com/", strings.NewReader(body))
		resp, got := fetch(t, c, req)
		if resp.StatusCode == 200 && got != "ok" {
			t.Fatalf("POST %s: %q", body, got)
		}
		return resp
	}
	if resp := post("first"); resp.StatusCode != 200 {
		t.Fatalf("first POST: %d", resp.StatusCode)
	}
	first := <-served
	first.(*net.TCPConn).SetLinger(0)
	first.Close()
	// Wait until the edge's side of the connection has the reset, idle
	// in the pool: the next request goes out on it.
	lc := <-conns
	select {
	case <-lc.seen:
	case <-time.After(5 * time.Second):
		t.Fatal("the edge's connection never saw the reset")
	}

	if resp := post("second"); resp.StatusCode != 200 {
		t.Fatalf("POST on a connection the origin had reset: %d, want it sent again on a fresh one", resp.StatusCode)
	}
	if _, ok := bodies.Load("second"); !ok {
		t.Error("the origin never got the second POST")
	}
	if n := len(conns); n != 1 {
		t.Errorf("the edge opened %d more connections, want 1 after the dead one", n)
	}
	for _, s := range reg.Services() {
		for _, r := range s.Replicas {
			if r.Failures != 0 {
				t.Errorf("replica %s: %d failures; a connection its origin closed while idle is no failure of its", r.ID, r.Failures)
			}
		}
	}
	mustMetric(t, e, "sluice_edge_attempts_failed_total", map[string]string{"hostname": "app.example.com"}, 0)
}

// smugglingEdge is an edge in front of an origin that records the path
// of every request it gets; seen returns them.
func smugglingEdge(t *testing.T) (e *Edge, seen func() []string, arrived <-chan struct{}) {
	t.Helper()
	reg := newRegistry(t, nil)
	var mu sync.Mutex
	var paths []string
	got := make(chan struct{}, 16)
	_, p := origin(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		paths = append(paths, r.URL.Path)
		mu.Unlock()
		got <- struct{}{}
		io.Copy(io.Discard, r.Body)
		io.WriteString(w, "origin")
	}))
	register(t, reg, "app.example.com", p, expose.ProtocolHTTP, nil)
	e = startEdge(t, Options{Registry: reg, HTTPAddr: "127.0.0.1:0"})
	return e, func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), paths...)
	}, got
}

// wantClosed reads what is left of conn and fails unless the edge closed
// it: EOF or a reset, not the deadline.
func wantClosed(t *testing.T, br *bufio.Reader) {
	t.Helper()
	rest, err := io.ReadAll(br)
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatalf("the edge kept the connection open after a framing error (read %q)", rest)
	}
	if len(rest) > 0 {
		t.Errorf("after the refusal the edge sent %q", rest)
	}
}

// TestSmugglingRefused sends requests whose framing RFC 9112 says to
// reject, each followed by a request that would be smuggled if the edge
// read on: the edge answers 400 and closes, and the origin gets nothing.
func TestSmugglingRefused(t *testing.T) {
	const smuggled = "GET /smuggled HTTP/1.1\r\nHost: app.example.com\r\n\r\n"
	for _, tc := range []struct{ name, req string }{
		{"bad chunk size", "POST /first HTTP/1.1\r\nHost: app.example.com\r\nTransfer-Encoding: chunked\r\n\r\n3x\r\nabc\r\n0\r\n\r\n"},
		{"CL and TE", "POST /first HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"},
		{"TE and CL", "POST /first HTTP/1.1\r\nHost: app.example.com\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\n"},
		{"chunk without CRLF", "POST /first HTTP/1.1\r\nHost: app.example.com\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n"},
		{"after OPTIONS *", "OPTIONS * HTTP/1.1\r\nHost: app.example.com\r\n\r\nPOST /first HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"},
		{"folded TE", "POST /first HTTP/1.1\r\nHost: app.example.com\r\nX-A: b\r\n Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e, seen, _ := smugglingEdge(t)
			conn := dialRaw(t, e.HTTPAddr(), 5*time.Second)
			if _, err := io.WriteString(conn, tc.req+smuggled); err != nil {
				t.Fatal(err)
			}
			br := bufio.NewReader(conn)
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatal(err)
			}
			if resp.StatusCode == http.StatusOK && strings.HasPrefix(tc.req, "OPTIONS") {
				// net/http answers OPTIONS * itself.
				resp.Body.Close()
				if resp, err = http.ReadResponse(br, nil); err != nil {
					t.Fatal(err)
				}
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusBadRequest {
				t.Errorf("status %d, want 400", resp.StatusCode)
			}
			wantClosed(t, br)
			if got := seen(); len(got) != 0 {
				t.Errorf("the origin got %v", got)
			}
		})
	}
}

// TestSmugglingMidBody breaks the chunking of a body that is already on
// its way to the origin: the request after it must not reach the origin,
// and the connection ends.
func TestSmugglingMidBody(t *testing.T) {
	e, seen, arrived := smugglingEdge(t)
	conn := dialRaw(t, e.HTTPAddr(), 5*time.Second)
	io.WriteString(conn, "POST /first HTTP/1.1\r\nHost: app.example.com\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
	select {
	case <-arrived:
	case <-time.After(5 * time.Second):
		t.Fatal("the first request did not reach the origin")
	}
	io.WriteString(conn, "zz\r\nGET /smuggled HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
	br := bufio.NewReader(conn)
	if resp, err := http.ReadResponse(br, nil); err == nil {
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			t.Errorf("a request with a broken body got %s", resp.Status)
		}
	}
	wantClosed(t, br)
	if got := seen(); len(got) != 1 || got[0] != "/first" {
		t.Errorf("the origin got %v, want only /first", got)
	}
}

// TestPipelinedFraming keeps well-framed requests, pipelined on one
// connection, working: chunked, with a length, and without a body.
func TestPipelinedFraming(t *testing.T) {
	e, seen, _ := smugglingEdge(t)
	conn := dialRaw(t, e.HTTPAddr(), 5*time.Second)
	io.WriteString(conn, "POST /a HTTP/1.1\r\nHost: app.example.com\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n"+
		"POST /b HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 5\r\n\r\nhello"+
		"OPTIONS * HTTP/1.1\r\nHost: app.example.com\r\n\r\n"+
		"GET /c HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
	br := bufio.NewReader(conn)
	for i := range 4 {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("response %d: %v", i, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("response %d: %s", i, resp.Status)
		}
	}
	if got := strings.Join(seen(), " "); got != "/a /b /c" {
		t.Errorf("the origin got %q, want /a /b /c", got)
	}
}

// TestSmugglingOverTLS: an HTTPS request with both Content-Length and
// Transfer-Encoding is taken as chunked (net/http drops the length, as RFC
// 9112 section 6.1 allows), and the edge closes the connection after the
// answer, so that nothing a front proxy framed by the length runs as a
// request of its own.
func TestSmugglingOverTLS(t *testing.T) {
	ca := newTestCA(t)
	reg := newRegistry(t, nil)
	var mu sync.Mutex
	var paths []string
	_, p := origin(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		paths = append(paths, r.URL.Path)
		mu.Unlock()
		io.Copy(io.Discard, r.Body)
		io.WriteString(w, "origin")
	}))
	register(t, reg, "app.example.com", p, expose.ProtocolHTTP, nil)
	e := startEdge(t, Options{Registry: reg, HTTPSAddr: "127.0.0.1:0", Certificates: []tls.Certificate{ca.leaf(t, "app.example.com")}})

	conn, err := tls.Dial("tcp", e.HTTPSAddr().String(), &tls.Config{RootCAs: ca.pool, ServerName: "app.example.com", NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(conn, "POST /first HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"+
		"GET /smuggled HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if !resp.Close {
		t.Errorf("the answer to a request with both lengths keeps the connection (Connection: %q)", resp.Header.Get("Connection"))
	}
	wantClosed(t, br)
	mu.Lock()
	defer mu.Unlock()
	if len(paths) != 1 || paths[0] != "/first" {
		t.Errorf("the origin got %v, want only /first", paths)
	}
}
