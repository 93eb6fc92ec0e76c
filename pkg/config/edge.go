package config

import (
	"encoding/hex"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/crypto/bcrypt"
	"gopkg.in/yaml.v3"

	"github.com/sluice-vpn/sluice/pkg/expose"
)

// Edge is the gateway's public side for services that peers publish with
// `sluice expose` (edge). Nothing listens unless an address is set.
type Edge struct {
	// HTTP is the [ADDR]:PORT of the plain HTTP listener (edge.http);
	// port 0 means none.
	HTTP ListenAddr
	// HTTPS is the [ADDR]:PORT of the TLS listener (edge.https); port 0
	// means none. It needs Certificates.
	HTTPS ListenAddr
	// Certificates are the TLS certificates, each chosen by SNI among the
	// names it carries (edge.certificates: a list of {cert, key} PEM file
	// paths).
	Certificates []Certificate
	// TCP maps edge ports to hostnames (edge.tcp: a list of
	// "[ADDR:]PORT=HOSTNAME").
	TCP []TCPRoute
	// OnlyListed refuses registrations of hostnames that Hostnames does
	// not list (edge.only_listed) [false: the first peer to register a
	// hostname holds it while it serves it, and for three leases after].
	OnlyListed bool
	// DialTimeout bounds one connection attempt to an agent through the
	// tunnel (edge.dial_timeout) [3s].
	DialTimeout time.Duration
	// Lease is how long an agent's registration stands without a refresh
	// (edge.lease) [6s].
	Lease time.Duration
	// Hostnames are the per-hostname settings (edge.hostnames.NAME).
	Hostnames map[string]EdgeHostname
}

// Enabled reports whether any edge listener is configured.
func (e Edge) Enabled() bool { return e.HTTP.Port != 0 || e.HTTPS.Port != 0 || len(e.TCP) > 0 }

// Certificate is a TLS certificate chain and its key, as PEM files.
type Certificate struct {
	Cert, Key string
}

// TCPRoute sends the connections of one edge port to a hostname's agents.
type TCPRoute struct {
	Listen   ListenAddr
	Hostname string
}

// String formats r as the file and --edge-tcp write it.
func (r TCPRoute) String() string { return r.Listen.String() + "=" + r.Hostname }

// ParseTCPRoute reads "[ADDR:]PORT=HOSTNAME", as edge.tcp and the
// --edge-tcp flag take it.
func ParseTCPRoute(s string) (TCPRoute, error) {
	listen, host, ok := strings.Cut(s, "=")
	if !ok {
		return TCPRoute{}, fmt.Errorf("%q is not [ADDR:]PORT=HOSTNAME", s)
	}
	l, err := parseListen(listen)
	if err != nil {
		return TCPRoute{}, err
	}
	if err := expose.CheckHostname(host); err != nil {
		return TCPRoute{}, err
	}
	return TCPRoute{Listen: l, Hostname: host}, nil
}

// EdgeHostname is the edge's configuration of one hostname.
type EdgeHostname struct {
	// Peers may serve the hostname (peers); empty means the first peer
	// that registers it.
	Peers []string
	// Weights split the traffic between replicas by their labels
	// (weights: a mapping of "KEY=VALUE[,KEY=VALUE]" to a weight), the
	// first selector a replica matches deciding; none means evenly.
	Weights []LabelWeight
	// Rate limits new requests (HTTP) or connections (TCP) per client IP
	// and overall (rate); zero means unlimited.
	Rate EdgeRate
	// Allow, if not empty, admits only clients in these prefixes; Deny
	// refuses clients in its prefixes and wins over Allow (allow, deny).
	Allow, Deny []netip.Prefix
	// Paths are the URL path prefixes that may be requested (paths); none
	// means every path.
	Paths []string
	// Auth requires a credential of each request (auth).
	Auth EdgeAuth
	// ProxyProtocol sends a PROXY protocol v2 header with the client's
	// address ahead of each TCP connection (proxy_protocol).
	ProxyProtocol bool
}

