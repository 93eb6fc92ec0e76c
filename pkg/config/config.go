// Package config is sluice's configuration file: one YAML document that
// covers every option of `sluice serve`, parsed into typed values (prefixes,
// addresses, port ranges, policy rules, durations) with every problem
// reported against the field it is in.
//
// The canonical use is
//
//	cfg, err := config.Load("/etc/sluice/sluice.yaml")
//	if err != nil {
//		return err // one problem per line, each naming its field
//	}
//	opts := cfg.Egress.Options()
//	...
//
// Parsing starts from Default, so a file holds only what differs from the
// defaults; an empty file is a valid configuration. A key given with no
// value (null) also keeps its default. Unknown keys are errors, since a
// misspelt key silently left at its default is the mistake a config
// file must not allow.
package config

import (
	"fmt"
	"io/fs"
	"maps"
	"net/netip"
	"os"
	"slices"
	"time"

	"go.uber.org/zap/zapcore"

	"github.com/sluice-vpn/sluice/nat"
	"github.com/sluice-vpn/sluice/netstack"
	"github.com/sluice-vpn/sluice/pkg/state"
)

// Config is the whole configuration of a gateway. Its YAML keys are given
// with each field; Default has every default filled in.
type Config struct {
	// Listen is WireGuard's UDP [ADDR]:PORT (listen) [:51820].
	Listen ListenAddr
	// State is the state directory (state); "" means the default one
	// (state.DefaultDir).
	State string
	// Endpoint is the public HOST:PORT written into client configurations
	// (endpoint); "" means a guess from the host's addresses.
	Endpoint string
	// MTU is the tunnel's MTU (mtu) [1420], 1280-65535.
	MTU int
	// TUN serves a kernel TUN device instead of WireGuard (tun).
	TUN TUN
	// Pools are the tunnel address pools of a new state (pools.v4,
	// pools.v6) [state.DefaultPools]. An empty value disables that family.
	Pools state.Pools
	// DNS configures the gateway's DNS forwarder (dns).
	DNS DNS
	// Egress configures the sockets flows leave from (egress).
	Egress Egress
	// Policy decides which destinations peers may reach (policy).
	Policy Policy
	// Table configures the connection table (table).
	Table Table
	// TCP configures the handling of new TCP connections (tcp).
	TCP TCP
	// Admin configures the admin API (admin).
	Admin Admin
	// Log configures logging (log).
	Log Log
	// Shutdown configures stopping (shutdown).
	Shutdown Shutdown
	// Edge publishes the services that peers expose (edge).
	Edge Edge
}

// ListenAddr is a local [ADDR]:PORT. The zero Addr means every address.
type ListenAddr struct {
	Addr netip.Addr
	Port uint16
}

// String formats l the way it is parsed: ":51820", "192.0.2.1:51820",
// "[2001:db8::1]:51820".
func (l ListenAddr) String() string {
	if !l.Addr.IsValid() {
		return fmt.Sprintf(":%d", l.Port)
	}
	return netip.AddrPortFrom(l.Addr, l.Port).String()
}

// TUN selects TUN mode: the gateway serves a kernel TUN device instead of
// being a WireGuard server. Give at most one of Name and FD.
type TUN struct {
	// Name is a TUN device to create or attach to (tun.name); "" means
	// none.
	Name string
	// FD is an already open TUN file descriptor (tun.fd); -1 means none.
	FD int
}

// Enabled reports whether TUN mode is selected.
func (t TUN) Enabled() bool { return t.Name != "" || t.FD >= 0 }

// DNS configures the DNS forwarder on the gateway's tunnel addresses.
type DNS struct {
	// Upstreams are the resolvers queries are forwarded to
	// (dns.upstreams), written ADDR or ADDR:PORT (port 53 when omitted);
	// empty means the nameservers of /etc/resolv.conf.
	Upstreams []netip.AddrPort
}

// Egress configures the egress socket pool; see nat.EgressOptions.
type Egress struct {
	// Addrs are the local addresses egress sockets bind to, at most one
	// per family (egress.addrs); empty means the kernel's choice.
	Addrs []netip.Addr
	// Ports is the port range shared by all shards (egress.ports)
	// [nat.DefaultEgressPorts, 32768-60999].
	Ports nat.PortRange
	// Shard and Shards say that this gateway uses slice Shard of Shards of
	// Ports (egress.shard, "I/N") [0/1].
	Shard, Shards int
	// DialTimeout bounds an egress TCP dial (egress.dial_timeout) [10s].
	DialTimeout time.Duration
	// KeepAlive is how long an egress TCP connection may be idle before
	// the kernel probes its destination (egress.keepalive); 0 turns the
	// probes off [2m].
	KeepAlive time.Duration
	// UDPFiltering decides which remotes may answer a client's UDP socket
	// (egress.udp_filtering: address-port-dependent or
	// endpoint-independent) [address-port-dependent].
	UDPFiltering nat.Filtering
}

