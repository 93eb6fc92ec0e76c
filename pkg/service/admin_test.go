package service

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"

	"github.com/sluice-vpn/sluice/pkg/admin"
)

// readToken reads the admin token of a service made with Options.Admin.
func readToken(t testing.TB, svc *Service) string {
	t.Helper()
	tok, err := admin.ReadTokenFile(svc.TokenPath())
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func getWithToken(url, token string) (*http.Response, error) {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	return http.DefaultClient.Do(req)
}

// TestAdminTCPNeedsToken drives the loopback admin listener as a web page
// and as another local user would, and as the operator does.
func TestAdminTCPNeedsToken(t *testing.T) {
	r := startRunning(t, nil)
	tok := readToken(t, r.svc)
	if fi, err := os.Stat(r.svc.TokenPath()); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("token file: %v %v", fi, err)
	}
	do := func(method, path, body string, hdr map[string]string) (int, string) {
		t.Helper()
		req, err := http.NewRequest(method, r.tcpURL+path, strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		for k, v := range hdr {
			if k == "Host" {
				req.Host = v
				continue
			}
			req.Header.Set(k, v)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	attacker := `{"name":"evil","public_key":"` + strings.Repeat("A", 43) + `="}`
	bearer := "Bearer " + tok

	// The drive-by page: a simple cross-origin POST, which the browser
	// sends without asking first; even with the token (it has none).
	for _, hdr := range []map[string]string{
		{"Origin": "http://evil.example", "Content-Type": "text/plain"},
		{"Origin": "http://evil.example", "Content-Type": "text/plain", "Authorization": bearer},
		{"Sec-Fetch-Site": "cross-site", "Content-Type": "application/json", "Authorization": bearer},
		// DNS rebinding: the page's own name, resolving to loopback.
		{"Host": "evil.example:9090", "Content-Type": "application/json", "Authorization": bearer},
	} {
		if code, body := do("POST", "/v1/peers", attacker, hdr); code != http.StatusForbidden {
			t.Errorf("POST with %v: %d %s, want 403", hdr, code, body)
		}
	}
	if code, _ := do("POST", "/v1/peers", attacker, map[string]string{"Content-Type": "text/plain", "Authorization": bearer}); code != http.StatusUnsupportedMediaType {
		t.Errorf("POST as text/plain: %d, want 415", code)
	}
	for _, hdr := range []map[string]string{
		{"Content-Type": "application/json"},
		{"Content-Type": "application/json", "Authorization": "Bearer " + strings.Repeat("x", len(tok))},
	} {
		if code, _ := do("POST", "/v1/peers", attacker, hdr); code != http.StatusUnauthorized {
			t.Errorf("POST with %v: %d, want 401", hdr, code)
		}
	}
	for _, path := range []string{"/v1/status", "/metrics", "/v1/peers", "/debug/pprof/"} {
		if code, _ := do("GET", path, "", nil); code != http.StatusUnauthorized {
			t.Errorf("GET %s without token: %d, want 401", path, code)
		}
	}
	peers, err := r.unix.Peers(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range peers {
		if p.Name == "evil" {
			t.Fatal("a refused request added a peer")
		}
	}

	// The operator, with the token.
	if code, body := do("GET", "/v1/status", "", map[string]string{"Authorization": bearer}); code != http.StatusOK {
		t.Errorf("GET /v1/status with token: %d %s", code, body)
	}
	if code, body := do("GET", "/metrics", "", map[string]string{"Authorization": bearer}); code != http.StatusOK {
		t.Errorf("GET /metrics with token: %d %.100s", code, body)
	}
	if _, err := r.tcp.Status(context.Background()); err != nil {
		t.Errorf("the client with the token: %v", err)
	}
	if _, err := admin.NewTCPClient(strings.TrimPrefix(r.tcpURL, "http://"), "").Status(context.Background()); !errors.Is(err, admin.ErrUnauthorized) {
		t.Errorf("the client without the token: %v, want ErrUnauthorized", err)
	}
	// DELETE and reload carry no body; the client marks them JSON.
	if err := r.tcp.DeleteFlow(context.Background(), 1<<60); !errors.Is(err, admin.ErrNotFound) {
		t.Errorf("delete of no flow: %v, want ErrNotFound", err)
	}
	if code, _ := do("DELETE", "/v1/flows/1", "", map[string]string{"Authorization": bearer}); code != http.StatusUnsupportedMediaType {
		t.Errorf("DELETE without a content type: %d, want 415", code)
	}
}

// TestAdminTokenKept keeps the token across restarts.
func TestAdminTokenKept(t *testing.T) {
	dir := t.TempDir()
	opts := testOptions(t, dir)
	opts.Admin = freeTCPAddr(t)
	svc, err := New(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	first := readToken(t, svc)
	svc.Close()
	if svc, err = New(context.Background(), opts); err != nil {
		t.Fatal(err)
	}
	defer svc.Close()
	if again := readToken(t, svc); again != first {
		t.Errorf("the token changed across restarts: %q, then %q", first, again)
	}
}

// TestControlSocketRefusesPages refuses a browser's request on the
// socket too, which needs no token.
func TestControlSocketRefusesPages(t *testing.T) {
	r := startRunning(t, nil)
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", r.dir+"/"+SocketName)
	}}
	c := &http.Client{Transport: tr}
	for _, tc := range []struct {
		host, origin string
		want         int
	}{
		{"sluice", "", http.StatusOK},
		{"localhost", "", http.StatusOK},
		{"sluice", "http://evil.example", http.StatusForbidden},
		{"evil.example", "", http.StatusForbidden},
	} {
		req, _ := http.NewRequest("GET", "http://"+tc.host+"/v1/status", nil)
		if tc.origin != "" {
			req.Header.Set("Origin", tc.origin)
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Errorf("Host %s, Origin %q: %d, want %d", tc.host, tc.origin, resp.StatusCode, tc.want)
		}
	}
}