// LabelWeight gives the replicas whose labels include Labels a share of
// the traffic.
type LabelWeight struct {
	Labels map[string]string
	Weight int
}

// EdgeRate is a hostname's rate limits.
type EdgeRate struct {
	PerClient      float64 // rate.per_client, per second
	PerClientBurst int     // rate.per_client_burst [2 × per_client]
	Total          float64 // rate.total, per second
	TotalBurst     int     // rate.total_burst [2 × total]
}

// EdgeAuth holds hashed credentials: a request must carry one of them.
type EdgeAuth struct {
	// Bearer are tokens, as "sha256:HEX" of the token (auth.bearer).
	Bearer []string
	// Basic maps user names to password hashes, "sha256:HEX" or bcrypt
	// ("$2a$...", "$2b$...", "$2y$...") (auth.basic).
	Basic map[string]string
}

// DefaultEdgeDialTimeout and DefaultEdgeLease are the edge's defaults.
const (
	DefaultEdgeDialTimeout = 3 * time.Second
	DefaultEdgeLease       = 6 * time.Second
)

func (d *decoder) edge(n *yaml.Node, path string, e *Edge) {
	d.mapping(n, path, []field{
		{"http", value(d, &e.HTTP, ParseListenOff)},
		{"https", value(d, &e.HTTPS, ParseListenOff)},
		{"certificates", func(n *yaml.Node, path string) {
			e.Certificates = nil
			d.sequence(n, path, func(v *yaml.Node, path string) {
				var c Certificate
				d.mapping(v, path, []field{{"cert", d.str(&c.Cert)}, {"key", d.str(&c.Key)}})
				e.Certificates = append(e.Certificates, c)
			})
		}},
		{"tcp", list(d, &e.TCP, ParseTCPRoute)},
		{"only_listed", d.boolean(&e.OnlyListed)},
		{"dial_timeout", value(d, &e.DialTimeout, parseDuration)},
		{"lease", value(d, &e.Lease, parseDuration)},
		{"hostnames", func(n *yaml.Node, path string) {
			d.each(n, path, func(name string, v *yaml.Node, path string) {
				if e.Hostnames == nil {
					e.Hostnames = map[string]EdgeHostname{}
				}
				var h EdgeHostname
				if !isNull(v) {
					d.edgeHostname(v, path, &h)
				}
				e.Hostnames[name] = h
			})
		}},
	})
}

func (d *decoder) edgeHostname(n *yaml.Node, path string, h *EdgeHostname) {
	d.mapping(n, path, []field{
		{"peers", list(d, &h.Peers, func(s string) (string, error) { return s, checkPeerName(s) })},
		{"weights", func(n *yaml.Node, path string) {
			d.each(n, path, func(sel string, v *yaml.Node, path string) {
				labels, err := parseSelector(sel)
				if err != nil {
					d.addLine(d.lines[path], path, "%v", err)
					return
				}
				w := LabelWeight{Labels: labels}
				before := len(d.errs)
				d.integer(&w.Weight)(v, path)
				if len(d.errs) == before {
					h.Weights = append(h.Weights, w)
				}
			})
		}},
		{"rate", d.section([]field{
			{"per_client", d.float(&h.Rate.PerClient)},
			{"per_client_burst", d.integer(&h.Rate.PerClientBurst)},
			{"total", d.float(&h.Rate.Total)},
			{"total_burst", d.integer(&h.Rate.TotalBurst)},
		})},
		{"allow", list(d, &h.Allow, parseClientPrefix)},
		{"deny", list(d, &h.Deny, parseClientPrefix)},
		{"paths", list(d, &h.Paths, func(s string) (string, error) { return s, nil })},
		{"auth", d.section([]field{
			{"bearer", list(d, &h.Auth.Bearer, func(s string) (string, error) { return s, nil })},
			{"basic", func(n *yaml.Node, path string) {
				d.each(n, path, func(user string, v *yaml.Node, path string) {
					var hash string
					before := len(d.errs)
					d.str(&hash)(v, path)
					if len(d.errs) == before {
						if h.Auth.Basic == nil {
							h.Auth.Basic = map[string]string{}
						}
						h.Auth.Basic[user] = hash
					}
				})
			}},
		})},
		{"proxy_protocol", d.boolean(&h.ProxyProtocol)},
	})
}

