package nat

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
)

// Rule matches destinations by protocol, address prefix and port range.
type Rule struct {
	// Proto is the protocol the rule applies to; zero means any.
	Proto Proto
	// Prefix is the destination range. A single address is a /32 or /128.
	Prefix netip.Prefix
	// Ports is the destination port range; the zero value means any port.
	// A rule with ports matches only TCP and UDP flows, since ICMP echo has
	// no destination port.
	Ports PortRange
}

// ParseRule parses a rule written as "[tcp/|udp/|icmp/]CIDR-or-ADDR[:PORTS]",
// for example "10.0.0.0/8", "udp/192.0.2.1:53", "tcp/203.0.113.0/24:8000-8999",
// "2001:db8::/32" or, with ports, "[2001:db8::/32]:443" and "tcp/[::1]:80-90".
// A bare address is a /32 or /128 prefix; host bits below the prefix length
// are cleared; an IPv4-mapped IPv6 prefix is turned into its IPv4 form.
func ParseRule(s string) (Rule, error) {
	var r Rule
	rest := strings.TrimSpace(s)
	if proto, after, ok := strings.Cut(rest, "/"); ok {
		switch strings.ToLower(proto) {
		case "tcp":
			r.Proto, rest = TCP, after
		case "udp":
			r.Proto, rest = UDP, after
		case "icmp":
			r.Proto, rest = ICMP, after
		default:
			// Not a protocol: the slash belongs to a CIDR, unless what
			// precedes it cannot be an address either.
			if !looksLikeAddr(proto) {
				return Rule{}, fmt.Errorf("nat: rule %q: unknown protocol %q (want tcp, udp or icmp)", s, proto)
			}
		}
	}
	if rest == "" {
		return Rule{}, fmt.Errorf("nat: rule %q: missing address", s)
	}

	addr, ports := rest, ""
	if strings.HasPrefix(rest, "[") {
		end := strings.IndexByte(rest, ']')
		if end < 0 {
			return Rule{}, fmt.Errorf("nat: rule %q: missing ] after %q", s, rest)
		}
		addr = rest[1:end]
		after := rest[end+1:]
		if after != "" {
			if after[0] != ':' || len(after) == 1 {
				return Rule{}, fmt.Errorf("nat: rule %q: want :PORTS after ], have %q", s, after)
			}
			ports = after[1:]
		}
	} else if strings.Count(rest, ":") == 1 {
		// One colon can only separate an IPv4 address from ports; IPv6
		// addresses have at least two and take brackets to carry ports.
		addr, ports, _ = strings.Cut(rest, ":")
		if ports == "" {
			return Rule{}, fmt.Errorf("nat: rule %q: empty port range after ':'", s)
		}
	}

	p, err := parsePrefix(addr)
	if err != nil {
		return Rule{}, fmt.Errorf("nat: rule %q: %w", s, err)
	}
	r.Prefix = p
	if ports != "" {
		pr, err := ParsePortRange(ports)
		if err != nil {
			return Rule{}, fmt.Errorf("nat: rule %q: %w", s, err)
		}
		r.Ports = pr
	}
	if err := r.validate(); err != nil {
		return Rule{}, fmt.Errorf("nat: rule %q: %w", s, err)
	}
	return r, nil
}

func looksLikeAddr(s string) bool {
	return strings.ContainsAny(s, ".:") || strings.HasPrefix(s, "[")
}

func parsePrefix(s string) (netip.Prefix, error) {
	if strings.Contains(s, "%") {
		return netip.Prefix{}, fmt.Errorf("address %q has a zone, which rules do not take", s)
	}
	var p netip.Prefix
	if strings.Contains(s, "/") {
		var err error
		p, err = netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("bad prefix %q", s)
		}
	} else {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("bad address %q", s)
		}
		p = netip.PrefixFrom(a, a.BitLen())
	}
	return normalizePrefix(p), nil
}

