package config

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zapcore"
	"gopkg.in/yaml.v3"

	"github.com/sluice-vpn/sluice/nat"
	"github.com/sluice-vpn/sluice/pkg/state"
)

const examplePath = "../../testdata/config/sluice.yaml"

func TestDefaultValidates(t *testing.T) {
	if err := Default().Validate(); err != nil {
		t.Fatalf("Default().Validate() = %v", err)
	}
}

// TestDefaults checks every default against what the schema's comments
// say, and against the packages the values go to.
func TestDefaults(t *testing.T) {
	c := Default()
	check := func(name string, got, want any) {
		t.Helper()
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
	check("listen", c.Listen.String(), ":51820")
	check("listen addr valid", c.Listen.Addr.IsValid(), false)
	check("state", c.State, "")
	check("endpoint", c.Endpoint, "")
	check("mtu", c.MTU, 1420)
	check("tun", c.TUN, TUN{Name: "", FD: -1})
	check("tun enabled", c.TUN.Enabled(), false)
	check("pools.v4", c.Pools.V4, netip.MustParsePrefix("100.96.0.0/12"))
	check("pools.v6", c.Pools.V6, netip.MustParsePrefix("fd5c:1ce::/64"))
	check("pools are the state's", c.Pools, state.DefaultPools)
	check("dns.upstreams", len(c.DNS.Upstreams), 0)
	check("egress.addrs", len(c.Egress.Addrs), 0)
	check("egress.ports", c.Egress.Ports, nat.PortRange{Lo: 32768, Hi: 60999})
	check("egress.ports are nat's", c.Egress.Ports, nat.DefaultEgressPorts)
	check("egress.shard", [2]int{c.Egress.Shard, c.Egress.Shards}, [2]int{0, 1})
	check("egress.dial_timeout", c.Egress.DialTimeout, 10*time.Second)
	check("egress.keepalive", c.Egress.KeepAlive, 2*time.Minute)
	check("egress.udp_filtering", c.Egress.UDPFiltering, nat.FilterAddressPortDependent)
	check("policy.allow", len(c.Policy.Allow), 0)
	check("policy.deny", len(c.Policy.Deny), 0)
	check("policy.limits", c.Policy.Limits, Limits{NewFlowsPerSecond: 100, Burst: 200, MaxFlows: 4096, MaxHandshakes: 128})
	check("policy.peers", len(c.Policy.Peers), 0)
	check("table.max_flows", c.Table.MaxFlows, 65536)
	check("table.timeouts", c.Table.Timeouts, nat.Timeouts{
		TCPNew:         2 * time.Minute,
		TCPEstablished: 120 * time.Hour,
		TCPClosing:     2 * time.Minute,
		UDPUnreplied:   30 * time.Second,
		UDPAssured:     2 * time.Minute,
		ICMP:           30 * time.Second,
	})
	check("tcp.max_in_flight", c.TCP.MaxInFlight, 1024)
	check("admin.listen", c.Admin.Listen, netip.AddrPort{})
	check("admin.insecure", c.Admin.Insecure, false)
	check("log.level", c.Log.Level, zapcore.InfoLevel)
	check("shutdown.grace", c.Shutdown.Grace, 30*time.Second)

	// Default hands out a fresh value each time.
	c.Policy.Limits.Burst = 1
	c.Egress.Addrs = append(c.Egress.Addrs, netip.MustParseAddr("192.0.2.1"))
	if d := Default(); d.Policy.Limits.Burst != 200 || len(d.Egress.Addrs) != 0 {
		t.Error("changing one Default() changed the next")
	}
}

// TestEmptyIsDefault checks that text without settings parses to Default.
func TestEmptyIsDefault(t *testing.T) {
	for _, text := range []string{"", "# nothing\n", "{}", "---\n", "~\n", "egress:\npolicy:\n  limits:\n"} {
		c, err := Parse([]byte(text))
		if err != nil {
			t.Errorf("Parse(%q): %v", text, err)
			continue
		}
		if !reflect.DeepEqual(c, Default()) {
			t.Errorf("Parse(%q) = %+v, want Default()", text, c)
		}
	}
}

func TestExample(t *testing.T) {
	c, err := Load(examplePath)
	if err != nil {
		t.Fatal(err)
	}
	check := func(name string, got, want any) {
		t.Helper()
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
	check("listen", c.Listen, ListenAddr{Addr: netip.MustParseAddr("0.0.0.0"), Port: 51821})
	check("state", c.State, "/var/lib/sluice")
	check("endpoint", c.Endpoint, "vpn.example.com:51821")
	check("mtu", c.MTU, 1380)
	check("tun", c.TUN, TUN{FD: -1})
	check("pools", c.Pools, state.DefaultPools)
	check("dns.upstreams", c.DNS.Upstreams, []netip.AddrPort{
		netip.MustParseAddrPort("1.1.1.1:53"),
		netip.MustParseAddrPort("[2606:4700:4700::1111]:53"),
	})
	check("egress.addrs", c.Egress.Addrs, []netip.Addr{netip.MustParseAddr("203.0.113.5"), netip.MustParseAddr("2001:db8::5")})
	check("egress.ports", c.Egress.Ports, nat.PortRange{Lo: 32768, Hi: 60999})
	check("egress.shard", [2]int{c.Egress.Shard, c.Egress.Shards}, [2]int{1, 4})
	check("egress.dial_timeout", c.Egress.DialTimeout, 5*time.Second)
	check("egress.keepalive", c.Egress.KeepAlive, 10*time.Minute)
	check("egress.udp_filtering", c.Egress.UDPFiltering, nat.FilterEndpointIndependent)
	check("policy.allow", c.Policy.Allow, []nat.Rule{
		{Prefix: netip.MustParsePrefix("10.1.0.0/16"), Ports: nat.PortRange{Lo: 443, Hi: 443}},
		{Proto: nat.TCP, Prefix: netip.MustParsePrefix("192.168.1.10/32")},
		{Proto: nat.UDP, Prefix: netip.MustParsePrefix("fd00::53/128"), Ports: nat.PortRange{Lo: 53, Hi: 53}},
	})
	check("policy.deny", c.Policy.Deny, []nat.Rule{{Prefix: netip.MustParsePrefix("10.1.2.0/24")}})
	check("policy.limits", c.Policy.Limits, Limits{NewFlowsPerSecond: 50, Burst: 100, MaxFlows: 2048, MaxHandshakes: 64})
	check("policy.peers.laptop", c.Policy.Peers["laptop"], PeerPolicy{
		Allow:  []nat.Rule{{Prefix: netip.MustParsePrefix("192.168.1.0/24")}},
		Deny:   []nat.Rule{{Proto: nat.ICMP, Prefix: netip.MustParsePrefix("0.0.0.0/0")}},
		Limits: &Limits{NewFlowsPerSecond: 10, Burst: 20, MaxFlows: 100, MaxHandshakes: 16},
	})
	// Keys a peer's limits leave out come from policy.limits, which the
	// file gives before peers here; TestPeerLimitsInherit covers the
	// other order.
	check("policy.peers.build-server", c.Policy.Peers["build-server"], PeerPolicy{
		Limits: &Limits{NewFlowsPerSecond: 50, Burst: 100, MaxFlows: 10000, MaxHandshakes: 64},
	})
	check("table.max_flows", c.Table.MaxFlows, 131072)
	check("table.timeouts", c.Table.Timeouts, nat.Timeouts{
		TCPNew: 2 * time.Minute, TCPEstablished: 24 * time.Hour, TCPClosing: 2 * time.Minute,
		UDPUnreplied: 30 * time.Second, UDPAssured: 3 * time.Minute, ICMP: 30 * time.Second,
	})
	check("tcp.max_in_flight", c.TCP.MaxInFlight, 2048)
	check("admin.listen", c.Admin.Listen, netip.MustParseAddrPort("127.0.0.1:9090"))
	check("admin.insecure", c.Admin.Insecure, false)
	check("log.level", c.Log.Level, zapcore.DebugLevel)
	check("shutdown.grace", c.Shutdown.Grace, 10*time.Second)

	// The typed values reach the nat options.
	eo := c.Egress.Options()
	if eo.Shard != 1 || eo.Shards != 4 || eo.DialTimeout != 5*time.Second || len(eo.Addrs) != 2 {
		t.Errorf("Egress.Options() = %+v", eo)
	}
	if to := c.Table.Options(); to.MaxFlows != 131072 || to.Timeouts != c.Table.Timeouts {
		t.Errorf("Table.Options() = %+v", to)
	}
}

// keyPaths lists the mapping key paths of a YAML document.
func keyPaths(t *testing.T, data []byte) []string {
	t.Helper()
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		t.Fatal(err)
	}
	var out []string
	var walk func(n *yaml.Node, path string)
	walk = func(n *yaml.Node, path string) {
		if n.Kind != yaml.MappingNode {
			return
		}
		for i := 0; i < len(n.Content); i += 2 {
			p := join(path, n.Content[i].Value)
			out = append(out, p)
			walk(n.Content[i+1], p)
		}
	}
	walk(doc.Content[0], "")
	slices.Sort(out)
	return out
}

// TestExampleCoversEveryKey keeps the example complete: every key that
// Marshal writes must be in it, and it must have no other.
func TestExampleCoversEveryKey(t *testing.T) {
	example, err := os.ReadFile(examplePath)
	if err != nil {
		t.Fatal(err)
	}
	full := Default()
	full.Policy.Peers = map[string]PeerPolicy{"p": {
		Allow:  []nat.Rule{{Prefix: netip.MustParsePrefix("192.0.2.0/24")}},
		Deny:   []nat.Rule{{Prefix: netip.MustParsePrefix("192.0.2.1/32")}},
		Limits: &DefaultLimits,
	}}
	full.Edge.Hostnames = map[string]EdgeHostname{"h.example": {
		Peers:   []string{"p"},
		Weights: []LabelWeight{{Labels: map[string]string{"release": "stable"}, Weight: 1}},
		Allow:   []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")},
		Deny:    []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")},
		Paths:   []string{"/"},
		Auth:    EdgeAuth{Bearer: []string{"x"}, Basic: map[string]string{"u": "x"}},
	}}
	out, err := Marshal(full)
	if err != nil {
		t.Fatal(err)
	}
	want := keyPaths(t, out)
	have := keyPaths(t, example)
	if len(want) < 40 {
		t.Fatalf("the schema has only %d keys: %v", len(want), want)
	}
	// Peer names differ: compare the keys of one peer under one name.
	norm := func(paths []string, peer string) []string {
		var out []string
		for _, p := range paths {
			if rest, ok := strings.CutPrefix(p, "policy.peers."); ok {
				name, sub, _ := strings.Cut(rest, ".")
				if name != peer {
					continue
				}
				p = "policy.peers.NAME"
				if sub != "" {
					p += "." + sub
				}
			}
			if rest, ok := strings.CutPrefix(p, "edge.hostnames."); ok {
				// Hostnames have dots: the example has one, named as the
				// schema's stand-in is not.
				rest = strings.TrimPrefix(strings.TrimPrefix(rest, "app.example.com"), "h.example")
				p = "edge.hostnames.NAME" + rest
				for _, m := range []string{".weights.", ".auth.basic."} {
					if i := strings.Index(p, m); i >= 0 {
						p = p[:i+len(m)] + "KEY"
					}
				}
			}
			out = append(out, p)
		}
		slices.Sort(out)
		return slices.Compact(out)
	}
	if w, h := norm(want, "p"), norm(have, "laptop"); !slices.Equal(w, h) {
		t.Errorf("the example's keys differ from the schema's:\nschema:  %v\nexample: %v", w, h)
	}
}

func TestPeerLimitsInherit(t *testing.T) {
	// peers before limits in the file: a peer's missing keys still come
	// from policy.limits.
	c, err := Parse([]byte(`
policy:
  peers:
    a: {limits: {burst: 7}}
    b: {allow: ["10.0.0.0/8"]}
    c:
  limits: {new_flows_per_second: 3, burst: 4, max_flows: 5}
`))
	if err != nil {
		t.Fatal(err)
	}
	if got, want := *c.Policy.Peers["a"].Limits, (Limits{NewFlowsPerSecond: 3, Burst: 7, MaxFlows: 5, MaxHandshakes: 128}); got != want {
		t.Errorf("peer a limits = %+v, want %+v", got, want)
	}
	if c.Policy.Peers["b"].Limits != nil {
		t.Errorf("peer b has limits %+v, want none of its own", *c.Policy.Peers["b"].Limits)
	}
	if _, ok := c.Policy.Peers["c"]; !ok {
		t.Error("peer c with no settings is missing")
	}

	opts, lim := c.Policy.ForPeer("b")
	if lim != c.Policy.Limits || len(opts.Allow) != 1 {
		t.Errorf("ForPeer(b) = %+v, %+v", opts, lim)
	}
	if _, lim := c.Policy.ForPeer("a"); lim.Burst != 7 {
		t.Errorf("ForPeer(a) limits = %+v", lim)
	}
	if opts, lim := c.Policy.ForPeer("nobody"); lim != c.Policy.Limits || len(opts.Allow) != 0 {
		t.Errorf("ForPeer(nobody) = %+v, %+v", opts, lim)
	}
}

// TestValueForms checks the other ways values may be written.
func TestValueForms(t *testing.T) {
	c, err := Parse([]byte(`
listen: 51000
egress:
  ports: 40000
  addrs: ["::ffff:192.0.2.1"]
dns:
  upstreams: ["2606:4700:4700::1111", "9.9.9.9:5353"]
pools: {v4: ""}
admin: {listen: "localhost:8080"}
log: {level: WARN}
shutdown: {grace: 0}
policy:
  limits: {new_flows_per_second: 0.5, burst: 1_000, max_flows: 0x10}
table:
  timeouts: {tcp_established: 1h30m}
`))
	if err != nil {
		t.Fatal(err)
	}
	if c.Listen != (ListenAddr{Port: 51000}) {
		t.Errorf("listen = %v", c.Listen)
	}
	if c.Egress.Ports != (nat.PortRange{Lo: 40000, Hi: 40000}) {
		t.Errorf("egress.ports = %v", c.Egress.Ports)
	}
	if want := []netip.AddrPort{netip.MustParseAddrPort("[2606:4700:4700::1111]:53"), netip.MustParseAddrPort("9.9.9.9:5353")}; !slices.Equal(c.DNS.Upstreams, want) {
		t.Errorf("dns.upstreams = %v", c.DNS.Upstreams)
	}
	if c.Pools.V4.IsValid() || c.Pools.V6 != state.DefaultPools.V6 {
		t.Errorf("pools = %+v, want v4 disabled", c.Pools)
	}
	if c.Admin.Listen != netip.MustParseAddrPort("127.0.0.1:8080") {
		t.Errorf("admin.listen = %v", c.Admin.Listen)
	}
	if c.Log.Level != zapcore.WarnLevel || c.Shutdown.Grace != 0 {
		t.Errorf("log.level = %v, shutdown.grace = %v", c.Log.Level, c.Shutdown.Grace)
	}
	if c.Policy.Limits != (Limits{NewFlowsPerSecond: 0.5, Burst: 1000, MaxFlows: 16, MaxHandshakes: 128}) {
		t.Errorf("policy.limits = %+v", c.Policy.Limits)
	}
	if c.Table.Timeouts.TCPEstablished != 90*time.Minute {
		t.Errorf("tcp_established = %v", c.Table.Timeouts.TCPEstablished)
	}
}

// TestAliases checks that YAML anchors can share a value.
func TestAliases(t *testing.T) {
	c, err := Parse([]byte(`
policy:
  peers:
    a: {limits: &small {new_flows_per_second: 1, burst: 2, max_flows: 3}}
    b: {limits: *small}
`))
	if err != nil {
		t.Fatal(err)
	}
	if *c.Policy.Peers["a"].Limits != *c.Policy.Peers["b"].Limits || c.Policy.Peers["b"].Limits.MaxFlows != 3 {
		t.Errorf("aliased limits: a %+v, b %+v", *c.Policy.Peers["a"].Limits, *c.Policy.Peers["b"].Limits)
	}
}

func TestRoundTrip(t *testing.T) {
	example, err := Load(examplePath)
	if err != nil {
		t.Fatal(err)
	}
	odd := Default()
	odd.Listen = ListenAddr{Addr: netip.MustParseAddr("2001:db8::1"), Port: 1}
	odd.Endpoint = "[2001:db8::1]:1"
	odd.TUN = TUN{Name: "sluice0", FD: -1}
	odd.Pools.V4 = netip.Prefix{}
	odd.Egress.Ports = nat.PortRange{Lo: 8080, Hi: 8089}
	odd.Egress.Shard, odd.Egress.Shards = 9, 10
	odd.Egress.DialTimeout = 1500 * time.Millisecond
	odd.Policy.Limits = Limits{NewFlowsPerSecond: 0.25, Burst: 1, MaxFlows: 0}
	odd.Policy.Peers = map[string]PeerPolicy{"x": {}, "y.z": {Limits: &Limits{}}}
	odd.Admin = Admin{Listen: netip.MustParseAddrPort("[::]:9090"), Insecure: true}
	odd.Log.Level = zapcore.ErrorLevel
	odd.Shutdown.Grace = 0
	odd.Table.Timeouts.ICMP = time.Hour + time.Nanosecond

	onePort := Default()
	onePort.Egress.Ports = nat.PortRange{Lo: 8080, Hi: 8080}

	for name, c := range map[string]*Config{"default": Default(), "example": example, "odd": odd, "one port": onePort} {
		out, err := Marshal(c)
		if err != nil {
			t.Fatalf("%s: Marshal: %v", name, err)
		}
		back, err := Parse(out)
		if err != nil {
			t.Fatalf("%s: Parse(Marshal(c)): %v\n%s", name, err, out)
		}
		if !reflect.DeepEqual(back, c) {
			t.Errorf("%s: Parse(Marshal(c)) = %+v\nwant %+v\nYAML:\n%s", name, back, c, out)
		}
		viaYAML, err := yaml.Marshal(c)
		if err != nil {
			t.Fatalf("%s: yaml.Marshal: %v", name, err)
		}
		// yaml.Marshal indents by its own default; the content is the same.
		if back, err := Parse(viaYAML); err != nil || !reflect.DeepEqual(back, c) {
			t.Errorf("%s: Parse(yaml.Marshal(c)) = %v, %+v; want c\n%s", name, err, back, viaYAML)
		}
		// Redacted blanks the credential hashes, and nothing else, in a
		// copy.
		before := c.Clone()
		red := c.Redacted()
		for host, h := range red.Edge.Hostnames {
			for i, b := range h.Auth.Bearer {
				if b != "redacted" {
					t.Errorf("%s: Redacted() left bearer hash %q", name, b)
				}
				h.Auth.Bearer[i] = c.Edge.Hostnames[host].Auth.Bearer[i]
			}
			for u, b := range h.Auth.Basic {
				if b != "redacted" {
					t.Errorf("%s: Redacted() left basic hash %q", name, b)
				}
				h.Auth.Basic[u] = c.Edge.Hostnames[host].Auth.Basic[u]
			}
		}
		if !reflect.DeepEqual(red, c) || !reflect.DeepEqual(before, c) {
			t.Errorf("%s: Redacted() differs from the configuration beyond the hashes, or changed it", name)
		}
	}
}

// TestCloneIsDeep checks that a clone shares nothing mutable.
func TestCloneIsDeep(t *testing.T) {
	c, err := Load(examplePath)
	if err != nil {
		t.Fatal(err)
	}
	d := c.Clone()
	d.DNS.Upstreams[0] = netip.AddrPort{}
	d.Egress.Addrs[0] = netip.Addr{}
	d.Policy.Allow[0] = nat.Rule{}
	d.Policy.Deny[0] = nat.Rule{}
	d.Policy.Peers["laptop"].Limits.Burst = 99
	d.Policy.Peers["laptop"].Allow[0] = nat.Rule{}
	d.Policy.Peers["new"] = PeerPolicy{}
	if err := c.Validate(); err != nil {
		t.Fatalf("changing the clone broke the original: %v", err)
	}
	if c.Policy.Peers["laptop"].Limits.Burst != 20 || len(c.Policy.Peers) != 2 || !c.DNS.Upstreams[0].IsValid() {
		t.Error("changing the clone changed the original")
	}
}

// broken is a configuration with a problem and the field that must be
// named.
type broken struct {
	name  string
	yaml  string
	field string // the field path named; "" for a problem with the text
	line  int    // the line named; 0: not checked
	msg   string // a part of the message
}

var brokenConfigs = []broken{
	{"syntax", "egress:\n  ports: [1,\nlisten: x\n", "", 2, "did not find expected ',' or ']'"},
	{"bad indentation", "egress:\n  ports: 1\n shard: 0/1\n", "", 3, "did not find expected key"},
	{"unknown top-level key", "listen: :1\nlistn: :2\n", "listn", 2, "unknown field (did you mean listen?)"},
	{"unknown nested key", "mtu: 1420\negress:\n  addrs: []\n  prot: 1\n", "egress.prot", 4, "unknown field"},
	{"unknown peer key", "policy:\n  peers:\n    laptop:\n      alow: []\n", "policy.peers.laptop.alow", 4, "unknown field (did you mean allow?)"},
	{"duplicate key", "mtu: 1400\nmtu: 1500\n", "mtu", 2, "given twice (first on line 1)"},
	{"second document", "mtu: 1400\n---\nmtu: 1500\n", "", 0, "second YAML document"},
	{"not a mapping", "- a\n- b\n", "", 1, "must be a mapping"},
	{"section not a mapping", "egress: 5\n", "egress", 1, `want a mapping of keys to values, have "5"`},
	{"list not a list", "policy:\n  allow: 10.0.0.0/8\n", "policy.allow", 2, "want a list"},
	{"scalar is a list", "mtu: [1]\n", "mtu", 1, "want a single value, have a list"},
	{"null list element", "egress:\n  addrs: [~]\n", "egress.addrs[0]", 2, "no value"},

	{"listen port", "listen: \":70000\"\n", "listen", 1, "70000 is above 65535"},
	{"listen address", "listen: \"host:51820\"\n", "listen", 1, `"host" is not an IP address`},
	{"listen port zero", "listen: 0\n", "listen", 1, "port 0 is below 1"},
	{"endpoint without port", "endpoint: vpn.example.com\n", "endpoint", 1, "not HOST:PORT"},
	{"endpoint port", "endpoint: vpn.example.com:0\n", "endpoint", 1, "port 0 is below 1"},
	{"mtu not a number", "mtu: big\n", "mtu", 1, `"big" is not a whole number`},
	{"mtu small", "mtu: 576\n", "mtu", 1, "576 is outside 1280-65535"},
	{"tun name and fd", "tun:\n  name: tun0\n  fd: 3\n", "tun", 1, "both set"},
	{"tun fd", "tun: {fd: -2}\n", "tun.fd", 1, "-2 is negative"},
	{"tun name", "tun: {name: a-very-long-interface-name}\n", "tun.name", 1, "longer than 15 bytes"},
	{"pool not a prefix", "pools:\n  v4: 100.96.0.0\n", "pools.v4", 2, "is not a prefix"},
	{"pool wrong family", "pools:\n  v4: \"fd00::/64\"\n", "pools.v4", 2, "not an IPv4 prefix"},
	{"pool host bits", "pools:\n  v6: \"fd00::1/64\"\n", "pools.v6", 2, "host bits"},
	{"no pools", "pools: {v4: \"\", v6: \"\"}\n", "pools", 1, "neither v4 nor v6"},
	{"dns upstream", "dns:\n  upstreams: [1.1.1.1, x]\n", "dns.upstreams[1]", 2, `"x" is not an address`},
	{"dns upstream port", "dns:\n  upstreams: [\"1.1.1.1:99999\"]\n", "dns.upstreams[0]", 2, "99999 is above 65535"},
	{"egress addr", "egress:\n  addrs: [203.0.113.5, 203.0.113.300]\n", "egress.addrs[1]", 2, `"203.0.113.300" is not an IP address`},
	{"egress addrs same family", "egress:\n  addrs: [203.0.113.5, 203.0.113.6]\n", "egress.addrs[1]", 2, "second address of its family"},
	{"egress addr unspecified", "egress:\n  addrs: [\"::\"]\n", "egress.addrs[0]", 2, "not a unicast address"},
	{"ports above 65535", "egress:\n  ports: 70000\n", "egress.ports", 2, "70000 is above 65535"},
	{"ports range above 65535", "egress:\n  ports: 1000-70000\n", "egress.ports", 2, "70000 is above 65535"},
	{"ports LO above HI", "egress:\n  ports: 50000-40000\n", "egress.ports", 2, "50000-40000: 50000 is above 40000"},
	{"ports not a range", "egress:\n  ports: many\n", "egress.ports", 2, `port "many" is not a number`},
	{"shard index at count", "egress:\n  shard: 3/2\n", "egress.shard", 2, "3/2: index must be below the count"},
	{"shard count zero", "egress:\n  shard: 0/0\n", "egress.shard", 2, "count must be at least 1"},
	{"shard syntax", "egress:\n  shard: 2\n", "egress.shard", 2, "is not I/N"},
	{"shard more than ports", "egress:\n  ports: 1000-1001\n  shard: 0/3\n", "egress.shard", 3, "more shards than the 2 ports"},
	{"dial timeout syntax", "egress:\n  dial_timeout: 10\n", "egress.dial_timeout", 2, "not a duration"},
	{"dial timeout zero", "egress:\n  dial_timeout: 0s\n", "egress.dial_timeout", 2, "0s is not above zero"},
	{"udp filtering", "egress:\n  udp_filtering: full-cone\n", "egress.udp_filtering", 2, `"full-cone" is neither address-port-dependent nor endpoint-independent`},
	{"allow rule", "policy:\n  allow: [10.0.0.0/8, 1.2.3.4/40, x]\n", "policy.allow[1]", 2, `bad prefix "1.2.3.4/40"`},
	{"deny rule protocol", "policy:\n  deny: [\"sctp/10.0.0.0/8\"]\n", "policy.deny[0]", 2, "unknown protocol"},
	{"icmp rule with ports", "policy:\n  deny: [\"icmp/10.0.0.0/8:80\"]\n", "policy.deny[0]", 2, "icmp rules take no ports"},
	{"negative global limit", "policy:\n  limits: {burst: -1}\n", "policy.limits.burst", 2, "-1 is negative"},
	{"negative rate", "policy:\n  limits: {new_flows_per_second: -0.5}\n", "policy.limits.new_flows_per_second", 2, "-0.5 is negative"},
	{"rate not finite", "policy:\n  limits: {new_flows_per_second: .inf}\n", "policy.limits.new_flows_per_second", 2, "is not a number"},
	{"zero burst with rate", "policy:\n  limits: {new_flows_per_second: 5, burst: 0}\n", "policy.limits.burst", 2, "give at least 1"},
	{"negative peer limit", "policy:\n  peers:\n    laptop:\n      limits: {max_flows: -1}\n", "policy.peers.laptop.limits.max_flows", 4, "-1 is negative"},
	{"peer rule", "policy:\n  peers:\n    laptop:\n      allow: [\"tcp/10.0.0.0/8:0\"]\n", "policy.peers.laptop.allow[0]", 4, "port 0 is outside 1-65535"},
	{"peer name", "policy:\n  peers:\n    \"my laptop\": {}\n", "policy.peers.my laptop", 3, "characters other than"},
	{"peer not a mapping", "policy:\n  peers:\n    laptop: [1]\n", "policy.peers.laptop", 3, "want a mapping"},
	{"table max flows", "table:\n  max_flows: 0\n", "table.max_flows", 2, "0 is below 1"},
	{"negative timeout", "table:\n  timeouts:\n    udp_assured: -2m\n", "table.timeouts.udp_assured", 3, "-2m is not above zero"},
	{"tcp max in flight", "tcp: {max_in_flight: -5}\n", "tcp.max_in_flight", 1, "-5 is below 1"},
	{"admin not loopback", "admin:\n  listen: 0.0.0.0:9090\n", "admin.listen", 2, "0.0.0.0:9090 is not a loopback address (set admin.insecure to allow it)"},
	{"admin no address", "admin:\n  listen: \":9090\"\n", "admin.listen", 2, "has no address"},
	{"admin hostname", "admin:\n  listen: admin.example.com:9090\n", "admin.listen", 2, "is not an IP address"},
	{"admin insecure not bool", "admin:\n  insecure: yes\n", "admin.insecure", 2, `"yes" is not true or false`},
	{"log level", "log:\n  level: verbose\n", "log.level", 2, `"verbose" is not debug, info, warn or error`},
	{"log level fatal", "log: {level: fatal}\n", "log.level", 1, "is not debug, info, warn or error"},
	{"grace negative", "shutdown:\n  grace: -1s\n", "shutdown.grace", 2, "-1s is negative"},
	{"merge key", "policy:\n  limits: &l {burst: 1}\n  peers:\n    a:\n      limits:\n        <<: *l\n", "policy.peers.a.limits", 6, "merge keys (<<) are not supported"},
}

func TestBrokenConfigs(t *testing.T) {
	for _, tc := range brokenConfigs {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Parse([]byte(tc.yaml))
			if err == nil {
				t.Fatalf("Parse succeeded, want an error naming %q\n%s", tc.field, tc.yaml)
			}
			if c != nil {
				t.Error("Parse returned a configuration with its error")
			}
			var es Errors
			if !errors.As(err, &es) {
				t.Fatalf("error %v (%T) is not Errors", err, err)
			}
			for _, e := range es {
				if e.Field == tc.field && strings.Contains(e.Msg, tc.msg) && (tc.line == 0 || e.Line == tc.line) {
					return
				}
			}
			t.Errorf("error does not name field %q at line %d with %q:\n%v", tc.field, tc.line, tc.msg, err)
		})
	}
}