// Options returns the nat options for e. UDPFiltering is not among them:
// it goes to gateway.Options.UDPFiltering.
func (e Egress) Options() nat.EgressOptions {
	return nat.EgressOptions{
		Addrs:       slices.Clone(e.Addrs),
		Ports:       e.Ports,
		Shard:       e.Shard,
		Shards:      e.Shards,
		DialTimeout: e.DialTimeout,
		KeepAlive:   keepAlive(e.KeepAlive),
	}
}

// keepAlive turns the file's "0 is off" into nat's "negative is off".
func keepAlive(d time.Duration) time.Duration {
	if d == 0 {
		return -1
	}
	return d
}

// Policy is the destination policy: rules for every peer, limits for
// every peer, and per-peer additions.
type Policy struct {
	// Allow opens destinations, including the ranges denied by default
	// (policy.allow). Rules are written as nat.ParseRule reads them.
	Allow []nat.Rule
	// Deny closes destinations; it wins over Allow (policy.deny).
	Deny []nat.Rule
	// Limits apply to each peer that has none of its own (policy.limits).
	Limits Limits
	// Peers holds per-peer settings by peer name (policy.peers.NAME).
	Peers map[string]PeerPolicy
}

// Options returns the nat options for the rules every peer gets.
func (p Policy) Options() nat.PolicyOptions {
	return nat.PolicyOptions{Allow: slices.Clone(p.Allow), Deny: slices.Clone(p.Deny)}
}

// ForPeer returns the rules and limits that apply to the named peer: its
// own rules added to the global ones, and its own limits or else the
// global limits.
func (p Policy) ForPeer(name string) (nat.PolicyOptions, Limits) {
	opts, lim := p.Options(), p.Limits
	if pp, ok := p.Peers[name]; ok {
		opts.Allow = append(opts.Allow, pp.Allow...)
		opts.Deny = append(opts.Deny, pp.Deny...)
		if pp.Limits != nil {
			lim = *pp.Limits
		}
	}
	return opts, lim
}

// Limits bound what one peer may open. Zero in a field means no limit.
type Limits struct {
	// NewFlowsPerSecond is the sustained rate of new flows
	// (new_flows_per_second) [100].
	NewFlowsPerSecond float64
	// Burst is how many new flows may come at once above the rate
	// (burst) [200]; at least 1 when NewFlowsPerSecond is set.
	Burst int
	// MaxFlows is the most flows the peer may have open at once
	// (max_flows) [4096].
	MaxFlows int
	// MaxHandshakes is the most TCP handshakes the peer may have in
	// flight at once, each holding a connection to its destination until
	// the client completes it (max_handshakes) [128]. Its SYNs beyond
	// that are answered with a RST.
	MaxHandshakes int
}

// PeerPolicy is what one peer gets beyond the global policy.
type PeerPolicy struct {
	// Allow and Deny add to the global rules for this peer
	// (policy.peers.NAME.allow, .deny).
	Allow, Deny []nat.Rule
	// Limits replace the global limits for this peer
	// (policy.peers.NAME.limits); nil means the global ones. Keys missing
	// from the file take the global values.
	Limits *Limits
}

// Table configures the connection table; see nat.TableOptions.
type Table struct {
	// MaxFlows is the most flows the table holds (table.max_flows)
	// [65536].
	MaxFlows int
	// Timeouts are the idle timeouts per protocol and state
	// (table.timeouts: tcp_new [2m], tcp_established [120h], tcp_closing
	// [2m], udp_unreplied [30s], udp_assured [2m], icmp [30s]).
	Timeouts nat.Timeouts
}

// Options returns the nat options for t.
func (t Table) Options() nat.TableOptions {
	return nat.TableOptions{MaxFlows: t.MaxFlows, Timeouts: t.Timeouts}
}

// TCP configures the handling of new TCP connections.
type TCP struct {
	// MaxInFlight bounds the handshakes waiting on their egress dial
	// (tcp.max_in_flight) [1024].
	MaxInFlight int

	// CongestionControl is the congestion control of the connections to
	// clients (tcp.congestion_control): bbr, cubic or reno [bbr].
	CongestionControl string
}

