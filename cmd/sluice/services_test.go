package main

import (
	"bytes"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/sluice-vpn/sluice/pkg/admin"
	"github.com/sluice-vpn/sluice/pkg/edge/registry"
)

func TestPrintServices(t *testing.T) {
	now := time.Date(2026, 12, 5, 9, 0, 0, 0, time.UTC)
	svcs := []admin.ServiceInfo{
		{Hostname: "app.example.com", Protocol: "http", Replicas: []registry.Replica{
			{Peer: "stable", Addr: netip.MustParseAddrPort("100.96.0.2:4000"), Protocol: "http",
				Labels: map[string]string{"release": "stable", "zone": "eu"}, Weight: 90, Healthy: true, LastSeen: now.Add(-1500 * time.Millisecond)},
			{Peer: "canary", Addr: netip.MustParseAddrPort("100.96.0.3:4000"), Protocol: "http",
				Weight: 0, OriginDown: true, LastError: "an older failure", LastSeen: now},
			{Peer: "old", Addr: netip.MustParseAddrPort("100.96.0.4:4000"), Protocol: "http",
				LastError: "connection refused", LastSeen: now},
		}},
		{Hostname: "db.example.com", HeldBy: "dbpeer", HeldUntil: now.Add(12 * time.Second), Replicas: []registry.Replica{}},
		{Hostname: "new.example.com", Replicas: []registry.Replica{}},
	}
	var b bytes.Buffer
	printServices(&b, svcs, now)
	out := b.String()
	for _, want := range []string{
		"release=stable,zone=eu  90      healthy",
		"1.5s ago",
		"unhealthy: the agent cannot reach its origin",
		"unhealthy: connection refused",
		"db.example.com   -         dbpeer",
		"no replica; held for 12s",
		"new.example.com  -         -",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "an older failure") {
		t.Errorf("an origin reported down shows the edge's older error instead:\n%s", out)
	}

	b.Reset()
	printServices(&b, nil, now)
	if !strings.HasPrefix(b.String(), "no services") {
		t.Errorf("no services: %q", b.String())
	}
}
