package config

import (
	"github.com/sluice-vpn/sluice/nat"
	"github.com/sluice-vpn/sluice/pkg/gateway"
	"github.com/sluice-vpn/sluice/pkg/service"
)

// GatewayOptions are the gateway's options from c: everything but the
// packet source, the tunnel addresses and DNS, which the service or the
// TUN mode set.
func (c *Config) GatewayOptions() gateway.Options {
	r := c.Reloadable()
	return gateway.Options{
		MTU:          c.MTU,
		Egress:       c.Egress.Options(),
		UDPFiltering: c.Egress.UDPFiltering,
		Policy:       r.Policy,
		Limits:       r.Limits,
		Table:        c.Table.Options(),
		MaxInFlight:  c.TCP.MaxInFlight,
	}
}

// ServiceOptions are the options of a WireGuard gateway on a state
// directory, from c. Logger, Reload and ConfigYAML are the caller's.
func (c *Config) ServiceOptions() service.Options {
	o := service.Options{
		StateDir:      c.State,
		ListenPort:    int(c.Listen.Port),
		ListenAddr:    c.Listen.Addr,
		Endpoint:      c.Endpoint,
		Pools:         c.Pools,
		DNSUpstreams:  c.DNS.Upstreams,
		Gateway:       c.GatewayOptions(),
		AdminInsecure: c.Admin.Insecure,
		ShutdownGrace: c.Shutdown.Grace,
	}
	if c.Admin.Listen.IsValid() {
		o.Admin = c.Admin.Listen.String()
	}
	return o
}

// Reloadable is what a reload of c changes in a running gateway: the
// policy, global and per peer, and the per-peer limits.
func (c *Config) Reloadable() service.Reloadable {
	p := c.Policy.Options()
	lo := nat.LimiterOptions{Default: natLimits(c.Policy.Limits)}
	for name, pp := range c.Policy.Peers {
		if len(pp.Allow) > 0 || len(pp.Deny) > 0 {
			if p.Peers == nil {
				p.Peers = map[string]nat.PeerRules{}
			}
			p.Peers[name] = nat.PeerRules{Allow: pp.Allow, Deny: pp.Deny}
		}
		if pp.Limits != nil {
			if lo.Peers == nil {
				lo.Peers = map[string]nat.Limits{}
			}
			lo.Peers[name] = natLimits(*pp.Limits)
		}
	}
	return service.Reloadable{Policy: p, Limits: lo}
}

// natLimits maps the file's "zero is no limit" onto nat's, where zero
// means the default and a negative value no limit.
func natLimits(l Limits) nat.Limits {
	n := nat.Limits{NewFlowsPerSecond: l.NewFlowsPerSecond, Burst: l.Burst, MaxFlows: l.MaxFlows}
	if n.NewFlowsPerSecond == 0 {
		n.NewFlowsPerSecond = -1
	}
	if n.MaxFlows == 0 {
		n.MaxFlows = -1
	}
	return n
}
