package nat

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
)

// peerPolicy is the configuration the per-peer tests share: a global
// policy that opens one private range and closes one public service, and
// two peers with rules of their own.
func peerPolicy(t *testing.T) *Policy {
	return mustPolicy(t, PolicyOptions{
		LocalAddrs: []netip.Addr{netip.MustParseAddr("198.51.100.1")},
		Allow:      mustRules(t, "10.0.0.0/8", "tcp/203.0.113.0/24:80"),
		Deny:       mustRules(t, "10.9.0.0/16", "udp/9.9.9.9:53", "192.0.2.0/24"),
		Peers: map[string]PeerRules{
			"laptop": {
				// Open the office LAN and one port of the gateway host to
				// this peer only...
				Allow: mustRules(t, "192.168.10.0/24", "tcp/198.51.100.1:8443", "10.9.1.0/24", "udp/9.9.9.9:53"),
				// ...and close what everyone else may reach.
				Deny: mustRules(t, "10.1.0.0/16", "tcp/203.0.113.7:80", "tcp/192.168.10.1:22"),
			},
			"phone": {
				Deny: mustRules(t, "0.0.0.0/0", "::/0"),
			},
			"empty": {}, // no rules: exactly the global policy
		},
	})
}

func TestPolicyCheckPeer(t *testing.T) {
	p := peerPolicy(t)
	const (
		allowed        = ""
		peerDeny       = "of peer"
		globalDeny     = "deny rule"
		defaultPrivate = "private range"
	)
	for _, tc := range []struct {
		peer  string
		proto Proto
		dst   string
		want  string // allowed, or a fragment of the reason
	}{
		// The peer's Deny overrides the global Allow, for this peer only.
		{"laptop", TCP, "10.1.2.3:80", "deny rule 10.1.0.0/16 of peer laptop"},
		{"other", TCP, "10.1.2.3:80", allowed},
		{"", TCP, "10.1.2.3:80", allowed},
		{"laptop", TCP, "10.2.2.3:80", allowed}, // the global Allow still applies
		{"laptop", TCP, "203.0.113.7:80", peerDeny},
		{"laptop", TCP, "203.0.113.8:80", allowed},
		{"other", TCP, "203.0.113.7:80", allowed},
		// The peer's Allow opens a default-denied range for it alone.
		{"laptop", TCP, "192.168.10.5:443", allowed},
		{"laptop", ICMP, "192.168.10.5:0", allowed},
		{"laptop", TCP, "192.168.11.5:443", "192.168.0.0/16"},
		{"other", TCP, "192.168.10.5:443", "192.168.0.0/16"},
		{"", TCP, "192.168.10.5:443", "192.168.0.0/16"},
		{"empty", TCP, "192.168.10.5:443", "192.168.0.0/16"},
		// The peer's Deny beats its own Allow.
		{"laptop", TCP, "192.168.10.1:22", peerDeny},
		{"laptop", UDP, "192.168.10.1:22", allowed},
		// The peer's Allow beats the global Deny.
		{"laptop", TCP, "10.9.1.1:80", allowed},
		{"laptop", TCP, "10.9.2.1:80", "deny rule 10.9.0.0/16"},
		{"other", TCP, "10.9.1.1:80", "deny rule 10.9.0.0/16"},
		{"laptop", UDP, "9.9.9.9:53", allowed},
		{"other", UDP, "9.9.9.9:53", "deny rule udp/9.9.9.9:53"},
		// The peer's Allow opens the gateway host's own address.
		{"laptop", TCP, "198.51.100.1:8443", allowed},
		{"laptop", TCP, "198.51.100.1:22", "gateway host"},
		{"other", TCP, "198.51.100.1:8443", "gateway host"},
		// A peer that denies everything reaches nothing, allowed or not.
		{"phone", TCP, "8.8.8.8:443", "deny rule 0.0.0.0/0 of peer phone"},
		{"phone", UDP, "[2606:4700::1111]:53", "deny rule ::/0 of peer phone"},
		{"phone", TCP, "10.1.2.3:80", peerDeny},
		{"phone", TCP, "[::ffff:8.8.8.8]:443", "0.0.0.0/0"},
		// Peers without rules get the global policy, defaults included.
		{"empty", TCP, "8.8.8.8:443", allowed},
		{"empty", UDP, "192.0.2.1:53", "deny rule 192.0.2.0/24"},
		{"empty", UDP, "172.16.0.1:53", "172.16.0.0/12"},
		{"other", TCP, "127.0.0.1:80", "loopback"},
		{"laptop", TCP, "127.0.0.1:80", "loopback"},
		{"laptop", TCP, "[::ffff:192.168.10.5]:443", allowed},
		{"laptop", TCP, "172.16.0.1:80", defaultPrivate},
		{"laptop", UDP, "192.0.2.1:53", globalDeny},
	} {
		dst := netip.MustParseAddrPort(tc.dst)
		err := p.CheckPeer(tc.peer, tc.proto, dst)
		if tc.want == allowed {
			if err != nil {
				t.Errorf("peer %q %v %s: %v, want allowed", tc.peer, tc.proto, dst, err)
			}
			continue
		}
		if err == nil {
			t.Errorf("peer %q %v %s allowed, want denied (%s)", tc.peer, tc.proto, dst, tc.want)
			continue
		}
		var de *DeniedError
		if !errors.As(err, &de) || !errors.Is(err, ErrDenied) {
			t.Errorf("peer %q %v %s: %T %v, want a *DeniedError", tc.peer, tc.proto, dst, err, err)
			continue
		}
		if de.Peer != tc.peer || de.Dest != dst || de.Proto != tc.proto {
			t.Errorf("peer %q %v %s: DeniedError names peer %q, %v %v", tc.peer, tc.proto, dst, de.Peer, de.Proto, de.Dest)
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("peer %q %v %s: %q does not say %q", tc.peer, tc.proto, dst, err, tc.want)
		}
	}
}