// normalizePrefix clears host bits and rewrites an IPv4-mapped IPv6 prefix
// as IPv4, since Check unmaps destinations before matching.
func normalizePrefix(p netip.Prefix) netip.Prefix {
	if a := p.Addr(); a.Is4In6() && p.Bits() >= 96 {
		p = netip.PrefixFrom(a.Unmap(), p.Bits()-96)
	}
	return p.Masked()
}

func (r Rule) validate() error {
	switch r.Proto {
	case 0, TCP, UDP, ICMP:
	default:
		return fmt.Errorf("unknown protocol %d", r.Proto)
	}
	if !r.Prefix.IsValid() {
		return errors.New("no address prefix")
	}
	if r.Proto == ICMP && !r.Ports.IsZero() {
		return errors.New("icmp rules take no ports")
	}
	if !r.Ports.IsZero() && (r.Ports.Lo == 0 || r.Ports.Hi < r.Ports.Lo) {
		return fmt.Errorf("bad port range %d-%d", r.Ports.Lo, r.Ports.Hi)
	}
	return nil
}

// String formats r the way ParseRule reads it.
func (r Rule) String() string {
	var b strings.Builder
	if r.Proto != 0 {
		b.WriteString(r.Proto.String())
		b.WriteByte('/')
	}
	addr := r.Prefix.String()
	if r.Prefix.IsSingleIP() {
		addr = r.Prefix.Addr().String()
	}
	if r.Ports.IsZero() {
		b.WriteString(addr)
		return b.String()
	}
	if r.Prefix.Addr().Is6() {
		b.WriteByte('[')
		b.WriteString(addr)
		b.WriteByte(']')
	} else {
		b.WriteString(addr)
	}
	b.WriteByte(':')
	b.WriteString(r.Ports.String())
	return b.String()
}

// match reports whether r matches a flow of proto to addr (unmapped, no
// zone) and port.
func (r Rule) match(proto Proto, addr netip.Addr, port uint16) bool {
	if r.Proto != 0 && r.Proto != proto {
		return false
	}
	if !r.Ports.IsZero() && (proto == ICMP || !r.Ports.Contains(port)) {
		return false
	}
	return r.Prefix.Contains(addr)
}

// ErrDenied is what every error from Policy.Check and Policy.CheckPeer
// matches with errors.Is.
var ErrDenied = errors.New("nat: destination denied by policy")

// DeniedError reports a destination that the policy does not let a client
// reach, and why.
type DeniedError struct {
	Dest  netip.AddrPort
	Proto Proto
	// Peer is the peer whose flow was denied; empty for Check, which does
	// not know it.
	Peer   string
	Reason string
}

func (e *DeniedError) Error() string {
	dest := e.Dest.String()
	if e.Proto == ICMP {
		dest = e.Dest.Addr().String()
	}
	return fmt.Sprintf("%s %s denied: %s", e.Proto, dest, e.Reason)
}

// Is makes errors.Is(err, ErrDenied) true.
func (e *DeniedError) Is(target error) bool { return target == ErrDenied }

// PeerRules are one peer's own rules, consulted before the global ones.
type PeerRules struct {
	// Allow opens destinations for this peer only, including ones that the
	// global Deny rules or the defaults close; the host's own and
	// broadcast addresses only when a rule names them (see Check).
	Allow []Rule
	// Deny closes destinations for this peer; it wins over everything else.
	Deny []Rule
}

// PolicyOptions configure a Policy. The zero value denies the built-in
// default ranges and allows everything else.
type PolicyOptions struct {
	// Allow opens destinations, including ones the defaults deny; the
	// host's own and broadcast addresses only when a rule names them
	// (see Check).
	Allow []Rule
	// Deny closes destinations; it wins over Allow, though not over a
	// peer's own Allow rules.
	Deny []Rule
	// Peers holds per-peer rules by peer name, as CheckPeer is given it.
	// A peer without an entry has only the global rules.
	Peers map[string]PeerRules
	// LocalAddrs are the gateway host's own addresses, unreachable unless
	// an Allow rule names one exactly (see Check). Nil means discover
	// them, and LocalNets, from the host's interfaces when the policy is
	// made; an empty, non-nil slice means none.
	LocalAddrs []netip.Addr
	// LocalNets are the host's connected subnets (an interface's address
	// and prefix length): the broadcast address of each IPv4 one is
	// unreachable unless an Allow rule names it exactly. They are not
	// discovered when LocalAddrs is given; nil means none then.
	LocalNets []netip.Prefix
}

