package registry

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/sluice-vpn/sluice/pkg/expose"
)

// controlServer serves r's control API on loopback, where 127.0.0.1 is
// alice's tunnel address and 127.0.0.2 bob's, and returns a client per
// source address.
func controlServer(t *testing.T, r *Registry) (url string, from func(src string) *http.Client) {
	t.Helper()
	owners := map[netip.Addr]Peer{
		netip.MustParseAddr("127.0.0.1"): alice,
		netip.MustParseAddr("127.0.0.2"): bob,
	}
	srv := httptest.NewServer(r.Handler(func(a netip.Addr) (Peer, bool) {
		p, ok := owners[a]
		return p, ok
	}))
	t.Cleanup(srv.Close)
	from = func(src string) *http.Client {
		d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 2 * time.Second}
		tr := &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return d.DialContext(ctx, network, addr)
		}}
		t.Cleanup(tr.CloseIdleConnections)
		return &http.Client{Transport: tr, Timeout: 5 * time.Second}
	}
	return srv.URL + expose.RegistrationsPath, from
}

type answer struct {
	status int
	ctype  string
	lease  expose.Lease
	err    string
	allow  string
}

func call(t *testing.T, c *http.Client, method, url string, body any) answer {
	t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	case []byte:
		rd = bytes.NewReader(b)
	default:
		j, err := json.Marshal(b)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	a := answer{status: resp.StatusCode, ctype: resp.Header.Get("Content-Type"), allow: resp.Header.Get("Allow")}
	raw, _ := io.ReadAll(resp.Body)
	switch {
	case resp.StatusCode == http.StatusNoContent:
		if len(raw) != 0 {
			t.Errorf("%s %s: 204 with a body %q", method, url, raw)
		}
	case resp.StatusCode/100 == 2:
		if err := json.Unmarshal(raw, &a.lease); err != nil {
			t.Errorf("%s %s: lease %q: %v", method, url, raw, err)
		}
	default:
		var eb expose.ErrorBody
		if err := json.Unmarshal(raw, &eb); err != nil || eb.Error == "" {
			t.Errorf("%s %s: status %d, error body %q: %v", method, url, resp.StatusCode, raw, err)
		}
		a.err = eb.Error
	}
	return a
}

func TestControlRegisterRefreshDelete(t *testing.T) {
	r, c := newRegistry(t, Options{Hostnames: map[string]Hostname{"app.example.com": {Peers: []string{"alice", "bob"}}}})
	url, from := controlServer(t, r)
	a, b := from("127.0.0.1"), from("127.0.0.2")

	reg := expose.Registration{Hostname: "app.example.com", Port: 8080, Protocol: "http", Labels: map[string]string{"release": "stable"}}
	got := call(t, a, http.MethodPut, url, reg)
	if got.status != 200 || got.ctype != "application/json" ||
		got.lease != (expose.Lease{ID: "alice/app.example.com/8080", TTLSeconds: 6, RefreshSeconds: 2, Weight: 1}) {
		t.Fatalf("PUT: %+v", got)
	}
	rp, err := r.Pick("app.example.com", "http", nil)
	if err != nil || rp.Addr != netip.MustParseAddrPort("127.0.0.1:8080") || rp.Peer != "alice" || rp.PublicKey != alice.PublicKey ||
		rp.Labels["release"] != "stable" {
		t.Fatalf("registered through the API: %+v, %v", rp, err)
	}

	// A refresh keeps the ID and the registration time, and updates
	// the labels.
	c.Advance(2 * time.Second)
	reg.Labels["release"] = "canary"
	if got := call(t, a, http.MethodPut, url, reg); got.status != 200 || got.lease.ID != "alice/app.example.com/8080" {
		t.Fatalf("refresh: %+v", got)
	}
	rp, _ = r.Pick("app.example.com", "", nil)
	if rp.Labels["release"] != "canary" || !rp.LastSeen.Equal(c.Now()) || !rp.Registered.Equal(c.Now().Add(-2*time.Second)) {
		t.Errorf("after refresh: %+v", rp)
	}

	if got := call(t, b, http.MethodPut, url, reg); got.status != 200 || got.lease.ID != "bob/app.example.com/8080" {
		t.Fatalf("bob's PUT: %+v", got)
	}
	if s := r.Services(); len(s) != 1 || len(s[0].Replicas) != 2 {
		t.Fatalf("two replicas expected: %+v", s)
	}

	// Each peer deletes only its own registration.
	if got := call(t, b, http.MethodDelete, url+"?hostname=app.example.com&port=8080", nil); got.status != 204 {
		t.Fatalf("DELETE: %+v", got)
	}
	s := r.Services()
	if len(s) != 1 || len(s[0].Replicas) != 1 || s[0].Replicas[0].Peer != "alice" {
		t.Fatalf("after bob's DELETE: %+v", s)
	}
	if got := call(t, b, http.MethodDelete, url+"?hostname=app.example.com&port=8080", nil); got.status != 204 {
		t.Errorf("DELETE again: %+v", got)
	}
	if got := call(t, a, http.MethodDelete, url+"?hostname=app.example.com&port=8080", nil); got.status != 204 {
		t.Errorf("alice's DELETE: %+v", got)
	}
	if _, err := r.Pick("app.example.com", "", nil); err == nil {
		t.Error("a replica is left after both DELETEs")
	}
}