// TestPolicyCheckPeerOrder walks one destination through every layer of
// the order: the peer's Deny, the peer's Allow, the global Deny, the global
// Allow, the defaults. Each row adds a rule at one layer; the outcome must
// be decided by the highest layer that has a matching rule.
func TestPolicyCheckPeerOrder(t *testing.T) {
	const dst = "10.5.5.5:443"
	rule := mustRules(t, "10.5.0.0/16")
	for _, tc := range []struct {
		peerDeny, peerAllow, deny, allow bool
		want                             string // "" allowed, else a fragment of the reason
	}{
		{want: "private range 10.0.0.0/8"},
		{allow: true, want: ""},
		{deny: true, want: "deny rule 10.5.0.0/16"},
		{deny: true, allow: true, want: "deny rule 10.5.0.0/16"},
		{peerAllow: true, want: ""},
		{peerAllow: true, deny: true, want: ""},
		{peerAllow: true, deny: true, allow: true, want: ""},
		{peerDeny: true, want: "of peer p"},
		{peerDeny: true, allow: true, want: "of peer p"},
		{peerDeny: true, peerAllow: true, want: "of peer p"},
		{peerDeny: true, peerAllow: true, deny: true, allow: true, want: "of peer p"},
	} {
		var opts PolicyOptions
		var pr PeerRules
		if tc.peerDeny {
			pr.Deny = rule
		}
		if tc.peerAllow {
			pr.Allow = rule
		}
		if tc.deny {
			opts.Deny = rule
		}
		if tc.allow {
			opts.Allow = rule
		}
		opts.Peers = map[string]PeerRules{"p": pr}
		p := mustPolicy(t, opts)
		err := p.CheckPeer("p", TCP, netip.MustParseAddrPort(dst))
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%+v: %v, want allowed", tc, err)
		case tc.want != "" && err == nil:
			t.Errorf("%+v: allowed, want denied (%s)", tc, tc.want)
		case tc.want != "" && !strings.Contains(err.Error(), tc.want):
			t.Errorf("%+v: %q does not say %q", tc, err, tc.want)
		}
		// Another peer and the global check see only the global layers.
		global := p.Check(TCP, netip.MustParseAddrPort(dst))
		other := p.CheckPeer("q", TCP, netip.MustParseAddrPort(dst))
		if (global == nil) != (other == nil) {
			t.Errorf("%+v: Check %v but CheckPeer of a peer without rules %v", tc, global, other)
		}
		if wantGlobal := !tc.deny && tc.allow; (global == nil) != wantGlobal {
			t.Errorf("%+v: Check = %v, want allowed %v", tc, global, wantGlobal)
		}
	}
}