// Policy decides which destinations clients may reach. It is immutable and
// safe for concurrent use; to change it, make a new one and swap it in.
type Policy struct {
	allow, deny []Rule
	peers       map[string]peerRules
	local       map[netip.Addr]struct{}
	broadcast   map[netip.Addr]struct{} // the host's subnets' broadcast addresses
}

type peerRules struct {
	allow, deny []Rule
}

// defaultDeny lists what no client reaches unless a rule allows it: the
// addresses that would let a tunnel client into the gateway itself, its
// host's networks or its cloud's metadata service.
var defaultDeny = []struct {
	prefix netip.Prefix
	reason string
}{
	{netip.MustParsePrefix("0.0.0.0/32"), "unspecified address 0.0.0.0"},
	{netip.MustParsePrefix("::/128"), "unspecified address ::"},
	{netip.MustParsePrefix("0.0.0.0/8"), "this-network range 0.0.0.0/8"},
	{netip.MustParsePrefix("127.0.0.0/8"), "loopback range 127.0.0.0/8"},
	{netip.MustParsePrefix("::1/128"), "loopback address ::1"},
	{netip.MustParsePrefix("169.254.169.254/32"), "cloud metadata address 169.254.169.254"},
	{netip.MustParsePrefix("169.254.0.0/16"), "link-local range 169.254.0.0/16"},
	{netip.MustParsePrefix("fe80::/10"), "link-local range fe80::/10"},
	{netip.MustParsePrefix("10.0.0.0/8"), "private range 10.0.0.0/8"},
	{netip.MustParsePrefix("172.16.0.0/12"), "private range 172.16.0.0/12"},
	{netip.MustParsePrefix("192.168.0.0/16"), "private range 192.168.0.0/16"},
	{netip.MustParsePrefix("fc00::/7"), "unique local range fc00::/7"},
	{netip.MustParsePrefix("100.64.0.0/10"), "CGNAT range 100.64.0.0/10"},
	{netip.MustParsePrefix("224.0.0.0/4"), "multicast range 224.0.0.0/4"},
	{netip.MustParsePrefix("ff00::/8"), "multicast range ff00::/8"},
	{netip.MustParsePrefix("255.255.255.255/32"), "broadcast address 255.255.255.255"},
}

// NewPolicy returns a policy with opts' rules in front of the defaults.
func NewPolicy(opts PolicyOptions) (*Policy, error) {
	p := &Policy{local: make(map[netip.Addr]struct{}), broadcast: make(map[netip.Addr]struct{})}
	var err error
	if p.allow, err = normalizeRules("Allow", opts.Allow); err != nil {
		return nil, err
	}
	if p.deny, err = normalizeRules("Deny", opts.Deny); err != nil {
		return nil, err
	}
	if len(opts.Peers) > 0 {
		p.peers = make(map[string]peerRules, len(opts.Peers))
		for name, pr := range opts.Peers {
			var r peerRules
			field := fmt.Sprintf("Peers[%s].", name)
			if r.allow, err = normalizeRules(field+"Allow", pr.Allow); err != nil {
				return nil, err
			}
			if r.deny, err = normalizeRules(field+"Deny", pr.Deny); err != nil {
				return nil, err
			}
			if len(r.allow) > 0 || len(r.deny) > 0 {
				p.peers[name] = r
			}
		}
	}
	local, nets := opts.LocalAddrs, opts.LocalNets
	if local == nil {
		if local, nets, err = interfaceAddrs(); err != nil {
			return nil, fmt.Errorf("nat: policy: discover local addresses: %w", err)
		}
	}
	for i, a := range local {
		if !a.IsValid() {
			return nil, fmt.Errorf("nat: PolicyOptions.LocalAddrs[%d] is not a valid address", i)
		}
		p.local[a.Unmap().WithZone("")] = struct{}{}
	}
	for i, n := range nets {
		if !n.IsValid() {
			return nil, fmt.Errorf("nat: PolicyOptions.LocalNets[%d] is not a valid prefix", i)
		}
		if b, ok := broadcastOf(n); ok {
			p.broadcast[b] = struct{}{}
		}
	}
	return p, nil
}

