package config

import (
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
)

func TestEdgeExample(t *testing.T) {
	c, err := Load(examplePath)
	if err != nil {
		t.Fatal(err)
	}
	e := c.Edge
	if e.HTTP.Port != 8080 || e.HTTPS.Port != 8443 || !e.Enabled() {
		t.Errorf("listeners: %+v %+v", e.HTTP, e.HTTPS)
	}
	if len(e.TCP) != 1 || e.TCP[0].Listen.Port != 2222 || e.TCP[0].Hostname != "ssh.example.com" {
		t.Errorf("tcp: %+v", e.TCP)
	}
	h, ok := e.Hostnames["app.example.com"]
	if !ok {
		t.Fatalf("hostnames: %+v", e.Hostnames)
	}
	want := []LabelWeight{
		{Labels: map[string]string{"release": "stable"}, Weight: 90},
		{Labels: map[string]string{"release": "canary"}, Weight: 10},
	}
	if !reflect.DeepEqual(h.Weights, want) {
		t.Errorf("weights, in the file's order: %+v", h.Weights)
	}
	if h.Rate != (EdgeRate{PerClient: 20, PerClientBurst: 40, Total: 1000, TotalBurst: 2000}) {
		t.Errorf("rate: %+v", h.Rate)
	}
	if !slices.Equal(h.Deny, []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}) || len(h.Allow) != 2 {
		t.Errorf("allow %v, deny %v", h.Allow, h.Deny)
	}
	if len(h.Auth.Bearer) != 1 || !strings.HasPrefix(h.Auth.Basic["alice"], "sha256:") {
		t.Errorf("auth: %+v", h.Auth)
	}
}

func TestEdgeErrors(t *testing.T) {
	_, err := Parse([]byte(`edge:
  https: ":8443"
  tcp: ["9000=db.example.com", "9000=db2.example.com", "8080=App.example.com"]
  http: ":9000"
  hostnames:
    bad_host:
    app.example.com:
      weights:
        "release": 5
        "release=canary": -1
      paths: [api]
      auth:
        bearer: ["plaintext-token"]
        basic:
          bob: "hunter2"
`))
	if err == nil {
		t.Fatal("Parse accepted a bad edge section")
	}
	want := []string{
		`line 3: edge.tcp[2]: hostname "App.example.com": 'A' is not allowed (lower-case letters, digits, '-' and '.')`,
		`line 3: edge.tcp[0]: :9000 is already edge.http`,
		`line 3: edge.tcp[1]: :9000 is already edge.http`,
		`line 2: edge.https: needs edge.certificates (--edge-cert and --edge-key)`,
	}
	got := err.Error()
	for _, w := range want {
		if !strings.Contains(got, w) {
			t.Errorf("missing %q in\n%s", w, got)
		}
	}
	for _, field := range []string{
		"edge.hostnames.bad_host", `edge.hostnames.app.example.com.weights.release: "release" is not KEY=VALUE`,
		"edge.hostnames.app.example.com.weights.release=canary: -1 is negative",
		`edge.hostnames.app.example.com.paths[0]: "api" does not start with /`,
		"edge.hostnames.app.example.com.auth.bearer[0]: not a hash",
		"edge.hostnames.app.example.com.auth.basic.bob: not a hash",
	} {
		if !strings.Contains(got, field) {
			t.Errorf("no error for %s in\n%s", field, got)
		}
	}

	// A TCP route has no paths or credentials to check; a bcrypt prefix
	// is not a bcrypt hash.
	_, err = Parse([]byte(`edge:
  tcp: ["5432=db.example.com"]
  hostnames:
    db.example.com:
      paths: [/x]
      auth:
        basic:
          bob: "$2a$garbage"
`))
	for _, w := range []string{
		"edge.hostnames.db.example.com.paths: db.example.com is routed by edge.tcp",
		"edge.hostnames.db.example.com.auth: db.example.com is routed by edge.tcp",
		"edge.hostnames.db.example.com.auth.basic.bob: bad bcrypt hash",
	} {
		if err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("missing %q in\n%v", w, err)
		}
	}

	// The edge serves WireGuard peers; TUN mode has none.
	c := Default()
	c.TUN.Name = "sluice0"
	c.Edge.HTTP = ListenAddr{Port: 80}
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "edge: the edge serves services that WireGuard peers publish") {
		t.Errorf("edge in TUN mode: %v", err)
	}
}

func TestParseTCPRoute(t *testing.T) {
	r, err := ParseTCPRoute("127.0.0.1:2222=ssh.example.com")
	if err != nil || r.Listen.Port != 2222 || r.Listen.Addr != netip.MustParseAddr("127.0.0.1") || r.Hostname != "ssh.example.com" {
		t.Fatalf("%+v, %v", r, err)
	}
	if back, err := ParseTCPRoute(r.String()); err != nil || back != r {
		t.Fatalf("round trip %q: %+v, %v", r.String(), back, err)
	}
	for _, bad := range []string{"2222", "x=ssh.example.com", "2222=", "0=a.example"} {
		if _, err := ParseTCPRoute(bad); err == nil {
			t.Errorf("ParseTCPRoute(%q) succeeded", bad)
		}
	}
}
