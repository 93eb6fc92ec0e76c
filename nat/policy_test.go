package nat

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
)

func mustPolicy(t *testing.T, opts PolicyOptions) *Policy {
	t.Helper()
	if opts.LocalAddrs == nil {
		opts.LocalAddrs = []netip.Addr{}
	}
	p, err := NewPolicy(opts)
	if err != nil {
		t.Fatalf("NewPolicy: %v", err)
	}
	return p
}

func mustRules(t *testing.T, ss ...string) []Rule {
	t.Helper()
	var rules []Rule
	for _, s := range ss {
		r, err := ParseRule(s)
		if err != nil {
			t.Fatalf("ParseRule(%q): %v", s, err)
		}
		rules = append(rules, r)
	}
	return rules
}

func TestPolicyDefaults(t *testing.T) {
	p := mustPolicy(t, PolicyOptions{LocalAddrs: []netip.Addr{
		netip.MustParseAddr("203.0.113.9"), netip.MustParseAddr("2001:db8:1::9"),
	}})
	for _, tc := range []struct {
		dst    string
		reason string // "" means allowed
	}{
		{"8.8.8.8:53", ""},
		{"[2606:4700::1111]:443", ""},
		{"[::ffff:8.8.8.8]:53", ""},
		{"203.0.113.10:80", ""},
		{"203.0.113.9:80", "gateway host 203.0.113.9"},
		{"[::ffff:203.0.113.9]:80", "gateway host 203.0.113.9"},
		{"[2001:db8:1::9]:22", "gateway host 2001:db8:1::9"},
		{"0.0.0.0:80", "unspecified"},
		{"[::]:80", "unspecified"},
		{"0.1.2.3:80", "0.0.0.0/8"},
		{"127.0.0.1:22", "loopback"},
		{"127.255.255.254:22", "loopback"},
		{"[::1]:22", "loopback"},
		{"[::ffff:127.0.0.1]:22", "loopback"},
		{"169.254.169.254:80", "metadata"},
		{"[::ffff:169.254.169.254]:80", "metadata"},
		{"169.254.1.1:80", "link-local"},
		{"[fe80::1]:80", "link-local"},
		{"[fe80::1%eth0]:80", "link-local"},
		{"[febf::1]:80", "link-local"},
		{"10.0.0.1:80", "private range 10.0.0.0/8"},
		{"10.255.255.255:80", "10.0.0.0/8"},
		{"[::ffff:10.1.2.3]:53", "10.0.0.0/8"},
		{"172.16.0.1:80", "172.16.0.0/12"},
		{"172.31.255.255:80", "172.16.0.0/12"},
		{"172.32.0.1:80", ""},
		{"172.15.255.255:80", ""},
		{"192.168.1.1:80", "192.168.0.0/16"},
		{"192.169.0.1:80", ""},
		{"[fc00::1]:80", "fc00::/7"},
		{"[fd12:3456::1]:80", "fc00::/7"},
		{"[fe00::1]:80", ""},
		{"100.64.0.1:80", "CGNAT"},
		{"100.127.255.255:80", "CGNAT"},
		{"100.128.0.1:80", ""},
		{"224.0.0.1:80", "multicast"},
		{"239.255.255.250:1900", "multicast"},
		{"[ff02::1]:80", "multicast"},
		{"[::ffff:224.0.0.251]:5353", "multicast"},
		{"255.255.255.255:67", "broadcast"},
		{"[::ffff:255.255.255.255]:67", "broadcast"},
		{"240.0.0.1:80", ""},
	} {
		t.Run(tc.dst, func(t *testing.T) {
			dst := netip.MustParseAddrPort(tc.dst)
			err := p.Check(UDP, dst)
			if tc.reason == "" {
				if err != nil {
					t.Fatalf("Check(%s) = %v, want allowed", dst, err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Check(%s) allowed, want denied (%s)", dst, tc.reason)
			}
			var de *DeniedError
			if !errors.As(err, &de) || !errors.Is(err, ErrDenied) {
				t.Fatalf("Check(%s) = %T %v, want *DeniedError matching ErrDenied", dst, err, err)
			}
			if de.Dest != dst || de.Proto != UDP {
				t.Errorf("DeniedError dest %v proto %v", de.Dest, de.Proto)
			}
			if !strings.Contains(err.Error(), tc.reason) {
				t.Errorf("error %q does not say %q", err, tc.reason)
			}
		})
	}
}

func TestDeniedErrorMessage(t *testing.T) {
	p := mustPolicy(t, PolicyOptions{})
	err := p.Check(UDP, netip.MustParseAddrPort("10.1.2.3:53"))
	if want := "udp 10.1.2.3:53 denied: private range 10.0.0.0/8"; err == nil || err.Error() != want {
		t.Errorf("error %q, want %q", err, want)
	}
	err = p.Check(ICMP, netip.MustParseAddrPort("127.0.0.1:7"))
	if want := "icmp 127.0.0.1 denied: loopback range 127.0.0.0/8"; err == nil || err.Error() != want {
		t.Errorf("error %q, want %q", err, want)
	}
	if err := p.Check(TCP, netip.AddrPort{}); err == nil || !errors.Is(err, ErrDenied) {
		t.Errorf("invalid destination: %v", err)
	}
}

func TestPolicyRules(t *testing.T) {
	p := mustPolicy(t, PolicyOptions{
		Allow: mustRules(t,
			"10.0.0.0/8",            // open a private range...
			"tcp/192.168.1.10:22",   // one TCP service
			"udp/172.16.0.0/12:53",  // DNS only, UDP only
			"[fd00::/8]:443-444",    // a ULA range on two ports, any proto
			"icmp/100.64.0.0/10",    // ping into CGNAT
			"::ffff:127.0.0.53/128", // a mapped form opens the IPv4 address
		),
		Deny: mustRules(t,
			"10.9.0.0/16",    // ...but not this part of it
			"udp/9.9.9.9:53", // an otherwise public resolver
			"10.1.1.1:8080",  // one port inside the allowed range
			"tcp/[2001:db8::/32]:25",
		),
	})
	for _, tc := range []struct {
		proto   Proto
		dst     string
		allowed bool
		reason  string
	}{
		{TCP, "10.1.2.3:80", true, ""},
		{ICMP, "10.1.2.3:0", true, ""},
		{TCP, "10.9.1.1:80", false, "deny rule 10.9.0.0/16"},
		{TCP, "[::ffff:10.9.1.1]:80", false, "deny rule 10.9.0.0/16"},
		{TCP, "10.1.1.1:8080", false, "deny rule 10.1.1.1:8080"},
		{TCP, "10.1.1.1:8081", true, ""},
		{ICMP, "10.1.1.1:8080", true, ""}, // port rules do not match ICMP
		{TCP, "192.168.1.10:22", true, ""},
		{UDP, "192.168.1.10:22", false, "192.168.0.0/16"},
		{TCP, "192.168.1.10:23", false, "192.168.0.0/16"},
		{UDP, "172.20.0.1:53", true, ""},
		{TCP, "172.20.0.1:53", false, "172.16.0.0/12"},
		{UDP, "172.20.0.1:54", false, "172.16.0.0/12"},
		{TCP, "[fd00::1]:443", true, ""},
		{UDP, "[fd00::1]:444", true, ""},
		{TCP, "[fd00::1]:445", false, "fc00::/7"},
		{ICMP, "[fd00::1]:443", false, "fc00::/7"},
		{ICMP, "100.64.1.1:0", true, ""},
		{UDP, "100.64.1.1:53", false, "CGNAT"},
		{UDP, "127.0.0.53:53", true, ""},
		{UDP, "127.0.0.1:53", false, "loopback"},
		{UDP, "9.9.9.9:53", false, "deny rule udp/9.9.9.9:53"},
		{TCP, "9.9.9.9:53", true, ""},
		{UDP, "9.9.9.9:54", true, ""},
		{TCP, "[2001:db8::25]:25", false, "deny rule tcp/[2001:db8::/32]:25"},
		{TCP, "[2001:db8::25]:587", true, ""},
	} {
		err := p.Check(tc.proto, netip.MustParseAddrPort(tc.dst))
		switch {
		case tc.allowed && err != nil:
			t.Errorf("%v %s: %v, want allowed", tc.proto, tc.dst, err)
		case !tc.allowed && err == nil:
			t.Errorf("%v %s allowed, want denied (%s)", tc.proto, tc.dst, tc.reason)
		case !tc.allowed && !strings.Contains(err.Error(), tc.reason):
			t.Errorf("%v %s: %q does not say %q", tc.proto, tc.dst, err, tc.reason)
		}
	}
}

func TestPolicyAllowOverridesLocalAddr(t *testing.T) {
	local := netip.MustParseAddr("198.51.100.1")
	p := mustPolicy(t, PolicyOptions{LocalAddrs: []netip.Addr{local}})
	if err := p.Check(TCP, netip.AddrPortFrom(local, 443)); err == nil {
		t.Fatal("gateway's own address allowed by default")
	}
	p = mustPolicy(t, PolicyOptions{LocalAddrs: []netip.Addr{local}, Allow: mustRules(t, "tcp/198.51.100.1:443")})
	if err := p.Check(TCP, netip.AddrPortFrom(local, 443)); err != nil {
		t.Fatalf("allowed local service denied: %v", err)
	}
	if err := p.Check(TCP, netip.AddrPortFrom(local, 22)); err == nil {
		t.Fatal("other port of the gateway allowed")
	}
}

func TestPolicyDiscoversLocalAddrs(t *testing.T) {
	p, err := NewPolicy(PolicyOptions{}) // nil LocalAddrs: ask the interfaces
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := p.local[netip.MustParseAddr("127.0.0.1")]; !ok {
		t.Errorf("127.0.0.1 not among discovered local addresses %v", p.local)
	}
	for a := range p.local {
		err := p.Check(TCP, netip.AddrPortFrom(a, 80))
		if err == nil {
			t.Errorf("local address %v allowed", a)
		} else if !a.IsLoopback() && !strings.Contains(err.Error(), "gateway host") {
			t.Errorf("local address %v denied for another reason: %v", a, err)
		}
	}
	t.Logf("discovered %d local addresses", len(p.local))
}

func TestPolicyRejectsBadRules(t *testing.T) {
	for _, tc := range []struct {
		opts PolicyOptions
		want string
	}{
		{PolicyOptions{Allow: []Rule{{}}}, "Allow[0]"},
		{PolicyOptions{Deny: []Rule{{Prefix: netip.MustParsePrefix("1.0.0.0/8")}, {Proto: 99, Prefix: netip.MustParsePrefix("1.0.0.0/8")}}}, "Deny[1]"},
		{PolicyOptions{Allow: []Rule{{Proto: ICMP, Prefix: netip.MustParsePrefix("1.0.0.0/8"), Ports: PortRange{1, 2}}}}, "icmp"},
		{PolicyOptions{Allow: []Rule{{Prefix: netip.MustParsePrefix("1.0.0.0/8"), Ports: PortRange{9, 2}}}}, "port range"},
		{PolicyOptions{LocalAddrs: []netip.Addr{{}}}, "LocalAddrs[0]"},
	} {
		_, err := NewPolicy(tc.opts)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("NewPolicy(%+v) = %v, want an error naming %q", tc.opts, err, tc.want)
		}
	}
}

func TestParseRule(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Rule
		str  string
	}{
		{"10.0.0.0/8", Rule{Prefix: netip.MustParsePrefix("10.0.0.0/8")}, "10.0.0.0/8"},
		{"10.1.2.3/8", Rule{Prefix: netip.MustParsePrefix("10.0.0.0/8")}, "10.0.0.0/8"},
		{"192.0.2.1", Rule{Prefix: netip.MustParsePrefix("192.0.2.1/32")}, "192.0.2.1"},
		{"192.0.2.1/32", Rule{Prefix: netip.MustParsePrefix("192.0.2.1/32")}, "192.0.2.1"},
		{"udp/192.0.2.1:53", Rule{Proto: UDP, Prefix: netip.MustParsePrefix("192.0.2.1/32"), Ports: PortRange{53, 53}}, "udp/192.0.2.1:53"},
		{"TCP/203.0.113.0/24:8000-8999", Rule{Proto: TCP, Prefix: netip.MustParsePrefix("203.0.113.0/24"), Ports: PortRange{8000, 8999}}, "tcp/203.0.113.0/24:8000-8999"},
		{"icmp/0.0.0.0/0", Rule{Proto: ICMP, Prefix: netip.MustParsePrefix("0.0.0.0/0")}, "icmp/0.0.0.0/0"},
		{"2001:db8::/32", Rule{Prefix: netip.MustParsePrefix("2001:db8::/32")}, "2001:db8::/32"},
		{"::1", Rule{Prefix: netip.MustParsePrefix("::1/128")}, "::1"},
		{"[2001:db8::/32]:443", Rule{Prefix: netip.MustParsePrefix("2001:db8::/32"), Ports: PortRange{443, 443}}, "[2001:db8::/32]:443"},
		{"tcp/[::1]:80-90", Rule{Proto: TCP, Prefix: netip.MustParsePrefix("::1/128"), Ports: PortRange{80, 90}}, "tcp/[::1]:80-90"},
		{"[fe80::]", Rule{Prefix: netip.MustParsePrefix("fe80::/128")}, "fe80::"},
		{"[10.0.0.0/8]:53", Rule{Prefix: netip.MustParsePrefix("10.0.0.0/8"), Ports: PortRange{53, 53}}, "10.0.0.0/8:53"},
		{"::ffff:10.0.0.0/104", Rule{Prefix: netip.MustParsePrefix("10.0.0.0/8")}, "10.0.0.0/8"},
		{" udp/::/0 ", Rule{Proto: UDP, Prefix: netip.MustParsePrefix("::/0")}, "udp/::/0"},
	} {
		got, err := ParseRule(tc.in)
		if err != nil {
			t.Errorf("ParseRule(%q): %v", tc.in, err)
			continue
		}
		if got != tc.want {
			t.Errorf("ParseRule(%q) = %+v, want %+v", tc.in, got, tc.want)
		}
		if s := got.String(); s != tc.str {
			t.Errorf("ParseRule(%q).String() = %q, want %q", tc.in, s, tc.str)
		}
		again, err := ParseRule(got.String())
		if err != nil || again != got {
			t.Errorf("round trip of %q through %q: %+v, %v", tc.in, got.String(), again, err)
		}
	}
}