// broadcastOf is the broadcast address of an IPv4 subnet (RFC 919): its
// last address. Subnets of /31 and /32 have none (RFC 3021), nor has
// IPv6.
func broadcastOf(n netip.Prefix) (netip.Addr, bool) {
	n = normalizePrefix(n)
	if !n.Addr().Is4() || n.Bits() > 30 {
		return netip.Addr{}, false
	}
	b := n.Addr().As4()
	host := uint32(1)<<(32-n.Bits()) - 1
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3]) | host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}), true
}

func normalizeRules(field string, rules []Rule) ([]Rule, error) {
	out := make([]Rule, len(rules))
	for i, r := range rules {
		if err := r.validate(); err != nil {
			return nil, fmt.Errorf("nat: PolicyOptions.%s[%d]: %w", field, i, err)
		}
		r.Prefix = normalizePrefix(r.Prefix)
		out[i] = r
	}
	return out, nil
}

// interfaceAddrs lists the host's addresses, and the subnets of those
// that an interface has with a prefix length.
func interfaceAddrs() ([]netip.Addr, []netip.Prefix, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, nil, err
	}
	out := make([]netip.Addr, 0, len(addrs))
	var nets []netip.Prefix
	for _, a := range addrs {
		var ip net.IP
		bits := -1
		switch a := a.(type) {
		case *net.IPNet:
			ip = a.IP
			if ones, size := a.Mask.Size(); size != 0 {
				bits = ones
				if size == 128 && ip.To4() != nil {
					bits -= 96
				}
			}
		case *net.IPAddr:
			ip = a.IP
		default:
			continue
		}
		addr, ok := netip.AddrFromSlice(ip)
		if !ok {
			continue
		}
		addr = addr.Unmap()
		out = append(out, addr)
		if bits >= 0 && bits <= addr.BitLen() {
			nets = append(nets, netip.PrefixFrom(addr, bits))
		}
	}
	return out, nets, nil
}

// guarded reports whether addr is closed even to an Allow rule that
// covers it without naming it: an address of the gateway host, whose services a
// range meant for a network must not open (allowing 10.0.0.0/8 to reach
// the office must not open the gateway's own 10.0.0.5), or a broadcast
// address, which reaches every host of a subnet at once.
func (p *Policy) guarded(addr netip.Addr) bool {
	_, local := p.local[addr]
	_, bcast := p.broadcast[addr]
	// All of loopback is the host, not only the addresses its interfaces
	// list, and so is the unspecified address: a connection to 0.0.0.0
	// or :: reaches the host's own services, as a connection to 127.0.0.2
	// reaches those listening on 127.0.0.0/8 or on every address.
	return local || bcast || addr == limitedBroadcast || addr.IsLoopback() || addr.IsUnspecified()
}

// guardReason is why a guarded address is denied.
func (p *Policy) guardReason(addr netip.Addr) string {
	if _, ok := p.local[addr]; ok {
		return "address of the gateway host " + addr.String()
	}
	if addr == limitedBroadcast {
		return "broadcast address 255.255.255.255"
	}

	return "broadcast address " + addr.String() + " of the gateway host's subnet"
}

var limitedBroadcast = netip.AddrFrom4([4]byte{255, 255, 255, 255})

// allows reports whether r opens a flow of proto to addr and port: r
// matches it and, if addr is guarded, names it: as itself, or, for a
// loopback address, with a range inside loopback, which can only ever
// mean the host (the range 127.0.0.0/8 names the host's 127.0.0.1 as
// plainly as 127.0.0.1/32 does; 0.0.0.0/0 does not).
func (r Rule) allows(proto Proto, addr netip.Addr, port uint16, guarded bool) bool {
	if !r.match(proto, addr, port) {
		return false
	}
	if !guarded || (r.Prefix.IsSingleIP() && r.Prefix.Addr() == addr) {
		return true
	}
	return addr.IsLoopback() && r.Prefix.Addr().IsLoopback() && r.Prefix.Bits() >= loopback4.Bits()
}

