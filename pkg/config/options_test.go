package config

import (
	"net/netip"
	"testing"
	"time"
)

// TestExampleOptions checks that the example file reaches the service and
// gateway options, the per-peer rules and limits included.
func TestExampleOptions(t *testing.T) {
	c, err := Load("../../testdata/config/sluice.yaml")
	if err != nil {
		t.Fatal(err)
	}
	o := c.ServiceOptions()
	if o.ListenPort != int(c.Listen.Port) || o.StateDir != c.State || o.Endpoint != c.Endpoint || o.ShutdownGrace != c.Shutdown.Grace {
		t.Errorf("service options %+v", o)
	}
	if o.Gateway.Egress.Ports != c.Egress.Ports || o.Gateway.Egress.Shard != c.Egress.Shard || o.Gateway.MTU != c.MTU {
		t.Errorf("egress options %+v", o.Gateway.Egress)
	}
	r := c.Reloadable()
	if len(r.Policy.Allow) != len(c.Policy.Allow) || len(r.Policy.Peers) == 0 {
		t.Errorf("policy %+v", r.Policy)
	}
	if r.Limits.Default.MaxFlows != c.Policy.Limits.MaxFlows || r.Limits.Default.MaxHandshakes != 64 ||
		r.Limits.Peers["laptop"].MaxHandshakes != 16 || len(r.Limits.Peers) == 0 {
		t.Errorf("limits %+v", r.Limits)
	}
}

// TestZeroLimitsMeanUnlimited maps the file's "0 is no limit" onto nat's
// negative values.
func TestZeroLimitsMeanUnlimited(t *testing.T) {
	c := Default()
	c.Policy.Limits = Limits{}
	l := c.Reloadable().Limits.Default
	if l.NewFlowsPerSecond >= 0 || l.MaxFlows >= 0 || l.MaxHandshakes >= 0 {
		t.Fatalf("zero limits became %+v", l)
	}
	c.Admin.Listen = netip.MustParseAddrPort("127.0.0.1:9090")
	c.Shutdown.Grace = time.Second
	if o := c.ServiceOptions(); o.Admin != "127.0.0.1:9090" {
		t.Fatalf("admin %q", o.Admin)
	}
}
