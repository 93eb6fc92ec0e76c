package edge

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/sluice-vpn/sluice/pkg/expose"
)

func TestCertificateBySNI(t *testing.T) {
	ca := newTestCA(t)
	certs := []tls.Certificate{
		ca.leaf(t, "default.example.com"),
		ca.leaf(t, "a.example.com", "b.example.com"),
		ca.leaf(t, "*.wild.example.com"),
		ca.leaf(t, "a.example.com"), // a later duplicate: the first one wins
	}
	set, err := newCertSet(certs)
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]int{
		"a.example.com":        1,
		"B.Example.com.":       1,
		"x.wild.example.com":   2,
		"wild.example.com":     0, // a wildcard covers one label, not the parent itself
		"y.x.wild.example.com": 0, // nor two labels
		"other.example.net":    0,
		"":                     0,
	} {
		if got := set.choose(name); got != &certs[want] {
			t.Errorf("choose(%q): not certificate %d", name, want)
		}
	}

	for _, bad := range [][]tls.Certificate{nil, {{}}, {{Certificate: [][]byte{[]byte("junk")}, PrivateKey: certs[0].PrivateKey}}} {
		if _, err := newCertSet(bad); err == nil || !strings.Contains(err.Error(), "Options.Certificates") {
			t.Errorf("bad certificates: err = %v", err)
		}
	}
}

func TestHTTPS(t *testing.T) {
	ca := newTestCA(t)
	reg := newRegistry(t, nil)
	_, p := origin(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, r.Host+" "+r.Header.Get("X-Forwarded-Proto")+" "+r.Header.Get("Forwarded")+" "+r.Proto)
	}))
	register(t, reg, "a.example.com", p, expose.ProtocolHTTP, nil)
	register(t, reg, "b.example.com", p, expose.ProtocolHTTP, nil)
	register(t, reg, "x.wild.example.com", p, expose.ProtocolHTTP, nil)
	e := startEdge(t, Options{Registry: reg, HTTPSAddr: "127.0.0.1:0", Certificates: []tls.Certificate{
		ca.leaf(t, "default.example.com"),
		ca.leaf(t, "a.example.com"),
		ca.leaf(t, "*.wild.example.com", "b.example.com"),
	}})
	addr := e.HTTPSAddr().String()
	client := func(h2 bool) *http.Client {
		return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "tcp", addr)
			},
			TLSClientConfig:   &tls.Config{RootCAs: ca.pool},
			ForceAttemptHTTP2: h2,
		}}
	}

	// The certificate verifies for each name, so the edge chose the
	// right one.
	for _, host := range []string{"a.example.com", "b.example.com", "x.wild.example.com"} {
		resp, body := get(t, client(false), "https://"+host+"/")
		if resp.StatusCode != 200 || body != host+" https for=127.0.0.1;host="+host+";proto=https HTTP/1.1" {
			t.Errorf("%s: %d %q", host, resp.StatusCode, body)
		}
	}
	resp, body := get(t, client(true), "https://a.example.com/")
	if resp.StatusCode != 200 || resp.ProtoMajor != 2 || !strings.HasSuffix(body, "HTTP/1.1") {
		t.Errorf("over HTTP/2: %d %s %q, want HTTP/2 to the client and HTTP/1.1 to the origin", resp.StatusCode, resp.Proto, body)
	}

	// A request for another hostname than its connection's is sent
	// back.
	req, _ := http.NewRequest("GET", "https://a.example.com/", nil)
	req.Host = "b.example.com"
	resp, body = fetch(t, client(false), req)
	if resp.StatusCode != http.StatusMisdirectedRequest {
		t.Errorf("Host b on a connection for a: %d %q, want 421", resp.StatusCode, body)
	}
	mustMetric(t, e, "sluice_edge_refused_total", map[string]string{"hostname": "b.example.com", "reason": "misdirected"}, 1)

	// Names without a certificate of their own get the first.
	conn, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: ca.pool, ServerName: "unknown.example.org", InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	if cn := conn.ConnectionState().PeerCertificates[0].Subject.CommonName; cn != "default.example.com" {
		t.Errorf("for an unknown name the edge showed %q", cn)
	}
	conn.Close()
}