func TestControlErrors(t *testing.T) {
	r, _ := newRegistry(t, Options{MaxPerPeer: 1, Hostnames: map[string]Hostname{"only-bob.example.com": {Peers: []string{"bob"}}}})
	url, from := controlServer(t, r)
	a := from("127.0.0.1")
	good := expose.Registration{Hostname: "app.example.com", Port: 80, Protocol: "http"}

	for _, c := range []struct {
		name         string
		client       *http.Client
		method, url  string
		body         any
		status       int
		errSubstring string
	}{
		{"unknown caller", from("127.0.0.3"), http.MethodPut, url, good, 403, "127.0.0.3"},
		{"bad JSON", a, http.MethodPut, url, `{"hostname": `, 400, "JSON"},
		{"wrong type", a, http.MethodPut, url, `{"hostname": "app.example.com", "port": "80"}`, 400, "JSON"},
		{"failed check", a, http.MethodPut, url, expose.Registration{Hostname: "app.example.com", Port: 80, Protocol: "ftp"}, 400, `protocol "ftp"`},
		{"bad hostname", a, http.MethodPut, url, expose.Registration{Hostname: "localhost", Port: 80, Protocol: "http"}, 400, "needs a dot"},
		{"too large", a, http.MethodPut, url, `{"hostname": "` + strings.Repeat("a", 100<<10) + `"}`, 413, "bytes"},
		{"not allowed", a, http.MethodPut, url, expose.Registration{Hostname: "only-bob.example.com", Port: 80, Protocol: "http"}, 403, "bob"},
		{"GET", a, http.MethodGet, url, nil, 405, "GET"},
		{"POST", a, http.MethodPost, url, good, 405, "POST"},
		{"other path", a, http.MethodPut, strings.TrimSuffix(url, expose.RegistrationsPath) + "/v2/x", good, 404, "/v2/x"},
		{"DELETE without port", a, http.MethodDelete, url + "?hostname=app.example.com", nil, 400, "port"},
		{"DELETE bad hostname", a, http.MethodDelete, url + "?hostname=x&port=80", nil, 400, "hostname"},
	} {
		got := call(t, c.client, c.method, c.url, c.body)
		if got.status != c.status || !strings.Contains(got.err, c.errSubstring) || got.ctype != "application/json" {
			t.Errorf("%s: %d %q (%s), want %d with %q", c.name, got.status, got.err, got.ctype, c.status, c.errSubstring)
		}
		if c.status == 405 && got.allow != "PUT, DELETE" {
			t.Errorf("%s: Allow %q", c.name, got.allow)
		}
	}
	if s := r.Services(); len(s) != 1 || len(s[0].Replicas) != 0 {
		t.Fatalf("refused requests registered something: %+v", s)
	}

	if got := call(t, a, http.MethodPut, url, good); got.status != 200 {
		t.Fatalf("PUT: %+v", got)
	}
	over := good
	over.Hostname = "second.example.com"
	if got := call(t, a, http.MethodPut, url, over); got.status != 429 || !strings.Contains(got.err, "MaxPerPeer") {
		t.Errorf("over the limit: %+v", got)
	}
	// Bob may not take alice's hostname: 403 telling how to share it.
	b := from("127.0.0.2")
	got := call(t, b, http.MethodPut, url, good)
	if got.status != 403 || !strings.Contains(got.err, "alice") || !strings.Contains(got.err, "edge.hostnames.app.example.com.peers") {
		t.Errorf("bob on alice's hostname: %+v", got)
	}
	// Once alice withdraws, the name stays hers for a while: 503, which
	// an agent retries, telling how long.
	if got := call(t, a, http.MethodDelete, url+"?hostname=app.example.com&port=80", nil); got.status != 204 {
		t.Fatalf("DELETE: %+v", got)
	}
	if got := call(t, b, http.MethodPut, url, good); got.status != 503 || !strings.Contains(got.err, "alice") || !strings.Contains(got.err, "more") {
		t.Errorf("bob on the hostname alice just left: %+v, want 503 naming alice", got)
	}
	if got := call(t, a, http.MethodPut, url, good); got.status != 200 {
		t.Fatalf("alice back: %+v", got)
	}
	tcp := good
	tcp.Protocol, tcp.Port = "tcp", 22
	r.SetHostnames(map[string]Hostname{"app.example.com": {Peers: []string{"alice", "bob"}}}, false)
	if got := call(t, b, http.MethodPut, url, tcp); got.status != 409 || !strings.Contains(got.err, "http") {
		t.Errorf("tcp beside http: %+v", got)
	}
}

func TestControlMappedCaller(t *testing.T) {
	// The gateway's listener may give a v4 caller as ::ffff:a.b.c.d.
	r, _ := newRegistry(t, Options{})
	var asked netip.Addr
	h := r.Handler(func(a netip.Addr) (Peer, bool) { asked = a; return alice, true })
	body := `{"hostname":"app.example.com","port":80,"protocol":"http"}`
	req := httptest.NewRequest(http.MethodPut, expose.RegistrationsPath, strings.NewReader(body))
	req.RemoteAddr = "[::ffff:100.64.0.9]:40000"
	w := httptest.NewRecorder()
	h.ServeHTTP(w, req)
	if w.Code != 200 || asked != netip.MustParseAddr("100.64.0.9") {
		t.Fatalf("%d %s, peerOf asked for %s", w.Code, w.Body, asked)
	}
	rp, err := r.Pick("app.example.com", "", nil)
	if err != nil || rp.Addr.String() != "100.64.0.9:80" {
		t.Errorf("%+v %v", rp, err)
	}
	req = httptest.NewRequest(http.MethodPut, expose.RegistrationsPath, strings.NewReader(body))
	req.RemoteAddr = "pipe"
	w = httptest.NewRecorder()
	h.ServeHTTP(w, req)
	if w.Code != 403 {
		t.Errorf("caller without an address: %d %s", w.Code, w.Body)
	}
}