func TestParseRuleErrors(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"", "missing address"},
		{"tcp/", "missing address"},
		{"sctp/10.0.0.0/8", `unknown protocol "sctp"`},
		{"10.0.0.0/33", `bad prefix "10.0.0.0/33"`},
		{"10.0.0/8", `bad prefix "10.0.0/8"`},
		{"example.com", `bad address "example.com"`},
		{"10.0.0.1:", "empty port range"},
		{"10.0.0.1:http", `port "http" is not a number`},
		{"10.0.0.1:0", "port 0 is outside 1-65535"},
		{"10.0.0.1:70000", "port 70000 is outside 1-65535"},
		{"10.0.0.1:90-80", "80 is below 90"},
		{"[2001:db8::/32", "missing ]"},
		{"[2001:db8::/32]443", "want :PORTS"},
		{"[2001:db8::/32]:", "want :PORTS"},
		{"[2001:db8::/129]:443", `bad prefix "2001:db8::/129"`},
		{"icmp/10.0.0.1:7", "icmp rules take no ports"},
		{"fe80::1%eth0", "zone"},
	} {
		_, err := ParseRule(tc.in)
		if err == nil {
			t.Errorf("ParseRule(%q) succeeded, want error with %q", tc.in, tc.want)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ParseRule(%q) = %q, want it to mention %q", tc.in, err, tc.want)
		}
	}
}

