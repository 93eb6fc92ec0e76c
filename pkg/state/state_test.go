package state

import (
	"errors"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"
)

func newState(t testing.TB, pools Pools) *State {
	t.Helper()
	st, err := New(randomKey(), pools)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func addPeer(t testing.TB, st *State, name string) Peer {
	t.Helper()
	p, err := st.AddPeer(Peer{Name: name, PublicKey: randomKey()})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func addrs(ss ...string) []netip.Addr {
	var out []netip.Addr
	for _, s := range ss {
		out = append(out, netip.MustParseAddr(s))
	}
	return out
}

func TestAllocationOrder(t *testing.T) {
	st := newState(t, DefaultPools)
	if got, want := st.GatewayAddrs(), addrs("100.96.0.1", "fd5c:1ce::1"); !reflect.DeepEqual(got, want) {
		t.Fatalf("GatewayAddrs() = %v, want %v", got, want)
	}
	before := time.Now().Add(-time.Second)
	a := addPeer(t, st, "alice")
	b := addPeer(t, st, "bob")
	c := addPeer(t, st, "carol")
	for i, p := range []Peer{a, b, c} {
		want := addrs(
			netip.AddrFrom4([4]byte{100, 96, 0, byte(2 + i)}).String(),
			"fd5c:1ce::"+string(rune('2'+i)))
		if !reflect.DeepEqual(p.Addrs, want) {
			t.Errorf("%s got %v, want %v", p.Name, p.Addrs, want)
		}
		if p.Created.Before(before) || p.Created.After(time.Now()) {
			t.Errorf("%s created %v, want about now", p.Name, p.Created)
		}
	}
	// The lowest free address is reused once its peer is gone.
	if _, err := st.RemovePeer("alice"); err != nil {
		t.Fatal(err)
	}
	if _, ok := st.Peer("alice"); ok {
		t.Fatal("alice still there after RemovePeer")
	}
	d := addPeer(t, st, "dave")
	if want := addrs("100.96.0.2", "fd5c:1ce::2"); !reflect.DeepEqual(d.Addrs, want) {
		t.Fatalf("dave got %v, want alice's old %v", d.Addrs, want)
	}
	e := addPeer(t, st, "eve")
	if want := addrs("100.96.0.5", "fd5c:1ce::5"); !reflect.DeepEqual(e.Addrs, want) {
		t.Fatalf("eve got %v, want %v", e.Addrs, want)
	}
	if err := st.Validate(); err != nil {
		t.Fatal(err)
	}

	// What callers are handed is a copy.
	e.Addrs[0] = netip.MustParseAddr("192.0.2.1")
	got, ok := st.Peer("eve")
	if !ok || got.Addrs[0] != netip.MustParseAddr("100.96.0.5") {
		t.Fatalf("changing a returned Peer changed the state: %v", got.Addrs)
	}
	got.Addrs[0] = netip.MustParseAddr("192.0.2.1")
	if again, _ := st.Peer("eve"); again.Addrs[0] != netip.MustParseAddr("100.96.0.5") {
		t.Fatal("changing Peer()'s result changed the state")
	}
}

func TestAddPeerErrors(t *testing.T) {
	st := newState(t, DefaultPools)
	alice := addPeer(t, st, "alice")
	snapshot := st.Clone()

	for _, tc := range []struct {
		name  string
		peer  Peer
		is    error
		field string
	}{
		{"duplicate name", Peer{Name: "alice", PublicKey: randomKey()}, ErrPeerExists, ""},
		{"duplicate key", Peer{Name: "alice2", PublicKey: alice.PublicKey}, ErrPeerExists, ""},
		{"empty name", Peer{PublicKey: randomKey()}, nil, "name"},
		{"bad name", Peer{Name: "a b", PublicKey: randomKey()}, nil, "name"},
		{"long name", Peer{Name: strings.Repeat("x", 65), PublicKey: randomKey()}, nil, "name"},
		{"bad key", Peer{Name: "k", PublicKey: "not a key"}, nil, "public_key"},
		{"short key", Peer{Name: "k", PublicKey: randomKey()[:40] + "===="}, nil, "public_key"},
		{"zero key", Peer{Name: "k", PublicKey: strings.Repeat("A", 43) + "="}, nil, "public_key"},
		{"bad psk", Peer{Name: "k", PublicKey: randomKey(), PresharedKey: "xyz"}, nil, "preshared_key"},
		{"taken address", Peer{Name: "k", PublicKey: randomKey(), Addrs: alice.Addrs[:1]}, nil, "addrs"},
		{"gateway address", Peer{Name: "k", PublicKey: randomKey(), Addrs: addrs("100.96.0.1")}, nil, "addrs[0]"},
		{"two v4", Peer{Name: "k", PublicKey: randomKey(), Addrs: addrs("10.1.0.1", "10.1.0.2")}, nil, "addrs[1]"},
	} {
		_, err := st.AddPeer(tc.peer)
		if err == nil {
			t.Errorf("%s: AddPeer succeeded", tc.name)
			continue
		}
		if tc.is != nil && !errors.Is(err, tc.is) {
			t.Errorf("%s: error %q does not match %v", tc.name, err, tc.is)
		}
		var fe *FieldError
		if tc.field != "" && (!errors.As(err, &fe) || fe.Field != tc.field) {
			t.Errorf("%s: error %q is not about field %q", tc.name, err, tc.field)
		}
		t.Logf("%s: %v", tc.name, err)
	}
	if !reflect.DeepEqual(st, snapshot) {
		t.Fatal("failed AddPeer calls changed the state")
	}
	if _, err := st.RemovePeer("nobody"); !errors.Is(err, ErrNoPeer) {
		t.Fatalf("RemovePeer(nobody) = %v, want ErrNoPeer", err)
	}

	// Addresses given by the caller are kept; allocation goes around them.
	p, err := st.AddPeer(Peer{Name: "static", PublicKey: randomKey(), Addrs: addrs("100.96.0.3")})
	if err != nil || !reflect.DeepEqual(p.Addrs, addrs("100.96.0.3")) {
		t.Fatalf("AddPeer with an address = %v, %v", p.Addrs, err)
	}
	if q := addPeer(t, st, "next"); !reflect.DeepEqual(q.Addrs, addrs("100.96.0.4", "fd5c:1ce::3")) {
		t.Fatalf("next peer got %v, want 100.96.0.4 fd5c:1ce::3", q.Addrs)
	}
	created := time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)
	if p, err := st.AddPeer(Peer{Name: "imported", PublicKey: randomKey(), Created: created}); err != nil || !p.Created.Equal(created) {
		t.Fatalf("AddPeer with Created = %v, %v; want it kept", p.Created, err)
	}
}

func TestPoolExhaustion(t *testing.T) {
	st := newState(t, Pools{V4: netip.MustParsePrefix("10.0.0.0/30")})
	if got := st.GatewayAddrs(); !reflect.DeepEqual(got, addrs("10.0.0.1")) {
		t.Fatalf("GatewayAddrs() = %v", got)
	}
	if p := addPeer(t, st, "a"); !reflect.DeepEqual(p.Addrs, addrs("10.0.0.2")) {
		t.Fatalf("first peer got %v, want 10.0.0.2 only", p.Addrs)
	}
	// 10.0.0.3 is the broadcast address.
	_, err := st.AddPeer(Peer{Name: "b", PublicKey: randomKey()})
	if !errors.Is(err, ErrPoolExhausted) || !strings.Contains(err.Error(), "10.0.0.0/30") {
		t.Fatalf("second peer in a /30: %v, want ErrPoolExhausted naming the pool", err)
	}
	t.Log(err)
	if len(st.Peers) != 1 {
		t.Fatalf("%d peers after a failed add", len(st.Peers))
	}

	// When one family runs out the peer gets no address from the other.
	st = newState(t, Pools{V4: netip.MustParsePrefix("10.0.0.0/24"), V6: netip.MustParsePrefix("fd00::/126")})
	addPeer(t, st, "a")
	if p := addPeer(t, st, "b"); !reflect.DeepEqual(p.Addrs, addrs("10.0.0.3", "fd00::3")) {
		t.Fatalf("b got %v", p.Addrs)
	}
	if _, err := st.AddPeer(Peer{Name: "c", PublicKey: randomKey()}); !errors.Is(err, ErrPoolExhausted) || !strings.Contains(err.Error(), "fd00::/126") {
		t.Fatalf("third peer in a v6 /126: %v", err)
	}
	if len(st.Peers) != 2 {
		t.Fatalf("%d peers after a failed add", len(st.Peers))
	}

	// A /23 spans a byte boundary: every host but the gateway, in order.
	st = newState(t, Pools{V4: netip.MustParsePrefix("10.0.0.0/23")})
	want := netip.MustParseAddr("10.0.0.2")
	for i := range 509 {
		p := addPeer(t, st, "p"+string(rune('a'+i%26))+strings.Repeat("x", i/26))
		if p.Addrs[0] != want {
			t.Fatalf("peer %d got %v, want %v", i, p.Addrs[0], want)
		}
		want = want.Next()
	}
	if last := st.Peers[508].Addrs[0]; last != netip.MustParseAddr("10.0.1.254") {
		t.Fatalf("last peer got %v, want 10.0.1.254", last)
	}
	if _, err := st.AddPeer(Peer{Name: "full", PublicKey: randomKey()}); !errors.Is(err, ErrPoolExhausted) {
		t.Fatalf("peer 510 in a /23: %v", err)
	}
}

func TestThousandPeers(t *testing.T) {
	st := newState(t, DefaultPools)
	start := time.Now()
	for i := range 1000 {
		addPeer(t, st, "peer-"+itoa(i))
	}
	if err := st.Validate(); err != nil {
		t.Fatal(err)
	}
	elapsed := time.Since(start)
	t.Logf("1000 AddPeer calls and a Validate: %v", elapsed)
	if elapsed > 2*time.Second {
		t.Fatalf("1000 peers took %v", elapsed)
	}
	seen := map[netip.Addr]bool{}
	for _, p := range st.Peers {
		for _, a := range p.Addrs {
			if seen[a] {
				t.Fatalf("%v assigned twice", a)
			}
			seen[a] = true
		}
	}
	if p, _ := st.Peer("peer-999"); !reflect.DeepEqual(p.Addrs, addrs("100.96.3.233", "fd5c:1ce::3e9")) {
		t.Fatalf("peer-999 got %v", p.Addrs)
	}

	s, unlock := openLocked(t)
	defer unlock()
	start = time.Now()
	if err := s.Save(st); err != nil {
		t.Fatal(err)
	}
	got, err := s.Load()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("save and load of 1000 peers: %v", time.Since(start))
	if len(got.Peers) != 1000 || !reflect.DeepEqual(got.Peers[999].Addrs, st.Peers[999].Addrs) {
		t.Fatal("1000 peers did not survive a round trip")
	}
}

func itoa(i int) string {
	if i < 10 {
		return string(rune('0' + i))
	}
	return itoa(i/10) + string(rune('0'+i%10))
}

func TestSetPoolsKeepsAssignments(t *testing.T) {
	st := newState(t, DefaultPools)
	a := addPeer(t, st, "a")
	b := addPeer(t, st, "b")
	if _, err := st.AddPeer(Peer{Name: "static", PublicKey: randomKey(), Addrs: addrs("10.8.0.2", "10.9.0.1")[:1]}); err != nil {
		t.Fatal(err)
	}

	// A smaller pool elsewhere, v6 off: a and b keep what they have.
	if err := st.SetPools(Pools{V4: netip.MustParsePrefix("10.8.0.0/24")}); err != nil {
		t.Fatal(err)
	}
	if got := st.GatewayAddrs(); !reflect.DeepEqual(got, addrs("10.8.0.1")) {
		t.Fatalf("GatewayAddrs() = %v", got)
	}
	for _, old := range []Peer{a, b} {
		if p, _ := st.Peer(old.Name); !reflect.DeepEqual(p.Addrs, old.Addrs) {
			t.Fatalf("%s re-addressed from %v to %v", old.Name, old.Addrs, p.Addrs)
		}
	}
	// 10.8.0.2 is taken by "static".
	if c := addPeer(t, st, "c"); !reflect.DeepEqual(c.Addrs, addrs("10.8.0.3")) {
		t.Fatalf("c got %v, want 10.8.0.3", c.Addrs)
	}

	s, unlock := openLocked(t)
	defer unlock()
	if err := s.Save(st); err != nil {
		t.Fatal(err)
	}
	loaded, err := s.Load()
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(loaded, st) {
		t.Fatalf("round trip after a pool change:\n got %+v\nwant %+v", loaded, st)
	}

	// A pool whose gateway address a peer already has is refused, and
	// nothing changes.
	before := st.Clone()
	err = st.SetPools(Pools{V4: netip.MustParsePrefix("100.96.0.1/32").Masked(), V6: netip.MustParsePrefix("fd5c:1ce::/64")})
	if err == nil {
		t.Fatal("SetPools with a /32 succeeded")
	}
	err = st.SetPools(Pools{V4: netip.MustParsePrefix("10.8.0.2/31").Masked()})
	if err == nil {
		t.Fatal("SetPools with a /31 succeeded")
	}
	if _, err := st.AddPeer(Peer{Name: "x", PublicKey: randomKey(), Addrs: addrs("10.7.0.1")}); err != nil {
		t.Fatal(err)
	}
	before = st.Clone()
	err = st.SetPools(Pools{V4: netip.MustParsePrefix("10.7.0.0/16")})
	var fe *FieldError
	if !errors.As(err, &fe) || !strings.HasSuffix(fe.Field, ".addrs[0]") || !strings.Contains(err.Error(), "gateway") {
		t.Fatalf("SetPools onto a peer's address: %v", err)
	}
	t.Log(err)
	if !reflect.DeepEqual(st, before) {
		t.Fatal("a failed SetPools changed the state")
	}
}

func TestValidateNamesField(t *testing.T) {
	good := func() *State {
		st := newState(t, DefaultPools)
		for _, n := range []string{"a", "b", "c", "d"} {
			addPeer(t, st, n)
		}
		st.Peers[3].PresharedKey = randomKey()
		return st
	}
	if err := good().Validate(); err != nil {
		t.Fatalf("valid state: %v", err)
	}
	for _, tc := range []struct {
		field  string
		break_ func(st *State)
	}{
		{"version", func(st *State) { st.Version = 0 }},
		{"version", func(st *State) { st.Version = 2 }},
		{"private_key", func(st *State) { st.PrivateKey = "" }},
		{"private_key", func(st *State) { st.PrivateKey = st.PrivateKey[:43] + "\n" }},
		{"pools", func(st *State) { st.Pools = Pools{} }},
		{"pools.v4", func(st *State) { st.Pools.V4 = netip.MustParsePrefix("100.96.0.1/12") }},
		{"pools.v4", func(st *State) { st.Pools.V4 = netip.MustParsePrefix("10.0.0.0/31") }},
		{"pools.v4", func(st *State) { st.Pools.V4 = netip.MustParsePrefix("fd00::/64") }},
		{"pools.v4", func(st *State) { st.Pools.V4 = netip.MustParsePrefix("::ffff:10.0.0.0/104") }},
		{"pools.v6", func(st *State) { st.Pools.V6 = netip.MustParsePrefix("10.0.0.0/8") }},
		{"pools.v6", func(st *State) { st.Pools.V6 = netip.MustParsePrefix("fd00::/127") }},
		{"peers[2].name", func(st *State) { st.Peers[2].Name = "b" }},
		{"peers[2].name", func(st *State) { st.Peers[2].Name = "c/d" }},
		{"peers[3].public_key", func(st *State) { st.Peers[3].PublicKey = "AAAA" }},
		{"peers[3].public_key", func(st *State) { st.Peers[3].PublicKey = st.Peers[0].PublicKey }},
		{"peers[3].preshared_key", func(st *State) { st.Peers[3].PresharedKey = st.PrivateKey + "x" }},
		{"peers[1].addrs", func(st *State) { st.Peers[1].Addrs = nil }},
		{"peers[1].addrs[1]", func(st *State) { st.Peers[1].Addrs[1] = st.Peers[0].Addrs[1] }},
		{"peers[1].addrs[0]", func(st *State) { st.Peers[1].Addrs[0] = netip.MustParseAddr("100.96.0.1") }},
		{"peers[1].addrs[0]", func(st *State) { st.Peers[1].Addrs[0] = netip.Addr{} }},
		{"peers[1].addrs[0]", func(st *State) { st.Peers[1].Addrs[0] = netip.MustParseAddr("::ffff:100.96.0.9") }},
		{"peers[1].addrs[0]", func(st *State) { st.Peers[1].Addrs[0] = netip.MustParseAddr("fe80::1%eth0") }},
		{"peers[1].addrs[1]", func(st *State) { st.Peers[1].Addrs[1] = netip.MustParseAddr("10.0.0.9") }},
	} {
		st := good()
		tc.break_(st)
		err := st.Validate()
		var fe *FieldError
		if !errors.As(err, &fe) || fe.Field != tc.field {
			t.Errorf("want an error about %s, got %v", tc.field, err)
			continue
		}
		if !strings.HasPrefix(err.Error(), tc.field+": ") {
			t.Errorf("message %q does not start with the field", err)
		}
		t.Log(err)
	}
}

func TestNewRejectsBadInput(t *testing.T) {
	if _, err := New("", DefaultPools); err == nil || !strings.Contains(err.Error(), "private_key") {
		t.Fatalf("New without a key: %v", err)
	}
	if _, err := New(randomKey(), Pools{}); err == nil || !strings.Contains(err.Error(), "pools") {
		t.Fatalf("New without pools: %v", err)
	}
}
