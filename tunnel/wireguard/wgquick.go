package wireguard

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
)

// Config is a wg-quick configuration file: the [Interface] section and one
// [Peer] section per peer. Client configurations that sluice hands out are
// rendered from it, and configurations users bring are parsed into it.
type Config struct {
	// Interface is the [Interface] section.
	Interface Interface
	// Peers are the [Peer] sections, in file order.
	Peers []ConfigPeer
}

// Interface is the [Interface] section of a wg-quick configuration.
type Interface struct {
	// PrivateKey is the interface's private key. Required.
	PrivateKey Key
	// Addresses are the tunnel addresses with their prefix lengths
	// (Address).
	Addresses []netip.Prefix
	// DNS are the resolvers to use while the tunnel is up. wg-quick also
	// takes search domains here; this type does not hold them and
	// ParseConfig rejects them.
	DNS []netip.Addr
	// MTU of the interface; 0 leaves the choice to wg-quick.
	MTU int
	// ListenPort is the UDP port to listen on; 0 means any.
	ListenPort int
}

// ConfigPeer is one [Peer] section of a wg-quick configuration.
type ConfigPeer struct {
	// PublicKey identifies the peer. Required.
	PublicKey Key
	// PresharedKey is mixed into the handshake; zero means none.
	PresharedKey Key
	// Endpoint is HOST:PORT, where HOST may be a DNS name, an IPv4 address
	// or an IPv6 address in brackets; empty means none.
	Endpoint string
	// AllowedIPs are the prefixes routed to the peer.
	AllowedIPs []netip.Prefix
	// PersistentKeepalive is the keepalive interval in seconds; 0 is off.
	PersistentKeepalive int
}

// MTU limits accepted in a configuration: the IPv4 minimum and the largest
// IP packet.
const (
	minConfigMTU = 68
	maxConfigMTU = 65535
)

// String renders c as canonical wg-quick text, which wg-quick and the
// official WireGuard apps accept: [Interface] with PrivateKey, Address, DNS,
// MTU and ListenPort, then each [Peer] with PublicKey, PresharedKey,
// Endpoint, AllowedIPs and PersistentKeepalive, in that order, each
// section separated by a blank line. Settings that are empty or zero are
// left out, except PrivateKey and PublicKey.
func (c *Config) String() string {
	var b strings.Builder
	b.WriteString("[Interface]\n")
	writeSetting(&b, "PrivateKey", c.Interface.PrivateKey.String())
	if len(c.Interface.Addresses) > 0 {
		writeSetting(&b, "Address", joinList(c.Interface.Addresses))
	}
	if len(c.Interface.DNS) > 0 {
		writeSetting(&b, "DNS", joinList(c.Interface.DNS))
	}
	if c.Interface.MTU != 0 {
		writeSetting(&b, "MTU", strconv.Itoa(c.Interface.MTU))
	}
	if c.Interface.ListenPort != 0 {
		writeSetting(&b, "ListenPort", strconv.Itoa(c.Interface.ListenPort))
	}
	for _, p := range c.Peers {
		b.WriteString("\n[Peer]\n")
		writeSetting(&b, "PublicKey", p.PublicKey.String())
		if !p.PresharedKey.IsZero() {
			writeSetting(&b, "PresharedKey", p.PresharedKey.String())
		}
		if p.Endpoint != "" {
			writeSetting(&b, "Endpoint", p.Endpoint)
		}
		if len(p.AllowedIPs) > 0 {
			writeSetting(&b, "AllowedIPs", joinList(p.AllowedIPs))
		}
		if p.PersistentKeepalive != 0 {
			writeSetting(&b, "PersistentKeepalive", strconv.Itoa(p.PersistentKeepalive))
		}
	}
	return b.String()
}

func writeSetting(b *strings.Builder, key, value string) {
	b.WriteString(key)
	b.WriteString(" = ")
	b.WriteString(value)
	b.WriteByte('\n')
}

func joinList[T fmt.Stringer](items []T) string {
	s := make([]string, len(items))
	for i, it := range items {
		s[i] = it.String()
	}
	return strings.Join(s, ", ")
}

// Section and key names as wg-quick spells them. wg-quick matches them
// without regard to case.
const (
	sectionInterface = "Interface"
	sectionPeer      = "Peer"
)

// interfaceKeys maps the lower-case form of each [Interface] key to its
// canonical spelling. Keys that map to "" are wg-quick's own (hooks, routing
// table, saving) or the apps' (application filters): valid in a file, of no
// use to sluice, and skipped.
var interfaceKeys = map[string]string{
	"privatekey": "PrivateKey",
	"address":    "Address",
	"dns":        "DNS",
	"mtu":        "MTU",
	"listenport": "ListenPort",

	"fwmark":               "",
	"table":                "",
	"preup":                "",
	"postup":               "",
	"predown":              "",
	"postdown":             "",
	"saveconfig":           "",
	"includedapplications": "",
	"excludedapplications": "",
}