var loopback4 = netip.MustParsePrefix("127.0.0.0/8")

// Check returns nil if a client may open a flow of proto to dst, or a
// *DeniedError saying why not. An explicit Deny rule wins; otherwise an
// explicit Allow rule allows; otherwise the gateway host's own addresses and
// the default ranges (unspecified, this-network, loopback, link-local,
// private, unique local, CGNAT, multicast, broadcast) are denied, in their
// IPv4-mapped IPv6 forms too; everything else is allowed. The host's own
// addresses and broadcast addresses (255.255.255.255, and that of each of
// the host's IPv4 subnets) are opened only by an Allow rule that names
// the address itself (a /32 or /128), not by a range that contains it.
//
// Check knows nothing of peers; CheckPeer applies a peer's own rules first.
func (p *Policy) Check(proto Proto, dst netip.AddrPort) error {
	addr := dst.Addr().Unmap().WithZone("")
	if !addr.IsValid() {
		return &DeniedError{Dest: dst, Proto: proto, Reason: "invalid address"}
	}
	if d := p.check(proto, dst, addr); d != nil {
		return d
	}
	return nil
}

// CheckPeer is Check for a flow of the named peer. The peer's own Deny
// rules come first, then its own Allow rules, then the global Deny and
// Allow rules and the defaults, as in Check. A peer without rules of its
// own is checked as Check would; so is the empty name, the only peer of a
// gateway that has no tunnel peers.
func (p *Policy) CheckPeer(peer string, proto Proto, dst netip.AddrPort) error {
	addr := dst.Addr().Unmap().WithZone("")
	if !addr.IsValid() {
		return &DeniedError{Dest: dst, Proto: proto, Peer: peer, Reason: "invalid address"}
	}
	if r, ok := p.peers[peer]; ok {
		port := dst.Port()
		for i := range r.deny {
			if r.deny[i].match(proto, addr, port) {
				return &DeniedError{Dest: dst, Proto: proto, Peer: peer,
					Reason: "deny rule " + r.deny[i].String() + " of peer " + peer}
			}
		}
		guarded := p.guarded(addr)
		for i := range r.allow {
			if r.allow[i].allows(proto, addr, port, guarded) {
				return nil
			}
		}
	}
	if d := p.check(proto, dst, addr); d != nil {
		d.Peer = peer
		return d
	}
	return nil
}

// check applies the global rules and the defaults to dst, whose address
// has been unmapped and stripped of its zone as addr. It returns a concrete
// type so that callers can fill in the peer; they must not return a nil one
// as an error.
func (p *Policy) check(proto Proto, dst netip.AddrPort, addr netip.Addr) *DeniedError {
	port := dst.Port()
	for i := range p.deny {
		if p.deny[i].match(proto, addr, port) {
			return &DeniedError{Dest: dst, Proto: proto, Reason: "deny rule " + p.deny[i].String()}
		}
	}
	guarded := p.guarded(addr)
	for i := range p.allow {
		if p.allow[i].allows(proto, addr, port, guarded) {
			return nil
		}
	}
	if guarded {
		_, local := p.local[addr]
		_, bcast := p.broadcast[addr]
		// The rest of loopback and the unspecified addresses are in the
		// default ranges, whose reason names the range.
		if local || bcast || !(addr.IsLoopback() || addr.IsUnspecified()) {
			return &DeniedError{Dest: dst, Proto: proto, Reason: p.guardReason(addr)}
		}
	}
	for i := range defaultDeny {
		if defaultDeny[i].prefix.Contains(addr) {
			return &DeniedError{Dest: dst, Proto: proto, Reason: defaultDeny[i].reason}
		}
	}
	return nil
}