func TestPolicyCheckDoesNotAllocate(t *testing.T) {
	p := mustPolicy(t, PolicyOptions{
		Allow: mustRules(t, "10.0.0.0/8", "tcp/[fd00::/8]:443"),
		Deny:  mustRules(t, "udp/9.9.9.9:53"),
	})
	for _, dst := range []string{"8.8.8.8:53", "10.0.0.1:80", "[fd00::1]:443", "[2606:4700::1]:443", "[::ffff:1.1.1.1]:443"} {
		ap := netip.MustParseAddrPort(dst)
		if n := testing.AllocsPerRun(1000, func() {
			if p.Check(TCP, ap) != nil {
				t.Fatalf("%s denied", ap)
			}
		}); n != 0 {
			t.Errorf("Check(%s) allocates %v times", ap, n)
		}
	}
}

// The whole of loopback and the unspecified addresses are the host, in
// every form a client can write them: a range that merely contains them
// (0.0.0.0/0, ::/0) opens none of them, while a rule that names loopback
// (127.0.0.0/8, ::1) still does.
func TestPolicyAllowRangeLeavesHostClosed(t *testing.T) {
	p := mustPolicy(t, PolicyOptions{LocalAddrs: []netip.Addr{netip.MustParseAddr("127.0.0.1")},
		Allow: mustRules(t, "0.0.0.0/0", "::/0")})
	for _, dst := range []string{"127.0.0.1:22", "127.0.0.2:22", "127.255.255.254:22", "[::ffff:127.0.0.2]:22", "0.0.0.0:22", "[::]:22", "[::ffff:0.0.0.0]:22", "[::1]:22"} {
		if err := p.Check(TCP, netip.MustParseAddrPort(dst)); err == nil {
			t.Errorf("%s allowed by a range that only contains it", dst)
		}
	}
	if err := p.Check(TCP, netip.MustParseAddrPort("203.0.113.7:22")); err != nil {
		t.Errorf("an ordinary destination denied: %v", err)
	}
	p = mustPolicy(t, PolicyOptions{LocalAddrs: []netip.Addr{netip.MustParseAddr("127.0.0.1")},
		Allow: mustRules(t, "127.0.0.0/8", "::1/128")})
	for _, dst := range []string{"127.0.0.2:22", "[::1]:22"} {
		if err := p.Check(TCP, netip.MustParseAddrPort(dst)); err != nil {
			t.Errorf("%s denied though a rule names loopback: %v", dst, err)
		}
	}
}