// sequence calls fn for each element of the list n.
func (d *decoder) sequence(n *yaml.Node, path string, fn func(v *yaml.Node, path string)) {
	n = resolve(n)
	if n.Kind != yaml.SequenceNode {
		d.addLine(n.Line, path, "want a list, have %s", describe(n))
		return
	}
	for i, e := range n.Content {
		epath := path + "[" + strconv.Itoa(i) + "]"
		d.lines[epath] = resolve(e).Line
		fn(e, epath)
	}
}

// parseSelector reads "KEY=VALUE[,KEY=VALUE...]".
func parseSelector(s string) (map[string]string, error) {
	labels := map[string]string{}
	for _, kv := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(kv), "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("%q is not KEY=VALUE[,KEY=VALUE]", s)
		}
		labels[k] = v
	}
	if err := expose.CheckLabels(labels); err != nil {
		return nil, fmt.Errorf("%q: %v", s, err)
	}
	return labels, nil
}

func formatSelector(labels map[string]string) string {
	keys := slices.Sorted(maps.Keys(labels))
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = k + "=" + labels[k]
	}
	return strings.Join(parts, ",")
}

// parseClientPrefix reads a prefix or a single address.
func parseClientPrefix(s string) (netip.Prefix, error) {
	if p, err := netip.ParsePrefix(s); err == nil {
		if p != p.Masked() {
			return netip.Prefix{}, fmt.Errorf("%q has host bits set (did you mean %s?)", s, p.Masked())
		}
		return p, nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%q is not an address or prefix", s)
	}
	return netip.PrefixFrom(a, a.BitLen()), nil
}

// checkSecretHash accepts "sha256:" and 64 hex digits, or, if bcryptOK,
// a bcrypt hash.
func checkSecretHash(s string, bcryptOK bool) error {
	if hexPart, ok := strings.CutPrefix(s, "sha256:"); ok {
		if b, err := hex.DecodeString(hexPart); err != nil || len(b) != 32 {
			return fmt.Errorf("sha256: wants 64 hex digits (see `sluice edge hash`)")
		}
		return nil
	}
	if bcryptOK && (strings.HasPrefix(s, "$2a$") || strings.HasPrefix(s, "$2b$") || strings.HasPrefix(s, "$2y$")) {
		if _, err := bcrypt.Cost([]byte(s)); err != nil {
			return fmt.Errorf("bad bcrypt hash: %v", err)
		}
		return nil
	}
	if bcryptOK {
		return fmt.Errorf("not a hash: want sha256:HEX or a bcrypt hash ($2a$, $2b$, $2y$) (see `sluice edge hash`)")
	}
	return fmt.Errorf("not a hash: want sha256:HEX of the token (see `sluice edge hash`)")
}

