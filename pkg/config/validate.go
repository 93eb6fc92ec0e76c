package config

import (
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/sluice-vpn/sluice/nat"
	"github.com/sluice-vpn/sluice/netstack"
	"github.com/sluice-vpn/sluice/pkg/state"
)

// Validate checks c and returns every problem as Errors, each naming its
// field by its YAML path, or nil. Parse runs it; a Config built or changed
// in code should be validated before use.
func (c *Config) Validate() error {
	var p problems

	if c.Listen.Port == 0 {
		p.add("listen", "%s: port 0 is not a port", c.Listen)
	}
	if c.Endpoint != "" {
		if err := checkEndpoint(c.Endpoint); err != nil {
			p.add("endpoint", "%v", err)
		}
	}
	if c.MTU < 1280 || c.MTU > 65535 {
		p.add("mtu", "%d is outside 1280-65535", c.MTU)
	}
	c.validateTUN(&p)

	if err := c.Pools.Validate(); err != nil {
		var fe *state.FieldError
		if errors.As(err, &fe) {
			p.add(fe.Field, "%s", fe.Msg)
		} else {
			p.add("pools", "%v", err)
		}
	}

	for i, up := range c.DNS.Upstreams {
		f := fmt.Sprintf("dns.upstreams[%d]", i)
		switch {
		case !up.Addr().IsValid():
			p.add(f, "not an address")
		case up.Port() == 0:
			p.add(f, "%s: port 0 is not a port", up)
		}
	}

	c.Egress.validate(&p)
	c.Policy.validate(&p)

	if c.Table.MaxFlows < 1 {
		p.add("table.max_flows", "%d is below 1", c.Table.MaxFlows)
	}
	to := c.Table.Timeouts
	for _, t := range []struct {
		key string
		d   time.Duration
	}{
		{"tcp_new", to.TCPNew},
		{"tcp_established", to.TCPEstablished},
		{"tcp_closing", to.TCPClosing},
		{"udp_unreplied", to.UDPUnreplied},
		{"udp_assured", to.UDPAssured},
		{"icmp", to.ICMP},
	} {
		if t.d <= 0 {
			p.add("table.timeouts."+t.key, "%s is not above zero", formatDuration(t.d))
		}
	}

	switch c.TCP.CongestionControl {
	case netstack.CongestionBBR, netstack.CongestionCubic, netstack.CongestionReno:
	default:
		p.add("tcp.congestion_control", "%q is not one of %s, %s, %s", c.TCP.CongestionControl, netstack.CongestionBBR, netstack.CongestionCubic, netstack.CongestionReno)
	}
	if c.TCP.MaxInFlight < 1 {
		p.add("tcp.max_in_flight", "%d is below 1", c.TCP.MaxInFlight)
	}

	if a := c.Admin.Listen; a != (netip.AddrPort{}) {
		switch {
		case !a.Addr().IsValid():
			p.add("admin.listen", "not an address")
		case a.Port() == 0:
			p.add("admin.listen", "%s: port 0 is not a port", a)
		case !a.Addr().Unmap().IsLoopback() && !c.Admin.Insecure:
			p.add("admin.listen", "%s is not a loopback address (set admin.insecure to allow it)", a)
		}
	}

	if !slices.Contains(levels, c.Log.Level) {
		p.add("log.level", "%q is not debug, info, warn or error", c.Log.Level.String())
	}
	if c.Shutdown.Grace < 0 {
		p.add("shutdown.grace", "%s is negative", c.Shutdown.Grace)
	}
	c.Edge.validate(&p, c.TUN.Enabled())
	return p.err()
}

func checkEndpoint(s string) error {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return fmt.Errorf("%q is not HOST:PORT", s)
	}
	if host == "" {
		return fmt.Errorf("%q has no host", s)
	}
	if _, err := parsePort(port); err != nil {
		return fmt.Errorf("%q: %w", s, err)
	}
	return nil
}

// maxIfName is the longest Linux interface name (IFNAMSIZ less the NUL).
const maxIfName = 15

func (c *Config) validateTUN(p *problems) {
	t := c.TUN
	if t.Name != "" && t.FD >= 0 {
		p.add("tun", "name %q and fd %d are both set; give one packet source", t.Name, t.FD)
	}
	if t.FD < -1 {
		p.add("tun.fd", "%d is negative (-1 means none)", t.FD)
	}
	if len(t.Name) > maxIfName {
		p.add("tun.name", "%q is longer than %d bytes", t.Name, maxIfName)
	}
	if strings.ContainsAny(t.Name, "/ \t\n\x00:") {
		p.add("tun.name", "%q is not an interface name", t.Name)
	}
}

