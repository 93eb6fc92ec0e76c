package nat

import (
	"net/netip"
	"strings"
	"testing"
)

// FuzzParseRule parses arbitrary --allow/--deny rules. A rule that parses
// is valid, its prefix is normalised (masked, IPv4-mapped turned into
// IPv4), and its String form parses back to the same rule and prints the
// same: what `sluice config check` echoes is what the gateway enforces.
// Every rule it produces must also be accepted by NewPolicy.
func FuzzParseRule(f *testing.F) {
	for _, s := range []string{
		"10.0.0.0/8", "udp/192.0.2.1:53", "tcp/203.0.113.0/24:8000-8999",
		"2001:db8::/32", "[2001:db8::/32]:443", "tcp/[::1]:80-90", "icmp/0.0.0.0/0",
		"::ffff:10.0.0.0/104", "1.2.3.4:0", "[::1]:", "tcp/", "fe80::1%eth0", "0.0.0.0/0:25",
		"sctp/1.2.3.4", " TCP/1.2.3.4:1 - 2 ", "[10.0.0.1]:5",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		r, err := ParseRule(s)
		// An address has a digit or (IPv6) a colon; without either there
		// is no rule.
		if err == nil && !strings.ContainsAny(s, "0123456789:") {
			t.Fatalf("ParseRule(%q) accepted a rule without an address: %+v", s, r)
		}
		if err != nil {
			if r != (Rule{}) {
				t.Fatalf("ParseRule(%q) returned %+v with error %v", s, r, err)
			}
			return
		}
		if err := r.validate(); err != nil {
			t.Fatalf("ParseRule(%q) = %+v, which is invalid: %v", s, r, err)
		}
		if r.Prefix != r.Prefix.Masked() || (r.Prefix.Addr().Is4In6() && r.Prefix.Bits() >= 96) || r.Prefix.Addr().Zone() != "" {
			t.Fatalf("ParseRule(%q) = %+v: prefix not normalised", s, r)
		}
		text := r.String()
		back, err := ParseRule(text)
		if err != nil {
			t.Fatalf("ParseRule(%q) = %+v, whose String %q does not parse: %v", s, r, text, err)
		}
		if back != r {
			t.Fatalf("ParseRule(%q) = %+v; String %q parses to %+v", s, r, text, back)
		}
		if again := back.String(); again != text {
			t.Fatalf("String not stable: %q then %q", text, again)
		}
		if _, err := NewPolicy(PolicyOptions{Allow: []Rule{r}, Deny: []Rule{r}, LocalAddrs: []netip.Addr{}}); err != nil {
			t.Fatalf("NewPolicy refuses parsed rule %q: %v", text, err)
		}
		// A rule matches the first address of its own prefix, on a port
		// in its range, for its protocol.
		proto := r.Proto
		if proto == 0 {
			proto = TCP
			if r.Prefix.Addr().Is6() && !r.Ports.IsZero() {
				proto = UDP
			}
		}
		port := r.Ports.Lo
		if proto == ICMP {
			port = 0
		}
		if !r.match(proto, r.Prefix.Addr(), port) {
			t.Fatalf("%q does not match %s port %d", text, netip.AddrPortFrom(r.Prefix.Addr(), port), port)
		}
	})
}

// FuzzParsePortRange checks --egress-ports and rule port ranges: what
// parses is within 1-65535, ordered, and round-trips through String.
func FuzzParsePortRange(f *testing.F) {
	for _, s := range []string{"32768-60999", "443", "0", "65536", "2-1", " 1 - 2 ", "-", "1-", "+5"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		r, err := ParsePortRange(s)
		if err != nil {
			return
		}
		if r.Lo == 0 || r.Hi < r.Lo {
			t.Fatalf("ParsePortRange(%q) = %+v", s, r)
		}
		back, err := ParsePortRange(r.String())
		if err != nil || back != r {
			t.Fatalf("ParsePortRange(%q) = %+v; String %q parses to %+v, %v", s, r, r.String(), back, err)
		}
	})
}