// Admin configures the admin API.
type Admin struct {
	// Listen is the TCP ADDR:PORT the API listens on (admin.listen); the
	// zero value means a unix socket in the state directory. It must be a
	// loopback address unless Insecure is set.
	Listen netip.AddrPort
	// Insecure allows a Listen address other than loopback
	// (admin.insecure) [false].
	Insecure bool
}

// Log configures logging.
type Log struct {
	// Level is the least severe level logged (log.level: debug, info,
	// warn or error) [info].
	Level zapcore.Level
}

// Shutdown configures stopping.
type Shutdown struct {
	// Grace is how long open flows may take to finish after a stop is
	// asked for (shutdown.grace) [30s]; 0 cuts them at once.
	Grace time.Duration
}

// Defaults that are this package's own; the others come from the packages
// that use them (nat, state).
const (
	DefaultListenPort  = 51820
	DefaultMTU         = 1420
	DefaultDialTimeout = 10 * time.Second
	DefaultKeepAlive   = 2 * time.Minute
	DefaultMaxFlows    = 65536
	DefaultMaxInFlight = 1024
	DefaultGrace       = 30 * time.Second
)

// DefaultLimits are the per-peer limits when the file sets none.
var DefaultLimits = Limits{NewFlowsPerSecond: 100, Burst: 200, MaxFlows: 4096, MaxHandshakes: 128}

// DefaultTimeouts are the connection table's idle timeouts, those of Linux
// conntrack.
var DefaultTimeouts = nat.Timeouts{
	TCPNew:         2 * time.Minute,
	TCPEstablished: 120 * time.Hour,
	TCPClosing:     2 * time.Minute,
	UDPUnreplied:   30 * time.Second,
	UDPAssured:     2 * time.Minute,
	ICMP:           30 * time.Second,
}

// Default returns a configuration with every default filled in. It
// validates.
func Default() *Config {
	return &Config{
		Listen: ListenAddr{Port: DefaultListenPort},
		MTU:    DefaultMTU,
		TUN:    TUN{FD: -1},
		Pools:  state.DefaultPools,
		Egress: Egress{
			Ports:        nat.DefaultEgressPorts,
			Shard:        0,
			Shards:       1,
			DialTimeout:  DefaultDialTimeout,
			KeepAlive:    DefaultKeepAlive,
			UDPFiltering: nat.FilterAddressPortDependent,
		},
		Policy:   Policy{Limits: DefaultLimits},
		Table:    Table{MaxFlows: DefaultMaxFlows, Timeouts: DefaultTimeouts},
		TCP:      TCP{MaxInFlight: DefaultMaxInFlight, CongestionControl: netstack.DefaultCongestionControl},
		Log:      Log{Level: zapcore.InfoLevel},
		Shutdown: Shutdown{Grace: DefaultGrace},
		Edge:     Edge{DialTimeout: DefaultEdgeDialTimeout, Lease: DefaultEdgeLease},
	}
}

// Load reads and parses the configuration file at path. Its errors start
// with the path.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		if pe, ok := err.(*fs.PathError); ok {
			err = pe.Err
		}
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	c, err := Parse(data)
	if es, ok := err.(Errors); ok {
		for _, e := range es {
			e.File = path
		}
	}
	return c, err
}

// Clone returns a deep copy of c, which the caller may change freely.
func (c *Config) Clone() *Config {
	d := *c
	d.DNS.Upstreams = slices.Clone(c.DNS.Upstreams)
	d.Egress.Addrs = slices.Clone(c.Egress.Addrs)
	d.Policy.Allow = slices.Clone(c.Policy.Allow)
	d.Policy.Deny = slices.Clone(c.Policy.Deny)
	if c.Policy.Peers != nil {
		d.Policy.Peers = maps.Clone(c.Policy.Peers)
		for name, pp := range d.Policy.Peers {
			pp.Allow = slices.Clone(pp.Allow)
			pp.Deny = slices.Clone(pp.Deny)
			if pp.Limits != nil {
				lim := *pp.Limits
				pp.Limits = &lim
			}
			d.Policy.Peers[name] = pp
		}
	}
	d.Edge = c.Edge.clone()
	return &d
}

// Redacted returns a copy of c that is safe to show, for the admin API's
// view of the running configuration: the edge's credential hashes are
// blanked (keys live in the state directory, not here).
func (c *Config) Redacted() *Config {
	d := c.Clone()
	d.Edge.redact()
	return d
}