// peerKeys is interfaceKeys for [Peer].
var peerKeys = map[string]string{
	"publickey":           "PublicKey",
	"presharedkey":        "PresharedKey",
	"endpoint":            "Endpoint",
	"allowedips":          "AllowedIPs",
	"persistentkeepalive": "PersistentKeepalive",
}

// listKeys may appear on several lines, each adding to the list, as wg-quick
// allows.
var listKeys = map[string]bool{"Address": true, "DNS": true, "AllowedIPs": true}

// configParser holds the state of one ParseConfig call.
type configParser struct {
	cfg           Config
	section       string         // "" before the first section header
	interfaceLine int            // line of [Interface], 0 if not seen
	peerLine      int            // line of the current [Peer]
	set           map[string]int // canonical key → line, for the current section
	peerLines     map[Key]int    // public key → line, to catch duplicate peers
}

// ParseConfig parses wg-quick text. It accepts what wg-quick accepts:
// comments from '#' to the end of the line, blank lines, keys and section
// names in any case, spaces around '=' and in comma-separated lists, and
// Address, DNS and AllowedIPs on several lines. Keys that only wg-quick or
// the apps use (PostUp, Table, SaveConfig, ...) are skipped. Unknown
// sections and keys are errors, and every error names the line and the key.
func ParseConfig(text string) (*Config, error) {
	p := &configParser{peerLines: make(map[Key]int)}
	// Editors on Windows may start the file with a byte-order mark.
	text = strings.TrimPrefix(text, "\ufeff")
	n := 0
	for line := range strings.Lines(text) {
		n++
		if err := p.line(n, line); err != nil {
			return nil, configError(n, err)
		}
	}
	if err := p.finishSection(); err != nil {
		return nil, configError(n, err)
	}
	if p.interfaceLine == 0 {
		return nil, errors.New("wireguard: config: no [Interface] section")
	}
	return &p.cfg, nil
}

// lineError is an error that belongs to another line than the one being
// parsed, such as a section that ended without its required key.
type lineError struct {
	line int
	err  error
}

func (e *lineError) Error() string { return e.err.Error() }

// configError prefixes err with the line it belongs to: n, unless err is a
// lineError.
func configError(n int, err error) error {
	if le, ok := err.(*lineError); ok {
		n, err = le.line, le.err
	}
	return fmt.Errorf("wireguard: config: line %d: %w", n, err)
}

func (p *configParser) line(n int, line string) error {
	if i := strings.IndexByte(line, '#'); i >= 0 {
		line = line[:i]
	}
	line = strings.TrimSpace(line)
	if line == "" {
		return nil
	}
	if strings.HasPrefix(line, "[") {
		return p.header(n, line)
	}
	rawKey, value, ok := strings.Cut(line, "=")
	if !ok {
		return errors.New(`expected "Key = Value" or a [Section] header`)
	}
	rawKey, value = strings.TrimSpace(rawKey), strings.TrimSpace(value)
	if rawKey == "" {
		return errors.New(`expected "Key = Value": the key is missing`)
	}
	var keys map[string]string
	switch p.section {
	case "":
		return fmt.Errorf("%s: setting outside of a section ([Interface] or [Peer] must come first)", rawKey)
	case sectionInterface:
		keys = interfaceKeys
	case sectionPeer:
		keys = peerKeys
	}
	key, known := keys[strings.ToLower(rawKey)]
	if !known {
		return fmt.Errorf("%s: unknown key in [%s]", rawKey, p.section)
	}
	if key == "" {
		return nil // wg-quick's own
	}
	if first, dup := p.set[key]; dup && !listKeys[key] {
		return fmt.Errorf("%s: set twice in one section (first on line %d)", key, first)
	}
	p.set[key] = n
	if err := p.setting(n, key, value); err != nil {
		return fmt.Errorf("%s: %w", key, err)
	}
	return nil
}

func (p *configParser) header(n int, line string) error {
	if !strings.HasSuffix(line, "]") {
		return fmt.Errorf("section header %q has no closing ']'", line)
	}
	if err := p.finishSection(); err != nil {
		return err
	}
	name := strings.TrimSpace(line[1 : len(line)-1])
	switch {
	case strings.EqualFold(name, sectionInterface):
		if p.interfaceLine != 0 {
			return fmt.Errorf("second [Interface] section (first on line %d)", p.interfaceLine)
		}
		p.section, p.interfaceLine = sectionInterface, n
	case strings.EqualFold(name, sectionPeer):
		p.section, p.peerLine = sectionPeer, n
		p.cfg.Peers = append(p.cfg.Peers, ConfigPeer{})
	default:
		return fmt.Errorf("unknown section [%s] (want [Interface] or [Peer])", name)
	}
	p.set = make(map[string]int)
	return nil
}