func (e *Egress) validate(p *problems) {
	var have4, have6 bool
	for i, a := range e.Addrs {
		f := fmt.Sprintf("egress.addrs[%d]", i)
		a = a.Unmap()
		switch {
		case !a.IsValid():
			p.add(f, "not an address")
		case a.Zone() != "":
			p.add(f, "%s: zoned addresses are not supported", a)
		case a.IsUnspecified() || a.IsMulticast():
			p.add(f, "%s is not a unicast address", a)
		case a.Is4() && have4, a.Is6() && have6:
			p.add(f, "%s is a second address of its family (at most one per family)", a)
		}
		have4 = have4 || a.Is4()
		have6 = have6 || a.Is6()
	}

	portsOK := false
	switch r := e.Ports; {
	case r.IsZero():
		p.add("egress.ports", "missing")
	case r.Lo == 0:
		p.add("egress.ports", "%s: port 0 is not a port", formatPorts(r))
	case r.Lo > r.Hi:
		p.add("egress.ports", "%d-%d: %d is above %d", r.Lo, r.Hi, r.Lo, r.Hi)
	default:
		portsOK = true
	}

	sh := fmt.Sprintf("%d/%d", e.Shard, e.Shards)
	switch {
	case e.Shards < 1:
		p.add("egress.shard", "%s: the count must be at least 1", sh)
	case e.Shard < 0:
		p.add("egress.shard", "%s: the index is negative", sh)
	case e.Shard >= e.Shards:
		p.add("egress.shard", "%s: index must be below the count", sh)
	case portsOK && e.Ports.Len() < e.Shards:
		p.add("egress.shard", "%s: more shards than the %d ports of egress.ports %s", sh, e.Ports.Len(), formatPorts(e.Ports))
	}

	if e.DialTimeout <= 0 {
		p.add("egress.dial_timeout", "%s is not above zero", formatDuration(e.DialTimeout))
	}
	if e.KeepAlive < 0 {
		p.add("egress.keepalive", "%s is negative (0s turns the probes off)", formatDuration(e.KeepAlive))
	}
	if _, ok := filterings[e.UDPFiltering.String()]; !ok {
		p.add("egress.udp_filtering", "%s is neither %s nor %s", e.UDPFiltering, nat.FilterAddressPortDependent, nat.FilterEndpointIndependent)
	}
}

func (pol *Policy) validate(p *problems) {
	validateRules(p, "policy.allow", pol.Allow)
	validateRules(p, "policy.deny", pol.Deny)
	pol.Limits.validate(p, "policy.limits")
	names := make([]string, 0, len(pol.Peers))
	for name := range pol.Peers {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		pp := pol.Peers[name]
		f := "policy.peers." + name
		if err := checkPeerName(name); err != nil {
			p.add(f, "%v", err)
		}
		validateRules(p, f+".allow", pp.Allow)
		validateRules(p, f+".deny", pp.Deny)
		if pp.Limits != nil {
			pp.Limits.validate(p, f+".limits")
		}
	}
}

// validateRules checks rules built in code the way nat will: a rule is
// valid when its text form reads back to the same rule.
func validateRules(p *problems, field string, rules []nat.Rule) {
	for i, r := range rules {
		f := field + "[" + strconv.Itoa(i) + "]"
		if !r.Prefix.IsValid() {
			p.add(f, "no address prefix")
			continue
		}
		back, err := parseRule(r.String())
		switch {
		case err != nil:
			p.add(f, "%v", err)
		case back != r:
			p.add(f, "%s is not in normal form (host bits set or a mapped address?); write %s", r, back)
		}
	}
}

func (l *Limits) validate(p *problems, field string) {
	rate := l.NewFlowsPerSecond
	switch {
	case math.IsNaN(rate) || math.IsInf(rate, 0):
		p.add(field+".new_flows_per_second", "%v is not a number", rate)
	case rate < 0:
		p.add(field+".new_flows_per_second", "%v is negative", rate)
	}
	switch {
	case l.Burst < 0:
		p.add(field+".burst", "%d is negative", l.Burst)
	case l.Burst == 0 && rate > 0:
		p.add(field+".burst", "0 lets no flow through while new_flows_per_second is %v; give at least 1", rate)
	}
	if l.MaxFlows < 0 {
		p.add(field+".max_flows", "%d is negative", l.MaxFlows)
	}
	if l.MaxHandshakes < 0 {
		p.add(field+".max_handshakes", "%d is negative", l.MaxHandshakes)
	}
}

// checkPeerName enforces the state's rule for peer names, so that a name
// that can never match a peer is caught here.
func checkPeerName(name string) error {
	if name == "" || len(name) > 64 {
		return fmt.Errorf("a peer name is 1-64 bytes long, %q is %d", name, len(name))
	}
	for _, c := range []byte(name) {
		ok := 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-'
		if !ok {
			return fmt.Errorf("%q has characters other than A-Z a-z 0-9 . _ - that a peer name may have", name)
		}
	}
	return nil
}
