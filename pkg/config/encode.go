package config

import (
	"bytes"
	"fmt"
	"net/netip"
	"strconv"

	"gopkg.in/yaml.v3"

	"github.com/sluice-vpn/sluice/nat"
)

// Marshal writes c as YAML in the file's schema, every key present.
// Parse reads it back to a Config equal to c (lists that are empty but
// not nil come back nil).
func Marshal(c *Config) ([]byte, error) {
	var b bytes.Buffer
	enc := yaml.NewEncoder(&b)
	enc.SetIndent(2)
	if err := enc.Encode(c.file()); err != nil {
		return nil, fmt.Errorf("config: marshal: %w", err)
	}
	if err := enc.Close(); err != nil {
		return nil, fmt.Errorf("config: marshal: %w", err)
	}
	return b.Bytes(), nil
}

// MarshalYAML makes yaml.Marshal write c in the file's schema.
func (c *Config) MarshalYAML() (any, error) { return c.file(), nil }

// The types below are the file's schema as yaml.v3 writes it: every value
// in its text form. Reading goes through decode.go instead, which names
// fields and lines in its errors.

type fileConfig struct {
	Listen   string       `yaml:"listen"`
	State    string       `yaml:"state"`
	Endpoint string       `yaml:"endpoint"`
	MTU      int          `yaml:"mtu"`
	TUN      fileTUN      `yaml:"tun"`
	Pools    filePools    `yaml:"pools"`
	DNS      fileDNS      `yaml:"dns"`
	Egress   fileEgress   `yaml:"egress"`
	Policy   filePolicy   `yaml:"policy"`
	Table    fileTable    `yaml:"table"`
	TCP      fileTCP      `yaml:"tcp"`
	Admin    fileAdmin    `yaml:"admin"`
	Log      fileLog      `yaml:"log"`
	Shutdown fileShutdown `yaml:"shutdown"`
	Edge     fileEdge     `yaml:"edge"`
}

type fileTUN struct {
	Name string `yaml:"name"`
	FD   int    `yaml:"fd"`
}

type filePools struct {
	V4 string `yaml:"v4"`
	V6 string `yaml:"v6"`
}

type fileDNS struct {
	Upstreams []string `yaml:"upstreams"`
}

type fileEgress struct {
	Addrs        []string `yaml:"addrs"`
	Ports        string   `yaml:"ports"`
	Shard        string   `yaml:"shard"`
	DialTimeout  string   `yaml:"dial_timeout"`
	KeepAlive    string   `yaml:"keepalive"`
	UDPFiltering string   `yaml:"udp_filtering"`
}

type filePolicy struct {
	Allow  []string            `yaml:"allow"`
	Deny   []string            `yaml:"deny"`
	Limits fileLimits          `yaml:"limits"`
	Peers  map[string]filePeer `yaml:"peers,omitempty"`
}

type fileLimits struct {
	NewFlowsPerSecond float64 `yaml:"new_flows_per_second"`
	Burst             int     `yaml:"burst"`
	MaxFlows          int     `yaml:"max_flows"`
	MaxHandshakes     int     `yaml:"max_handshakes"`
}

type filePeer struct {
	Allow  []string    `yaml:"allow,omitempty"`
	Deny   []string    `yaml:"deny,omitempty"`
	Limits *fileLimits `yaml:"limits,omitempty"`
}

type fileTable struct {
	MaxFlows int          `yaml:"max_flows"`
	Timeouts fileTimeouts `yaml:"timeouts"`
}

type fileTimeouts struct {
	TCPNew         string `yaml:"tcp_new"`
	TCPEstablished string `yaml:"tcp_established"`
	TCPClosing     string `yaml:"tcp_closing"`
	UDPUnreplied   string `yaml:"udp_unreplied"`
	UDPAssured     string `yaml:"udp_assured"`
	ICMP           string `yaml:"icmp"`
}

type fileTCP struct {
	MaxInFlight       int    `yaml:"max_in_flight"`
	CongestionControl string `yaml:"congestion_control"`
}

type fileAdmin struct {
	Listen   string `yaml:"listen"`
	Insecure bool   `yaml:"insecure"`
}

type fileLog struct {
	Level string `yaml:"level"`
}

type fileShutdown struct {
	Grace string `yaml:"grace"`
}

func (c *Config) file() *fileConfig {
	to := c.Table.Timeouts
	f := &fileConfig{
		Listen:   c.Listen.String(),
		State:    c.State,
		Endpoint: c.Endpoint,
		MTU:      c.MTU,
		TUN:      fileTUN{Name: c.TUN.Name, FD: c.TUN.FD},
		Pools:    filePools{V4: formatPool(c.Pools.V4), V6: formatPool(c.Pools.V6)},
		DNS:      fileDNS{Upstreams: texts(c.DNS.Upstreams, netip.AddrPort.String)},
		Egress: fileEgress{
			Addrs:        texts(c.Egress.Addrs, netip.Addr.String),
			Ports:        formatPorts(c.Egress.Ports),
			Shard:        strconv.Itoa(c.Egress.Shard) + "/" + strconv.Itoa(c.Egress.Shards),
			DialTimeout:  formatDuration(c.Egress.DialTimeout),
			KeepAlive:    formatDuration(c.Egress.KeepAlive),
			UDPFiltering: c.Egress.UDPFiltering.String(),
		},
		Policy: filePolicy{
			Allow:  texts(c.Policy.Allow, nat.Rule.String),
			Deny:   texts(c.Policy.Deny, nat.Rule.String),
			Limits: fileLimits(c.Policy.Limits),
		},
		Table: fileTable{
			MaxFlows: c.Table.MaxFlows,
			Timeouts: fileTimeouts{
				TCPNew:         formatDuration(to.TCPNew),
				TCPEstablished: formatDuration(to.TCPEstablished),
				TCPClosing:     formatDuration(to.TCPClosing),
				UDPUnreplied:   formatDuration(to.UDPUnreplied),
				UDPAssured:     formatDuration(to.UDPAssured),
				ICMP:           formatDuration(to.ICMP),
			},
		},
		TCP:      fileTCP{MaxInFlight: c.TCP.MaxInFlight, CongestionControl: c.TCP.CongestionControl},
		Admin:    fileAdmin{Listen: formatAdminListen(c.Admin.Listen), Insecure: c.Admin.Insecure},
		Log:      fileLog{Level: c.Log.Level.String()},
		Shutdown: fileShutdown{Grace: formatDuration(c.Shutdown.Grace)},
		Edge:     c.Edge.file(),
	}
	if len(c.Policy.Peers) > 0 {
		f.Policy.Peers = make(map[string]filePeer, len(c.Policy.Peers))
		for name, pp := range c.Policy.Peers {
			fp := filePeer{Allow: texts(pp.Allow, nat.Rule.String), Deny: texts(pp.Deny, nat.Rule.String)}
			if pp.Limits != nil {
				l := fileLimits(*pp.Limits)
				fp.Limits = &l
			}
			f.Policy.Peers[name] = fp
		}
	}
	return f
}

// texts formats each value; never nil, so that an empty list is written
// as [] rather than null.
func texts[T any](vs []T, format func(T) string) []string {
	out := make([]string, len(vs))
	for i, v := range vs {
		out[i] = format(v)
	}
	return out
}