// finishSection checks that the section just ended has its required key.
func (p *configParser) finishSection() error {
	switch p.section {
	case sectionInterface:
		if p.cfg.Interface.PrivateKey.IsZero() {
			return &lineError{p.interfaceLine, errors.New("[Interface] has no PrivateKey")}
		}
	case sectionPeer:
		if p.cfg.Peers[len(p.cfg.Peers)-1].PublicKey.IsZero() {
			return &lineError{p.peerLine, errors.New("[Peer] has no PublicKey")}
		}
	}
	return nil
}

func (p *configParser) setting(n int, key, value string) error {
	iface := &p.cfg.Interface
	var peer *ConfigPeer
	if p.section == sectionPeer {
		peer = &p.cfg.Peers[len(p.cfg.Peers)-1]
	}
	switch key {
	case "PrivateKey":
		return parseConfigKey(value, &iface.PrivateKey)
	case "Address":
		return parseList(value, &iface.Addresses, parseAddressOrPrefix)
	case "DNS":
		return parseList(value, &iface.DNS, func(s string) (netip.Addr, error) {
			a, err := netip.ParseAddr(s)
			if err != nil {
				return netip.Addr{}, fmt.Errorf("%q is not an IP address (DNS search domains are not supported)", s)
			}
			return a, nil
		})
	case "MTU":
		return parseInt(value, &iface.MTU, minConfigMTU, maxConfigMTU)
	case "ListenPort":
		return parseInt(value, &iface.ListenPort, 0, 65535)
	case "PublicKey":
		if err := parseConfigKey(value, &peer.PublicKey); err != nil {
			return err
		}
		if first, dup := p.peerLines[peer.PublicKey]; dup {
			return fmt.Errorf("peer %s already has a [Peer] section (PublicKey on line %d)", peer.PublicKey.short(), first)
		}
		p.peerLines[peer.PublicKey] = n
		return nil
	case "PresharedKey":
		return parseConfigKey(value, &peer.PresharedKey)
	case "Endpoint":
		if err := checkEndpoint(value); err != nil {
			return err
		}
		peer.Endpoint = value
		return nil
	case "AllowedIPs":
		return parseList(value, &peer.AllowedIPs, parseAddressOrPrefix)
	case "PersistentKeepalive":
		if strings.EqualFold(value, "off") {
			peer.PersistentKeepalive = 0
			return nil
		}
		return parseInt(value, &peer.PersistentKeepalive, 0, 65535)
	}
	panic("wireguard: config key without parser: " + key)
}

// parseConfigKey parses a base64 key; ParseKey's errors already avoid
// quoting it, so a mistyped private key does not end up in logs.
func parseConfigKey(value string, k *Key) error {
	v, err := ParseKey(value)
	if err != nil {
		return errors.New(strings.TrimPrefix(err.Error(), "wireguard: "))
	}
	*k = v
	return nil
}

// parseList appends the comma-separated items of value to list. Empty items
// (a trailing comma, an empty value) are skipped, as wg-quick skips them.
func parseList[T any](value string, list *[]T, parse func(string) (T, error)) error {
	for item := range strings.SplitSeq(value, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		v, err := parse(item)
		if err != nil {
			return err
		}
		*list = append(*list, v)
	}
	return nil
}

// parseAddressOrPrefix parses "10.0.0.2/24", or a bare address meaning a
// single host ("10.0.0.2" is 10.0.0.2/32), which wg and wg-quick accept.
// Host bits are kept: an Address needs them.
func parseAddressOrPrefix(s string) (netip.Prefix, error) {
	if !strings.Contains(s, "/") {
		a, err := netip.ParseAddr(s)
		if err != nil || a.Zone() != "" {
			return netip.Prefix{}, fmt.Errorf("%q is not an IP address or prefix", s)
		}
		return netip.PrefixFrom(a, a.BitLen()), nil
	}
	pfx, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%q is not an IP prefix", s)
	}
	return pfx, nil
}

func parseInt(value string, v *int, lo, hi int) error {
	i, err := strconv.Atoi(value)
	if err != nil {
		return fmt.Errorf("%q is not a number", value)
	}
	if i < lo || i > hi {
		return fmt.Errorf("%d out of range [%d, %d]", i, lo, hi)
	}
	*v = i
	return nil
}

// checkEndpoint accepts HOST:PORT with a numeric port, where HOST is an IP
// address (IPv6 in brackets) or a DNS name. Names are resolved by whoever
// uses the configuration, not here.
func checkEndpoint(s string) error {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return fmt.Errorf("%q is not HOST:PORT (an IPv6 address goes in brackets)", s)
	}
	if p, err := strconv.ParseUint(port, 10, 16); err != nil || p == 0 {
		return fmt.Errorf("%q: port %q is not a number in [1, 65535]", s, port)
	}
	if host == "" {
		return fmt.Errorf("%q has no host", s)
	}
	if strings.Contains(host, ":") {
		if _, err := netip.ParseAddr(host); err != nil {
			return fmt.Errorf("%q: %q is not an IPv6 address", s, host)
		}
		return nil
	}
	for _, r := range host {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '-' || r == '_') {
			return fmt.Errorf("%q: host %q is neither an IP address nor a DNS name", s, host)
		}
	}
	return nil
}