func (e *Edge) validate(p *problems, tun bool) {
	if tun && e.Enabled() {
		p.add("edge", "the edge serves services that WireGuard peers publish; TUN mode has no peers")
	}
	if e.HTTPS.Port != 0 && len(e.Certificates) == 0 {
		p.add("edge.https", "needs edge.certificates (--edge-cert and --edge-key)")
	}
	for i, c := range e.Certificates {
		f := fmt.Sprintf("edge.certificates[%d]", i)
		if c.Cert == "" {
			p.add(f+".cert", "missing: the path of a PEM certificate chain")
		}
		if c.Key == "" {
			p.add(f+".key", "missing: the path of the PEM private key")
		}
	}
	ports := map[ListenAddr]string{}
	claim := func(l ListenAddr, field string) {
		if l.Port == 0 {
			return
		}
		if other, ok := ports[l]; ok {
			p.add(field, "%s is already %s", l, other)
			return
		}
		ports[l] = field
	}
	claim(e.HTTP, "edge.http")
	claim(e.HTTPS, "edge.https")
	for i, r := range e.TCP {
		claim(r.Listen, fmt.Sprintf("edge.tcp[%d]", i))
	}
	if e.DialTimeout <= 0 {
		p.add("edge.dial_timeout", "%s is not above zero", formatDuration(e.DialTimeout))
	}
	if e.Lease < time.Second {
		p.add("edge.lease", "%s is below 1s", formatDuration(e.Lease))
	}
	tcpRouted := map[string]bool{}
	for _, r := range e.TCP {
		tcpRouted[r.Hostname] = true
	}
	for _, name := range slices.Sorted(maps.Keys(e.Hostnames)) {
		h := e.Hostnames[name]
		f := "edge.hostnames." + name
		if tcpRouted[name] {
			// A TCP route carries bytes, with no request to read a path
			// or a credential from: refuse the settings rather than let
			// them look like protection.
			if len(h.Paths) > 0 {
				p.add(f+".paths", "%s is routed by edge.tcp, which has no paths to check", name)
			}
			if len(h.Auth.Bearer) > 0 || len(h.Auth.Basic) > 0 {
				p.add(f+".auth", "%s is routed by edge.tcp, which has no requests to authenticate (use allow and deny)", name)
			}
		}
		if err := expose.CheckHostname(name); err != nil {
			p.add(f, "%v", err)
		}
		for _, w := range h.Weights {
			if w.Weight < 0 {
				p.add(f+".weights."+formatSelector(w.Labels), "%d is negative", w.Weight)
			}
		}
		r := h.Rate
		for _, c := range []struct {
			key string
			neg bool
		}{
			{"per_client", r.PerClient < 0}, {"per_client_burst", r.PerClientBurst < 0},
			{"total", r.Total < 0}, {"total_burst", r.TotalBurst < 0},
		} {
			if c.neg {
				p.add(f+".rate."+c.key, "is negative")
			}
		}
		for i, path := range h.Paths {
			if !strings.HasPrefix(path, "/") {
				p.add(fmt.Sprintf("%s.paths[%d]", f, i), "%q does not start with /", path)
			}
		}
		for i, b := range h.Auth.Bearer {
			if err := checkSecretHash(b, false); err != nil {
				p.add(fmt.Sprintf("%s.auth.bearer[%d]", f, i), "%v", err)
			}
		}
		for _, user := range slices.Sorted(maps.Keys(h.Auth.Basic)) {
			if user == "" || strings.Contains(user, ":") {
				p.add(f+".auth.basic", "user name %q: empty or with a colon", user)
			}
			if err := checkSecretHash(h.Auth.Basic[user], true); err != nil {
				p.add(f+".auth.basic."+user, "%v", err)
			}
		}
	}
}

func (e Edge) clone() Edge {
	e.Certificates = slices.Clone(e.Certificates)
	e.TCP = slices.Clone(e.TCP)
	if e.Hostnames != nil {
		hs := make(map[string]EdgeHostname, len(e.Hostnames))
		for name, h := range e.Hostnames {
			h.Peers = slices.Clone(h.Peers)
			h.Weights = slices.Clone(h.Weights)
			for i := range h.Weights {
				h.Weights[i].Labels = maps.Clone(h.Weights[i].Labels)
			}
			h.Allow, h.Deny = slices.Clone(h.Allow), slices.Clone(h.Deny)
			h.Paths = slices.Clone(h.Paths)
			h.Auth.Bearer = slices.Clone(h.Auth.Bearer)
			h.Auth.Basic = maps.Clone(h.Auth.Basic)
			hs[name] = h
		}
		e.Hostnames = hs
	}
	return e
}

