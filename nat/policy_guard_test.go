package nat

import (
	"net/netip"
	"strings"
	"testing"
)

// TestPolicyRangeDoesNotOpenHost allows ranges that contain the gateway
// host's own addresses and its subnet's broadcast address: those stay
// closed unless a rule names them, while the rest of the range opens.
func TestPolicyRangeDoesNotOpenHost(t *testing.T) {
	opts := PolicyOptions{
		LocalAddrs: []netip.Addr{
			netip.MustParseAddr("10.0.0.5"), netip.MustParseAddr("127.0.0.1"),
			netip.MustParseAddr("2001:db8::5"), netip.MustParseAddr("203.0.113.9"),
		},
		LocalNets: []netip.Prefix{
			netip.MustParsePrefix("10.0.0.5/24"), netip.MustParsePrefix("203.0.113.9/31"),
			netip.MustParsePrefix("2001:db8::5/64"),
		},
	}
	const (
		open      = ""
		host      = "gateway host"
		bcast     = "broadcast address"
		loopback  = "loopback"
		private   = "private range"
		explicit  = "deny rule"
		multicast = "multicast"
	)
	for _, tc := range []struct {
		allow []string
		proto Proto
		dst   string
		want  string
	}{
		// The reported case: the office range holds the gateway's address.
		{[]string{"10.0.0.0/8"}, TCP, "10.0.0.5:22", host},
		{[]string{"10.0.0.0/8"}, TCP, "10.0.0.6:22", open},
		{[]string{"10.0.0.0/8"}, TCP, "[::ffff:10.0.0.5]:22", host},
		{[]string{"10.0.0.0/8"}, UDP, "10.0.0.255:9", bcast},
		{[]string{"10.0.0.0/8"}, ICMP, "10.0.0.255:0", bcast},
		{[]string{"10.0.0.0/8"}, UDP, "10.0.1.255:9", open}, // not a subnet of the host's
		{[]string{"0.0.0.0/0"}, UDP, "255.255.255.255:9", bcast},
		{[]string{"0.0.0.0/0"}, TCP, "203.0.113.9:80", host},
		{[]string{"0.0.0.0/0"}, TCP, "203.0.113.8:80", open}, // a /31 has no broadcast
		{[]string{"0.0.0.0/0"}, TCP, "127.0.0.1:80", host},
		// All of loopback is the host, and so is 0.0.0.0: a range that
		// only contains them opens none.
		{[]string{"0.0.0.0/0"}, TCP, "127.0.0.2:80", "loopback range"},
		{[]string{"0.0.0.0/0"}, TCP, "0.0.0.0:80", "denied"},
		{[]string{"::/0"}, TCP, "[2001:db8::5]:80", host},
		{[]string{"2001:db8::/32"}, TCP, "[2001:db8::6]:80", open},
		// Named exactly, they open, as far as the rule goes.
		{[]string{"10.0.0.0/8", "tcp/10.0.0.5:443"}, TCP, "10.0.0.5:443", open},
		{[]string{"10.0.0.0/8", "tcp/10.0.0.5:443"}, TCP, "10.0.0.5:22", host},
		{[]string{"10.0.0.5/32"}, UDP, "10.0.0.5:53", open},
		{[]string{"udp/10.0.0.255:9"}, UDP, "10.0.0.255:9", open},
		{[]string{"255.255.255.255"}, UDP, "255.255.255.255:9", open},
		{[]string{"2001:db8::5/128"}, TCP, "[2001:db8::5]:80", open},
		// A loopback range can only mean the host.
		{[]string{"127.0.0.0/8"}, TCP, "127.0.0.1:80", open},
		// Without rules, the defaults say why first when they apply.
		{nil, TCP, "10.0.0.5:22", host},
		{nil, UDP, "10.0.0.255:9", bcast},
		{nil, UDP, "10.0.0.7:9", private},
	} {
		o := opts
		o.Allow = mustRules(t, tc.allow...)
		p := mustPolicy(t, o)
		dst := netip.MustParseAddrPort(tc.dst)
		err := p.Check(tc.proto, dst)
		switch {
		case tc.want == open && err != nil:
			t.Errorf("allow %v: %s %s denied: %v", tc.allow, tc.proto, dst, err)
		case tc.want != open && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("allow %v: %s %s: %v, want denied as %q", tc.allow, tc.proto, dst, err, tc.want)
		}
		// A peer's own Allow rules are held to the same.
		o = opts
		o.Peers = map[string]PeerRules{"laptop": {Allow: mustRules(t, tc.allow...)}}
		p = mustPolicy(t, o)
		err = p.CheckPeer("laptop", tc.proto, dst)
		switch {
		case tc.want == open && err != nil:
			t.Errorf("peer allow %v: %s %s denied: %v", tc.allow, tc.proto, dst, err)
		case tc.want != open && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("peer allow %v: %s %s: %v, want denied as %q", tc.allow, tc.proto, dst, err, tc.want)
		}
	}
}

func TestBroadcastOf(t *testing.T) {
	for _, tc := range []struct {
		net, want string
	}{
		{"10.0.0.5/24", "10.0.0.255"},
		{"192.168.7.1/22", "192.168.7.255"},
		{"192.168.4.1/22", "192.168.7.255"},
		{"172.16.0.1/12", "172.31.255.255"},
		{"100.96.0.1/30", "100.96.0.3"},
		{"100.96.0.1/31", ""},
		{"100.96.0.1/32", ""},
		{"2001:db8::1/64", ""},
	} {
		b, ok := broadcastOf(netip.MustParsePrefix(tc.net))
		got := ""
		if ok {
			got = b.String()
		}
		if got != tc.want {
			t.Errorf("broadcastOf(%s) = %q, want %q", tc.net, got, tc.want)
		}
	}
}

// TestPolicyDiscoversBroadcasts finds the host's subnets with its
// addresses, and closes their broadcast addresses to a rule that opens
// everything.
func TestPolicyDiscoversBroadcasts(t *testing.T) {
	addrs, nets, err := interfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	if len(nets) == 0 {
		t.Skip("no interface has an address with a prefix length here")
	}
	p, err := NewPolicy(PolicyOptions{Allow: mustRules(t, "0.0.0.0/0", "::/0")})
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		if err := p.Check(TCP, netip.AddrPortFrom(a, 80)); err == nil {
			t.Errorf("own address %s opened by 0.0.0.0/0", a)
		}
	}
	for _, n := range nets {
		if b, ok := broadcastOf(n); ok {
			if err := p.Check(UDP, netip.AddrPortFrom(b, 9)); err == nil || !strings.Contains(err.Error(), "broadcast") {
				t.Errorf("broadcast %s of %s: %v", b, n, err)
			}
		}
	}
}