func TestPolicyPeerRulesValidated(t *testing.T) {
	for _, tc := range []struct {
		peers map[string]PeerRules
		want  string
	}{
		{map[string]PeerRules{"laptop": {Allow: []Rule{{}}}}, "PolicyOptions.Peers[laptop].Allow[0]"},
		{map[string]PeerRules{"laptop": {Deny: []Rule{{Prefix: netip.MustParsePrefix("1.0.0.0/8")}, {Proto: ICMP, Prefix: netip.MustParsePrefix("1.0.0.0/8"), Ports: PortRange{1, 1}}}}}, "Peers[laptop].Deny[1]: icmp"},
	} {
		_, err := NewPolicy(PolicyOptions{LocalAddrs: []netip.Addr{}, Peers: tc.peers})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("NewPolicy(Peers %+v) = %v, want an error naming %q", tc.peers, err, tc.want)
		}
	}
}

// TestPolicyPeerRulesNormalized checks that per-peer rules are normalised
// like global ones: host bits cleared, mapped prefixes unmapped.
func TestPolicyPeerRulesNormalized(t *testing.T) {
	p := mustPolicy(t, PolicyOptions{Peers: map[string]PeerRules{
		"a": {Allow: []Rule{
			{Prefix: netip.MustParsePrefix("10.1.2.3/16")},
			{Prefix: netip.MustParsePrefix("::ffff:192.168.0.0/112")},
		}},
	}})
	for _, dst := range []string{"10.1.200.1:80", "192.168.3.4:80", "[::ffff:192.168.3.4]:80"} {
		if err := p.CheckPeer("a", TCP, netip.MustParseAddrPort(dst)); err != nil {
			t.Errorf("%s: %v", dst, err)
		}
	}
	if err := p.CheckPeer("a", TCP, netip.AddrPort{}); err == nil || !errors.Is(err, ErrDenied) {
		t.Errorf("invalid destination: %v", err)
	}
}

func TestPolicyCheckPeerDoesNotAllocate(t *testing.T) {
	p := peerPolicy(t)
	for _, tc := range []struct {
		peer string
		dst  string
	}{
		{"laptop", "192.168.10.5:443"}, // the peer's Allow
		{"laptop", "10.2.3.4:80"},      // the global Allow, past the peer's rules
		{"laptop", "8.8.8.8:53"},       // past every rule and the defaults
		{"other", "8.8.8.8:53"},        // a peer without rules
		{"", "[2606:4700::1]:443"},
		{"empty", "[::ffff:1.1.1.1]:443"},
	} {
		ap := netip.MustParseAddrPort(tc.dst)
		if n := testing.AllocsPerRun(1000, func() {
			if err := p.CheckPeer(tc.peer, TCP, ap); err != nil {
				t.Fatalf("peer %q %s: %v", tc.peer, ap, err)
			}
		}); n != 0 {
			t.Errorf("CheckPeer(%q, %s) allocates %v times", tc.peer, ap, n)
		}
	}
}

// TestPolicyOptionsNotRetained checks that a Policy keeps no reference to
// the caller's slices and map, so that a reload may build the next
// options from the same values without changing the live policy.
func TestPolicyOptionsNotRetained(t *testing.T) {
	allow := mustRules(t, "192.168.10.0/24")
	peers := map[string]PeerRules{"laptop": {Allow: allow}}
	p := mustPolicy(t, PolicyOptions{Peers: peers})
	dst := netip.MustParseAddrPort("192.168.10.5:443")
	allow[0] = mustRules(t, "8.8.8.8")[0]
	peers["laptop"] = PeerRules{}
	peers["other"] = PeerRules{Allow: mustRules(t, "192.168.10.0/24")}
	if err := p.CheckPeer("laptop", TCP, dst); err != nil {
		t.Errorf("laptop after changing the options: %v", err)
	}
	if err := p.CheckPeer("other", TCP, dst); err == nil {
		t.Error("peer added to the options map after NewPolicy is allowed")
	}
}

func BenchmarkPolicyCheckPeer(b *testing.B) {
	var rules []Rule
	for i := range 16 {
		rules = append(rules, Rule{Prefix: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i), 0, 0}), 16)})
	}
	p, err := NewPolicy(PolicyOptions{
		LocalAddrs: []netip.Addr{},
		Allow:      rules,
		Peers:      map[string]PeerRules{"laptop": {Allow: rules, Deny: rules[:4]}},
	})
	if err != nil {
		b.Fatal(err)
	}
	dst := netip.MustParseAddrPort("8.8.8.8:443")
	b.ReportAllocs()
	for b.Loop() {
		if p.CheckPeer("laptop", TCP, dst) != nil {
			b.Fatal("denied")
		}
	}
}
