package nat

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"
)

var (
	lo4 = netip.MustParseAddr("127.0.0.1")
	lo6 = netip.MustParseAddr("::1")
)

func TestShardSliceSplitsEvenly(t *testing.T) {
	for _, tc := range []struct {
		r    PortRange
		n    int
		want []PortRange
	}{
		{PortRange{100, 109}, 1, []PortRange{{100, 109}}},
		{PortRange{100, 109}, 2, []PortRange{{100, 104}, {105, 109}}},
		{PortRange{100, 109}, 3, []PortRange{{100, 103}, {104, 106}, {107, 109}}},
		{PortRange{100, 109}, 10, []PortRange{{100, 100}, {101, 101}, {102, 102}, {103, 103}, {104, 104}, {105, 105}, {106, 106}, {107, 107}, {108, 108}, {109, 109}}},
		{PortRange{65530, 65535}, 4, []PortRange{{65530, 65531}, {65532, 65533}, {65534, 65534}, {65535, 65535}}},
	} {
		next := int(tc.r.Lo)
		for i := range tc.n {
			e, err := NewEgress(EgressOptions{Ports: tc.r, Shard: i, Shards: tc.n, ExplicitBind: true})
			if err != nil {
				t.Fatalf("%s shard %d/%d: %v", tc.r, i, tc.n, err)
			}
			got := e.Slice()
			if got != tc.want[i] {
				t.Errorf("%s shard %d/%d = %s, want %s", tc.r, i, tc.n, got, tc.want[i])
			}
			if int(got.Lo) != next {
				t.Errorf("%s shard %d/%d starts at %d, want %d (gap or overlap)", tc.r, i, tc.n, got.Lo, next)
			}
			next = int(got.Hi) + 1
		}
		if next != int(tc.r.Hi)+1 {
			t.Errorf("%s in %d shards ends at %d, want %d", tc.r, tc.n, next-1, tc.r.Hi)
		}
	}
	e, err := NewEgress(EgressOptions{ExplicitBind: true})
	if err != nil {
		t.Fatal(err)
	}
	if e.Slice() != DefaultEgressPorts {
		t.Errorf("zero Ports gives slice %s, want %s", e.Slice(), DefaultEgressPorts)
	}
}

func TestNewEgressValidation(t *testing.T) {
	for _, tc := range []struct {
		opts EgressOptions
		want string
	}{
		{EgressOptions{Shard: 2, Shards: 2}, "Shard "},
		{EgressOptions{Shard: -1, Shards: 2}, "Shard "},
		{EgressOptions{Shard: 1}, "Shard "},
		{EgressOptions{Shards: -3}, "Shards"},
		{EgressOptions{Ports: PortRange{Lo: 50000, Hi: 50002}, Shards: 4, Shard: 3}, "Shards"},
		{EgressOptions{Ports: PortRange{Lo: 50010, Hi: 50000}}, "Ports"},
		{EgressOptions{Ports: PortRange{Lo: 0, Hi: 10}}, "Ports"},
		{EgressOptions{Addrs: []netip.Addr{lo4, netip.MustParseAddr("127.0.0.2")}}, "Addrs[1]"},
		{EgressOptions{Addrs: []netip.Addr{lo6, lo4, lo6}}, "Addrs[2]"},
		{EgressOptions{Addrs: []netip.Addr{{}}}, "Addrs[0]"},
		{EgressOptions{Addrs: []netip.Addr{netip.IPv4Unspecified()}}, "Addrs[0]"},
		// TEST-NET-1 is no address of this host; bind tells, nothing is sent.
		{EgressOptions{Addrs: []netip.Addr{netip.MustParseAddr("192.0.2.1")}}, "Addrs[0]"},
		{EgressOptions{DialTimeout: -time.Second}, "DialTimeout"},
	} {
		_, err := NewEgress(tc.opts)
		if err == nil || !strings.Contains(err.Error(), "EgressOptions."+tc.want) {
			t.Errorf("NewEgress(%+v) = %v, want an error naming %q", tc.opts, err, tc.want)
		}
	}
	// A v4-mapped address counts as IPv4.
	e, err := NewEgress(EgressOptions{Addrs: []netip.Addr{netip.MustParseAddr("::ffff:127.0.0.1")}})
	if err != nil {
		t.Fatalf("v4-mapped egress address: %v", err)
	}
	if e.v4 != lo4 {
		t.Errorf("v4-mapped egress address stored as %s", e.v4)
	}
}

func TestRateLimit(t *testing.T) {
	var r rateLimit
	t0 := time.Unix(1000, 0)
	check := func(at time.Duration, wantOK bool, wantSuppressed int) {
		t.Helper()
		ok, n := r.allow(t0.Add(at), 10*time.Second)
		if ok != wantOK || n != wantSuppressed {
			t.Errorf("allow at +%v = %v, %d; want %v, %d", at, ok, n, wantOK, wantSuppressed)
		}
	}
	check(0, true, 0)
	check(time.Second, false, 0)
	check(9*time.Second, false, 0)
	check(10*time.Second, true, 2)
	check(11*time.Second, false, 0)
	check(30*time.Second, true, 1)
	check(41*time.Second, true, 0)
}

// TestEgressKeepAlive: egress connections probe an idle destination after
// EgressOptions.KeepAlive (2 minutes by default, not Go's 15 s), or never.
func TestEgressKeepAlive(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	dst := ln.Addr().(*net.TCPAddr).AddrPort()
	for _, tc := range []struct {
		opt      time.Duration
		on       bool
		idleSecs int
	}{{0, true, 120}, {45 * time.Second, true, 45}, {-1, false, 0}} {
		for _, explicit := range []bool{false, true} {
			e, err := NewEgress(EgressOptions{KeepAlive: tc.opt, ExplicitBind: explicit})
			if err != nil {
				t.Fatal(err)
			}
			c, err := e.DialTCP(context.Background(), dst)
			if err != nil {
				t.Fatal(err)
			}
			var on, idle int
			raw, _ := c.SyscallConn()
			raw.Control(func(fd uintptr) {
				on, _ = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_KEEPALIVE)
				idle, _ = syscall.GetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_KEEPIDLE)
			})
			c.Close()
			if (on != 0) != tc.on || (tc.on && idle != tc.idleSecs) {
				t.Errorf("KeepAlive %v (explicit bind %v): SO_KEEPALIVE %d, TCP_KEEPIDLE %d s; want on %v, %d s",
					tc.opt, explicit, on, idle, tc.on, tc.idleSecs)
			}
		}
	}
}
