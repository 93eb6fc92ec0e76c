package config

import (
	"crypto/tls"
	"fmt"
	"maps"
	"slices"

	"github.com/sluice-vpn/sluice/nat"
	"github.com/sluice-vpn/sluice/pkg/edge"
	"github.com/sluice-vpn/sluice/pkg/edge/registry"
	"github.com/sluice-vpn/sluice/pkg/gateway"
	"github.com/sluice-vpn/sluice/pkg/service"
)

// GatewayOptions are the gateway's options from c: everything but the
// packet source, the tunnel addresses and DNS, which the service or the
// TUN mode set.
func (c *Config) GatewayOptions() gateway.Options {
	r := c.Reloadable()
	return gateway.Options{
		MTU:               c.MTU,
		Egress:            c.Egress.Options(),
		UDPFiltering:      c.Egress.UDPFiltering,
		Policy:            r.Policy,
		Limits:            r.Limits,
		Table:             c.Table.Options(),
		MaxInFlight:       c.TCP.MaxInFlight,
		CongestionControl: c.TCP.CongestionControl,
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
	r := service.Reloadable{Policy: p, Limits: lo}
	if c.Edge.Enabled() {
		hosts, policies := c.edgeHostnames()
		r.Edge = &service.EdgeReload{Hostnames: hosts, OnlyListed: c.Edge.OnlyListed, Policies: policies}
	}
	return r
}

// natLimits maps the file's "zero is no limit" onto nat's, where zero
// means the default and a negative value no limit.
func natLimits(l Limits) nat.Limits {
	n := nat.Limits{NewFlowsPerSecond: l.NewFlowsPerSecond, Burst: l.Burst, MaxFlows: l.MaxFlows, MaxHandshakes: l.MaxHandshakes}
	if n.NewFlowsPerSecond == 0 {
		n.NewFlowsPerSecond = -1
	}
	if n.MaxFlows == 0 {
		n.MaxFlows = -1
	}
	if n.MaxHandshakes == 0 {
		n.MaxHandshakes = -1
	}
	return n
}

// EdgeOptions are the service's edge options from c, with the
// certificates read from their files; nil when no edge listener is
// configured. Errors name the field.
func (c *Config) EdgeOptions() (*service.EdgeOptions, error) {
	e := c.Edge
	if !e.Enabled() {
		return nil, nil
	}
	hosts, policies := c.edgeHostnames()
	o := &service.EdgeOptions{
		Registry: registry.Options{Hostnames: hosts, OnlyListed: e.OnlyListed, Lease: e.Lease},
		Edge: edge.Options{
			HTTPAddr:    listenOff(e.HTTP),
			HTTPSAddr:   listenOff(e.HTTPS),
			Hostnames:   policies,
			DialTimeout: e.DialTimeout,
		},
	}
	for _, r := range e.TCP {
		o.Edge.TCP = append(o.Edge.TCP, edge.TCPRoute{Addr: r.Listen.String(), Hostname: r.Hostname})
	}
	for i, cert := range e.Certificates {
		pair, err := tls.LoadX509KeyPair(cert.Cert, cert.Key)
		if err != nil {
			return nil, &FieldError{Field: fmt.Sprintf("edge.certificates[%d]", i), Msg: err.Error()}
		}
		o.Edge.Certificates = append(o.Edge.Certificates, pair)
	}
	return o, nil
}

// edgeHostnames splits the hostnames' settings between the registry
// (who serves, and in which shares) and the edge (who may ask).
func (c *Config) edgeHostnames() (map[string]registry.Hostname, map[string]edge.Policy) {
	hosts := make(map[string]registry.Hostname, len(c.Edge.Hostnames))
	policies := make(map[string]edge.Policy, len(c.Edge.Hostnames))
	for name, h := range c.Edge.Hostnames {
		rh := registry.Hostname{Peers: slices.Clone(h.Peers)}
		for _, w := range h.Weights {
			rh.Weights = append(rh.Weights, registry.Weight{Labels: maps.Clone(w.Labels), Weight: w.Weight})
		}
		hosts[name] = rh
		policies[name] = edge.Policy{
			RatePerClient:  h.Rate.PerClient,
			BurstPerClient: h.Rate.PerClientBurst,
			RateTotal:      h.Rate.Total,
			BurstTotal:     h.Rate.TotalBurst,
			Allow:          slices.Clone(h.Allow),
			Deny:           slices.Clone(h.Deny),
			Paths:          slices.Clone(h.Paths),
			BearerTokens:   slices.Clone(h.Auth.Bearer),
			BasicUsers:     maps.Clone(h.Auth.Basic),
			ProxyProtocol:  h.ProxyProtocol,
		}
	}
	return hosts, policies
}

func listenOff(l ListenAddr) string {
	if l.Port == 0 {
		return ""
	}
	return l.String()
}