// redact blanks the credential hashes: hashes of low-entropy passwords
// can be brute-forced, so the admin API does not hand them out.
func (e *Edge) redact() {
	for name, h := range e.Hostnames {
		for i := range h.Auth.Bearer {
			h.Auth.Bearer[i] = "redacted"
		}
		for u := range h.Auth.Basic {
			h.Auth.Basic[u] = "redacted"
		}
		e.Hostnames[name] = h
	}
}

// The file schema of the edge, for Marshal.

type fileEdge struct {
	HTTP         string                      `yaml:"http"`
	HTTPS        string                      `yaml:"https"`
	Certificates []fileCertificate           `yaml:"certificates"`
	TCP          []string                    `yaml:"tcp"`
	OnlyListed   bool                        `yaml:"only_listed"`
	DialTimeout  string                      `yaml:"dial_timeout"`
	Lease        string                      `yaml:"lease"`
	Hostnames    map[string]fileEdgeHostname `yaml:"hostnames,omitempty"`
}

type fileCertificate struct {
	Cert string `yaml:"cert"`
	Key  string `yaml:"key"`
}

type fileEdgeHostname struct {
	Peers         []string     `yaml:"peers,omitempty"`
	Weights       *yaml.Node   `yaml:"weights,omitempty"`
	Rate          fileEdgeRate `yaml:"rate"`
	Allow         []string     `yaml:"allow,omitempty"`
	Deny          []string     `yaml:"deny,omitempty"`
	Paths         []string     `yaml:"paths,omitempty"`
	Auth          fileEdgeAuth `yaml:"auth"`
	ProxyProtocol bool         `yaml:"proxy_protocol"`
}

type fileEdgeRate struct {
	PerClient      float64 `yaml:"per_client"`
	PerClientBurst int     `yaml:"per_client_burst"`
	Total          float64 `yaml:"total"`
	TotalBurst     int     `yaml:"total_burst"`
}

type fileEdgeAuth struct {
	Bearer []string          `yaml:"bearer,omitempty"`
	Basic  map[string]string `yaml:"basic,omitempty"`
}

// ParseListenOff reads [ADDR]:PORT (or a bare PORT), or "" for no
// listener, as edge.http, edge.https and their flags take it.
func ParseListenOff(s string) (ListenAddr, error) {
	if s == "" {
		return ListenAddr{}, nil
	}
	return parseListen(s)
}

func (e Edge) file() fileEdge {
	f := fileEdge{
		HTTP:         listenOff(e.HTTP),
		HTTPS:        listenOff(e.HTTPS),
		Certificates: make([]fileCertificate, len(e.Certificates)),
		TCP:          texts(e.TCP, TCPRoute.String),
		OnlyListed:   e.OnlyListed,
		DialTimeout:  formatDuration(e.DialTimeout),
		Lease:        formatDuration(e.Lease),
	}
	for i, c := range e.Certificates {
		f.Certificates[i] = fileCertificate(c)
	}
	if len(e.Hostnames) > 0 {
		f.Hostnames = map[string]fileEdgeHostname{}
		for name, h := range e.Hostnames {
			fh := fileEdgeHostname{
				Peers:         h.Peers,
				Rate:          fileEdgeRate(h.Rate),
				Allow:         texts(h.Allow, netip.Prefix.String),
				Deny:          texts(h.Deny, netip.Prefix.String),
				Paths:         h.Paths,
				Auth:          fileEdgeAuth{Bearer: h.Auth.Bearer, Basic: h.Auth.Basic},
				ProxyProtocol: h.ProxyProtocol,
			}
			if len(h.Weights) > 0 {
				// A mapping in the rules' order, which decides.
				m := &yaml.Node{Kind: yaml.MappingNode}
				for _, w := range h.Weights {
					m.Content = append(m.Content,
						&yaml.Node{Kind: yaml.ScalarNode, Value: formatSelector(w.Labels)},
						&yaml.Node{Kind: yaml.ScalarNode, Tag: "!!int", Value: strconv.Itoa(w.Weight)})
				}
				fh.Weights = m
			}
			f.Hostnames[name] = fh
		}
	}
	return f
}