// TestBrokenFiles loads each file in testdata/config/bad; its first line
// is "# want: FIELD: MESSAGE", a line of the error it must give.
func TestBrokenFiles(t *testing.T) {
	files, err := filepath.Glob("../../testdata/config/bad/*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatal("no files in testdata/config/bad")
	}
	for _, path := range files {
		t.Run(filepath.Base(path), func(t *testing.T) {
			data, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			first, _, _ := strings.Cut(string(data), "\n")
			want, ok := strings.CutPrefix(first, "# want: ")
			if !ok {
				t.Fatalf("the first line is not # want: ...")
			}
			_, err = Load(path)
			if err == nil {
				t.Fatal("Load succeeded")
			}
			for _, line := range strings.Split(err.Error(), "\n") {
				if !strings.HasPrefix(line, path+": ") {
					t.Errorf("error line %q does not start with the path", line)
				}
			}
			if !strings.Contains(err.Error(), want) {
				t.Errorf("error does not contain %q:\n%v", want, err)
			}
		})
	}
}

func TestManyProblems(t *testing.T) {
	text := `egress:
  ports: 70000
  shard: 3/2
  prot: 1
dns:
  upstreams: [1.1.1.1, x]
mtu: 10
admin: {listen: "0.0.0.0:9090"}
policy:
  peers:
    laptop:
      limits: {max_flows: -1, burst: x}
log: {level: loud}
`
	_, err := Parse([]byte(text))
	var es Errors
	if !errors.As(err, &es) {
		t.Fatalf("Parse: %v, want Errors", err)
	}
	want := []string{
		"line 2: egress.ports: 70000 is above 65535",
		"line 3: egress.shard: 3/2: index must be below the count",
		"line 4: egress.prot: unknown field (did you mean ports?)",
		`line 6: dns.upstreams[1]: "x" is not an address (ADDR or ADDR:PORT)`,
		"line 7: mtu: 10 is outside 1280-65535",
		"line 8: admin.listen: 0.0.0.0:9090 is not a loopback address (set admin.insecure to allow it)",
		`line 12: policy.peers.laptop.limits.burst: "x" is not a whole number`,
		"line 12: policy.peers.laptop.limits.max_flows: -1 is negative",
		`line 13: log.level: "loud" is not debug, info, warn or error`,
	}
	if got := strings.Split(err.Error(), "\n"); !slices.Equal(got, want) {
		t.Errorf("errors:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// TestValidateBuiltInCode checks Validate on values that Parse cannot
// produce but code can.
func TestValidateBuiltInCode(t *testing.T) {
	c := Default()
	c.Listen.Port = 0
	c.Egress.Ports = nat.PortRange{}
	c.Egress.Shard = -1
	c.Egress.UDPFiltering = 7
	c.Egress.Addrs = []netip.Addr{{}}
	c.Policy.Allow = []nat.Rule{{Prefix: netip.MustParsePrefix("10.1.2.3/8")}, {}}
	c.Policy.Deny = []nat.Rule{{Proto: nat.ICMP, Prefix: netip.MustParsePrefix("10.0.0.0/8"), Ports: nat.PortRange{Lo: 1, Hi: 2}}}
	c.Policy.Peers = map[string]PeerPolicy{"": {}}
	c.DNS.Upstreams = []netip.AddrPort{netip.AddrPortFrom(netip.MustParseAddr("192.0.2.1"), 0)}
	c.Log.Level = zapcore.FatalLevel
	c.Table.Timeouts.TCPNew = 0
	err := c.Validate()
	var es Errors
	if !errors.As(err, &es) {
		t.Fatalf("Validate: %v, want Errors", err)
	}
	want := []string{
		"listen", "dns.upstreams[0]", "egress.addrs[0]", "egress.ports", "egress.shard", "egress.udp_filtering",
		"policy.allow[0]", "policy.allow[1]", "policy.deny[0]", "policy.peers.",
		"table.timeouts.tcp_new", "log.level",
	}
	if got := es.Fields(); !slices.Equal(got, want) {
		t.Errorf("fields = %q\nwant     %q\n%v", got, want, err)
	}
	for _, e := range es {
		if e.Line != 0 || e.File != "" {
			t.Errorf("%v: a Config built in code has no lines or file", e)
		}
	}
}

func TestLoadErrors(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.yaml")
	_, err := Load(missing)
	if err == nil || !strings.HasPrefix(err.Error(), missing+": ") || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Load(missing) = %v, want an error that starts with the path and is ErrNotExist", err)
	}

	path := filepath.Join(dir, "sluice.yaml")
	if err := os.WriteFile(path, []byte("mtu: 1\nlog: {level: x}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = Load(path)
	want := path + ": line 1: mtu: 1 is outside 1280-65535\n" + path + `: line 2: log.level: "x" is not debug, info, warn or error`
	if err == nil || err.Error() != want {
		t.Errorf("Load = %v\nwant %s", err, want)
	}
	var fe *FieldError
	if !errors.As(err, &fe) || fe.File != path || fe.Field != "mtu" {
		t.Errorf("errors.As(*FieldError) = %+v", fe)
	}
}
