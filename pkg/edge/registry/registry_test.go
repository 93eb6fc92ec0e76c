package registry

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sluice-vpn/sluice/pkg/expose"
)

// clock is a fake time source that tests move by hand.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock { return &clock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func newRegistry(t *testing.T, opts Options) (*Registry, *clock) {
	t.Helper()
	c := newClock()
	opts.Now = c.Now
	r, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	return r, c
}

var (
	alice = Peer{Name: "alice", PublicKey: "QUxJQ0U="}
	bob   = Peer{Name: "bob", PublicKey: "Qk9C"}
	carol = Peer{Name: "carol", PublicKey: "Q0FST0w="}
)

func addrOf(i int) netip.Addr { return netip.AddrFrom4([4]byte{10, 99, 0, byte(i)}) }

func httpReg(host string, port uint16, labels ...string) expose.Registration {
	reg := expose.Registration{Hostname: host, Port: port, Protocol: expose.ProtocolHTTP}
	if len(labels) > 0 {
		reg.Labels = map[string]string{}
		for _, kv := range labels {
			k, v, _ := strings.Cut(kv, "=")
			reg.Labels[k] = v
		}
	}
	return reg
}

func mustRegister(t *testing.T, r *Registry, p Peer, a netip.Addr, reg expose.Registration) expose.Lease {
	t.Helper()
	l, err := r.Register(p, a, reg)
	if err != nil {
		t.Fatalf("Register(%s, %s): %v", p.Name, reg.Hostname, err)
	}
	return l
}

// picks counts the IDs that n picks return.
func picks(t *testing.T, r *Registry, host string, n int) map[string]int {
	t.Helper()
	got := map[string]int{}
	for range n {
		rp, err := r.Pick(host, "", nil)
		if err != nil {
			t.Fatalf("Pick(%s): %v", host, err)
		}
		got[rp.ID]++
	}
	return got
}

var stableCanary = map[string]Hostname{
	"app.example.com": {
		Peers: []string{"alice", "bob", "carol"},
		Weights: []Weight{
			{Labels: map[string]string{"release": "stable"}, Weight: 90},
			{Labels: map[string]string{"release": "canary"}, Weight: 10},
		},
	},
}

func TestNewOptions(t *testing.T) {
	for _, c := range []struct {
		opts Options
		want string
	}{
		{Options{Lease: -1}, "Options.Lease"},
		{Options{FailureCooldown: -time.Second}, "Options.FailureCooldown"},
		{Options{MaxHostnames: -1}, "Options.MaxHostnames"},
		{Options{MaxReplicas: -1}, "Options.MaxReplicas"},
		{Options{MaxPerPeer: -1}, "Options.MaxPerPeer"},
		{Options{Hostnames: map[string]Hostname{"App.example.com": {}}}, "App.example.com"},
	} {
		if _, err := New(c.opts); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("New(%+v) = %v, want an error naming %s", c.opts, err, c.want)
		}
	}
	r, err := New(Options{})
	if err != nil {
		t.Fatal(err)
	}
	l := mustRegister(t, r, alice, addrOf(1), httpReg("app.example.com", 80))
	if l.TTLSeconds != 6 || l.RefreshSeconds != 2 || l.Weight != 1 || l.ID != "alice/app.example.com/80" {
		t.Errorf("lease with defaults = %+v", l)
	}
}

func TestSplitExact(t *testing.T) {
	r, _ := newRegistry(t, Options{Hostnames: stableCanary})
	mustRegister(t, r, alice, addrOf(1), httpReg("app.example.com", 80, "release=stable"))
	mustRegister(t, r, bob, addrOf(2), httpReg("app.example.com", 80, "release=canary"))
	got := picks(t, r, "app.example.com", 1000)
	if got["alice/app.example.com/80"] != 900 || got["bob/app.example.com/80"] != 100 {
		t.Errorf("1000 picks of 90/10: %v, want 900/100", got)
	}
	// Smooth: the canary never gets two in a row, and comes once in
	// every 10.
	last := ""
	for i := range 100 {
		rp, _ := r.Pick("app.example.com", "", nil)
		if rp.ID == last && strings.HasPrefix(rp.ID, "bob") {
			t.Fatalf("pick %d: canary twice in a row", i)
		}
		last = rp.ID
	}
}

func TestSplitGroupShare(t *testing.T) {
	r, _ := newRegistry(t, Options{Hostnames: stableCanary})
	for i, p := range []Peer{alice, bob, carol} {
		mustRegister(t, r, p, addrOf(i+1), httpReg("app.example.com", 80, "release=stable", "zone=a"))
	}
	l := mustRegister(t, r, carol, addrOf(3), httpReg("app.example.com", 81, "release=canary"))
	if l.Weight != 10 {
		t.Errorf("canary lease weight %d, want 10", l.Weight)
	}
	got := picks(t, r, "app.example.com", 1000)
	want := map[string]int{
		"alice/app.example.com/80": 300, "bob/app.example.com/80": 300,
		"carol/app.example.com/80": 300, "carol/app.example.com/81": 100,
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("1000 picks, 3 stable + 1 canary at 90/10: %v, want %v", got, want)
	}
	for _, s := range r.Services() {
		for _, rp := range s.Replicas {
			w := 30
			if rp.Labels["release"] == "canary" {
				w = 10
			}
			if rp.Weight != w || !rp.Healthy {
				t.Errorf("%s: weight %d healthy %v, want %d true", rp.ID, rp.Weight, rp.Healthy, w)
			}
		}
	}
}

func TestEvenWithoutRules(t *testing.T) {
	r, _ := newRegistry(t, Options{Hostnames: map[string]Hostname{"app.example.com": {Peers: []string{"alice", "bob"}}}})
	mustRegister(t, r, alice, addrOf(1), httpReg("app.example.com", 80))
	mustRegister(t, r, bob, addrOf(2), httpReg("app.example.com", 80))
	mustRegister(t, r, bob, addrOf(2), httpReg("app.example.com", 81))
	got := picks(t, r, "app.example.com", 300)
	for id, n := range got {
		if n != 100 {
			t.Errorf("even split over 3 replicas, 300 picks: %v (%s)", got, id)
			break
		}
	}
}

func TestDeadGroupShareMoves(t *testing.T) {
	r, c := newRegistry(t, Options{Hostnames: stableCanary})
	mustRegister(t, r, alice, addrOf(1), httpReg("app.example.com", 80, "release=stable"))
	mustRegister(t, r, bob, addrOf(2), httpReg("app.example.com", 80, "release=canary"))
	mustRegister(t, r, carol, addrOf(3), httpReg("app.example.com", 80, "other=x")) // matches no rule

	r.Report("alice/app.example.com/80", errors.New("connection refused"))
	if got := picks(t, r, "app.example.com", 50); got["bob/app.example.com/80"] != 50 {
		t.Errorf("stable cooling down: %v, want all 50 on the canary", got)
	}
	// With both groups down, the replica that matches no rule serves.
	r.Report("bob/app.example.com/80", errors.New("reset"))
	if got := picks(t, r, "app.example.com", 10); got["carol/app.example.com/80"] != 10 {
		t.Errorf("both groups cooling down: %v, want the unmatched replica", got)
	}
	// The stable group's lease runs out: the canary takes everything.
	c.Advance(4 * time.Second)
	mustRegister(t, r, bob, addrOf(2), httpReg("app.example.com", 80, "release=canary"))
	mustRegister(t, r, carol, addrOf(3), httpReg("app.example.com", 80, "other=x"))
	c.Advance(3 * time.Second)
	r.Report("bob/app.example.com/80", nil)
	if got := picks(t, r, "app.example.com", 20); got["bob/app.example.com/80"] != 20 {
		t.Errorf("stable expired: %v, want all on the canary", got)
	}
	for _, s := range r.Services() {
		for _, rp := range s.Replicas {
			if rp.Peer == "alice" {
				t.Errorf("expired replica still listed: %+v", rp)
			}
		}
	}
}

func TestWeightZeroExcludes(t *testing.T) {
	r, _ := newRegistry(t, Options{Hostnames: map[string]Hostname{"app.example.com": {
		Peers: []string{"alice", "bob"},
		Weights: []Weight{
			{Labels: map[string]string{"release": "old"}, Weight: 0},
			{Labels: map[string]string{}, Weight: 1},
		},
	}}})
	mustRegister(t, r, alice, addrOf(1), httpReg("app.example.com", 80, "release=old"))
	if _, err := r.Pick("app.example.com", "", nil); !errors.Is(err, ErrNoReplica) {
		t.Errorf("only a weight-0 replica: %v, want ErrNoReplica", err)
	}
	mustRegister(t, r, bob, addrOf(2), httpReg("app.example.com", 80, "release=new"))
	if got := picks(t, r, "app.example.com", 10); got["bob/app.example.com/80"] != 10 {
		t.Errorf("weight 0 rule: %v, want all on bob", got)
	}
}

func TestExclude(t *testing.T) {
	r, _ := newRegistry(t, Options{Hostnames: stableCanary})
	mustRegister(t, r, alice, addrOf(1), httpReg("app.example.com", 80, "release=stable"))
	mustRegister(t, r, bob, addrOf(2), httpReg("app.example.com", 80, "release=stable"))
	mustRegister(t, r, carol, addrOf(3), httpReg("app.example.com", 80, "release=canary"))
	for range 20 {
		first, err := r.Pick("app.example.com", "", nil)
		if err != nil {
			t.Fatal(err)
		}
		second, err := r.Pick("app.example.com", "", []string{first.ID})
		if err != nil || second.ID == first.ID {
			t.Fatalf("retry after %s: %s, %v", first.ID, second.ID, err)
		}
	}
	all := []string{"alice/app.example.com/80", "bob/app.example.com/80", "carol/app.example.com/80"}
	if rp, err := r.Pick("app.example.com", "", all); !errors.Is(err, ErrNoReplica) {
		t.Errorf("all excluded: %+v, %v; want ErrNoReplica", rp, err)
	}
}

func TestCooldown(t *testing.T) {
	r, c := newRegistry(t, Options{Hostnames: map[string]Hostname{"app.example.com": {Peers: []string{"alice", "bob"}}}, FailureCooldown: 5 * time.Second, Lease: time.Hour})
	mustRegister(t, r, alice, addrOf(1), httpReg("app.example.com", 80))
	mustRegister(t, r, bob, addrOf(2), httpReg("app.example.com", 80))
	a, b := "alice/app.example.com/80", "bob/app.example.com/80"

	r.Report(a, errors.New("dial: connection refused"))
	if got := picks(t, r, "app.example.com", 10); got[b] != 10 {
		t.Errorf("alice cooling down: %v", got)
	}
	svc := r.Services()[0]
	if svc.Replicas[0].Healthy || svc.Replicas[0].Failures != 1 || svc.Replicas[0].LastError != "dial: connection refused" {
		t.Errorf("alice after a failure: %+v", svc.Replicas[0])
	}
	if h, n, healthy := r.Counts(); h != 1 || n != 2 || healthy != 1 {
		t.Errorf("Counts = %d %d %d, want 1 2 1", h, n, healthy)
	}
	// Both cooling down: the least recently failed still serves.
	c.Advance(time.Second)
	r.Report(b, errors.New("reset"))
	rp, err := r.Pick("app.example.com", "", nil)
	if err != nil || rp.ID != a || rp.Healthy {
		t.Errorf("all cooling down: %+v, %v; want alice (failed first), unhealthy", rp, err)
	}
	// The cooldown ends by itself...
	c.Advance(4 * time.Second)
	if got := picks(t, r, "app.example.com", 10); got[a] != 10 {
		t.Errorf("alice's cooldown over, bob's not: %v", got)
	}
	// ...or with a success.
	r.Report(b, nil)
	if got := picks(t, r, "app.example.com", 10); got[a] != 5 || got[b] != 5 {
		t.Errorf("both recovered: %v", got)
	}
	r.Report("nobody/x.example.com/1", errors.New("ignored")) // unknown: no panic
}

func TestOriginDown(t *testing.T) {
	r, c := newRegistry(t, Options{Hostnames: stableCanary, FailureCooldown: 5 * time.Second, Lease: time.Hour})
	a, b := "alice/app.example.com/80", "bob/app.example.com/80"
	mustRegister(t, r, alice, addrOf(1), httpReg("app.example.com", 80, "release=stable"))
	mustRegister(t, r, bob, addrOf(2), httpReg("app.example.com", 80, "release=canary"))

	// Alice's agent says its origin is down: the canary takes it all,
	// though the edge never saw alice fail.
	down := httpReg("app.example.com", 80, "release=stable")
	down.OriginDown = true
	if l := mustRegister(t, r, alice, addrOf(1), down); l.Weight != 0 {
		t.Errorf("lease of a replica whose origin is down: weight %d; want 0", l.Weight)
	}
	if got := picks(t, r, "app.example.com", 20); got[b] != 20 {
		t.Errorf("alice's origin down: %v; want all to bob", got)
	}
	svc := r.Services()[0]
	if rp := svc.Replicas[0]; rp.ID != a || rp.Healthy || !rp.OriginDown || rp.Weight != 0 || rp.Failures != 0 {
		t.Errorf("alice in the listing: %+v; want unhealthy, origin down, weight 0, no failures", rp)
	}
	if _, n, healthy := r.Counts(); n != 2 || healthy != 1 {
		t.Errorf("Counts: %d replicas, %d healthy; want 2, 1", n, healthy)
	}
	// A success reported by the edge (a last-resort attempt whose
	// connection to the agent worked) does not override the agent.
	r.Report(a, nil)
	if got := picks(t, r, "app.example.com", 10); got[b] != 10 {
		t.Errorf("after a reported success, alice's origin still down: %v", got)
	}

	// With bob cooling down too, bob serves first: he only failed once,
	// while alice's agent knows its origin is down.
	r.Report(b, errors.New("reset"))
	for range 3 {
		if rp, err := r.Pick("app.example.com", "", nil); err != nil || rp.ID != b || rp.Healthy {
			t.Fatalf("both resting: %+v, %v; want bob, unhealthy", rp, err)
		}
	}
	// Only alice is left to try: a last resort rather than a refusal.
	if rp, err := r.Pick("app.example.com", "", []string{b}); err != nil || rp.ID != a {
		t.Fatalf("bob excluded: %+v, %v; want alice as a last resort", rp, err)
	}

	// Her origin comes back: the 90/10 split is restored at once.
	c.Advance(5 * time.Second) // bob's cooldown is over
	mustRegister(t, r, alice, addrOf(1), httpReg("app.example.com", 80, "release=stable"))
	if got := picks(t, r, "app.example.com", 100); got[a] != 90 || got[b] != 10 {
		t.Errorf("alice's origin back: %v; want 90/10", got)
	}
}

func TestLeaseExpiry(t *testing.T) {
	r, c := newRegistry(t, Options{Lease: 6 * time.Second})
	l := mustRegister(t, r, alice, addrOf(1), httpReg("app.example.com", 80))
	if l.TTLSeconds != 6 || l.RefreshSeconds != 2 {
		t.Errorf("lease %+v", l)
	}
	for range 5 { // refreshed in time, it stays
		c.Advance(2 * time.Second)
		if l2 := mustRegister(t, r, alice, addrOf(1), httpReg("app.example.com", 80)); l2.ID != l.ID {
			t.Fatalf("refresh changed the ID: %s -> %s", l.ID, l2.ID)
		}
	}
	c.Advance(6 * time.Second)
	if _, err := r.Pick("app.example.com", "", nil); err != nil {
		t.Errorf("at exactly the lease: %v", err)
	}
	c.Advance(time.Millisecond)
	if _, err := r.Pick("app.example.com", "", nil); !errors.Is(err, ErrNoReplica) {
		t.Errorf("after the lease: %v, want ErrNoReplica", err)
	}
	if !r.Known("app.example.com") {
		t.Error("not Known after expiry, while alice's claim lasts")
	}
	if h, n, _ := r.Counts(); h != 0 || n != 0 {
		t.Errorf("Counts after expiry = %d %d", h, n)
	}
	c.Advance(18 * time.Second) // the claim is over
	if _, err := r.Pick("app.example.com", "", nil); !errors.Is(err, ErrUnknownHost) || r.Known("app.example.com") {
		t.Errorf("after the claim: %v, known %v; want ErrUnknownHost, unknown", err, r.Known("app.example.com"))
	}
	// Coming back puts it back, with a new registration time.
	mustRegister(t, r, alice, addrOf(7), httpReg("app.example.com", 80))
	rp, err := r.Pick("app.example.com", "", nil)
	if err != nil || rp.Addr != netip.MustParseAddrPort("10.99.0.7:80") || !rp.Registered.Equal(c.Now()) {
		t.Errorf("re-registered: %+v, %v", rp, err)
	}
}

func TestExpiredDoNotPileUp(t *testing.T) {
	r, c := newRegistry(t, Options{MaxHostnames: 4, MaxPerPeer: 100})
	for round := range 10 {
		for i := range 4 {
			mustRegister(t, r, alice, addrOf(1), httpReg(fmt.Sprintf("h%d-%d.example.com", round, i), 80))
		}
		c.Advance(7 * time.Second)
	}
	r.mu.Lock()
	held, ids := len(r.services), len(r.byID)
	r.mu.Unlock()
	if held > 4 || ids > 4 {
		t.Errorf("after 10 rounds of expired registrations, %d hostnames and %d replicas held", held, ids)
	}
}

func TestClaims(t *testing.T) {
	r, c := newRegistry(t, Options{})
	mustRegister(t, r, alice, addrOf(1), httpReg("app.example.com", 80))
	mustRegister(t, r, alice, addrOf(1), httpReg("app.example.com", 81)) // the holder may add replicas
	_, err := r.Register(bob, addrOf(2), httpReg("app.example.com", 80))
	if !errors.Is(err, ErrNotAllowed) || !strings.Contains(err.Error(), "alice") ||
		!strings.Contains(err.Error(), "edge.hostnames.app.example.com.peers") {
		t.Errorf("second peer: %v, want ErrNotAllowed naming alice and the config key", err)
	}
	// Alice's replicas expire one after the other; the claim lasts
	// until the last one goes.
	c.Advance(3 * time.Second)
	mustRegister(t, r, alice, addrOf(1), httpReg("app.example.com", 81))
	c.Advance(4 * time.Second)
	if _, err := r.Register(bob, addrOf(2), httpReg("app.example.com", 80)); !errors.Is(err, ErrNotAllowed) {
		t.Errorf("holder has one live replica left: %v, want ErrNotAllowed", err)
	}
	// The last one has gone: alice keeps the name for ClaimGrace (3
	// leases), as if her agent were restarting.
	c.Advance(3 * time.Second)
	_, err = r.Register(bob, addrOf(2), httpReg("app.example.com", 80))
	if !errors.Is(err, ErrClaimed) || !strings.Contains(err.Error(), "alice") || !strings.Contains(err.Error(), "18s more") {
		t.Errorf("alice's replicas gone a moment ago; bob: %v, want ErrClaimed naming alice and the time left", err)
	}
	c.Advance(17 * time.Second)
	if _, err := r.Register(bob, addrOf(2), httpReg("app.example.com", 80)); !errors.Is(err, ErrClaimed) {
		t.Errorf("alice's claim has 1s left; bob: %v, want ErrClaimed", err)
	}
	c.Advance(time.Second)
	mustRegister(t, r, bob, addrOf(2), httpReg("app.example.com", 80))
	if _, err := r.Register(alice, addrOf(1), httpReg("app.example.com", 80)); !errors.Is(err, ErrNotAllowed) {
		t.Errorf("bob holds it now; alice: %v", err)
	}
	// A withdrawal leaves a claim too, and the holder may come back
	// within it.
	if err := r.Deregister(bob, "app.example.com", 80); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Register(alice, addrOf(1), httpReg("app.example.com", 80)); !errors.Is(err, ErrClaimed) {
		t.Errorf("bob withdrew a moment ago; alice: %v, want ErrClaimed", err)
	}
	if svcs := r.Services(); len(svcs) != 1 || len(svcs[0].Replicas) != 0 || svcs[0].HeldBy != "bob" || !svcs[0].HeldUntil.Equal(c.Now().Add(18*time.Second)) {
		t.Errorf("listing while bob holds the name: %+v", svcs)
	}
	c.Advance(5 * time.Second)
	mustRegister(t, r, bob, addrOf(2), httpReg("app.example.com", 81))
	// A peer removed from the gateway keeps nothing.
	if err := r.Deregister(bob, "app.example.com", 81); err != nil {
		t.Fatal(err)
	}
	r.ForgetPeer("bob")
	mustRegister(t, r, alice, addrOf(1), httpReg("app.example.com", 80))

	// With a negative ClaimGrace the name is free as soon as the last
	// replica goes.
	r3, _ := newRegistry(t, Options{ClaimGrace: -1})
	mustRegister(t, r3, alice, addrOf(1), httpReg("app.example.com", 80))
	if err := r3.Deregister(alice, "app.example.com", 80); err != nil {
		t.Fatal(err)
	}
	mustRegister(t, r3, bob, addrOf(2), httpReg("app.example.com", 80))

	// Configured peers share; others are refused, by name or key.
	r2, _ := newRegistry(t, Options{Hostnames: map[string]Hostname{"app.example.com": {Peers: []string{"alice", bob.PublicKey}}}})
	mustRegister(t, r2, alice, addrOf(1), httpReg("app.example.com", 80))
	mustRegister(t, r2, bob, addrOf(2), httpReg("app.example.com", 80))
	_, err = r2.Register(carol, addrOf(3), httpReg("app.example.com", 80))
	if !errors.Is(err, ErrNotAllowed) || !strings.Contains(err.Error(), "app.example.com") || !strings.Contains(err.Error(), "alice") {
		t.Errorf("unlisted peer: %v", err)
	}
	// Other hostnames stay first come, first served.
	mustRegister(t, r2, carol, addrOf(3), httpReg("other.example.com", 80))
}

func TestOnlyListed(t *testing.T) {
	r, _ := newRegistry(t, Options{OnlyListed: true, Hostnames: map[string]Hostname{"app.example.com": {}}})
	mustRegister(t, r, alice, addrOf(1), httpReg("app.example.com", 80))
	if _, err := r.Register(alice, addrOf(1), httpReg("other.example.com", 80)); !errors.Is(err, ErrNotAllowed) ||
		!strings.Contains(err.Error(), "other.example.com") {
		t.Errorf("unlisted hostname: %v", err)
	}
	// A configured hostname without peers is still held by its first peer.
	if _, err := r.Register(bob, addrOf(2), httpReg("app.example.com", 80)); !errors.Is(err, ErrNotAllowed) {
		t.Errorf("second peer on a configured hostname without peers: %v", err)
	}
}

func TestLimits(t *testing.T) {
	r, c := newRegistry(t, Options{MaxHostnames: 2, MaxReplicas: 2, MaxPerPeer: 3,
		Hostnames: map[string]Hostname{"shared.example.com": {Peers: []string{"alice", "bob", "carol"}}}})
	mustRegister(t, r, alice, addrOf(1), httpReg("shared.example.com", 80))
	mustRegister(t, r, bob, addrOf(2), httpReg("shared.example.com", 80))
	_, err := r.Register(carol, addrOf(3), httpReg("shared.example.com", 80))
	if !errors.Is(err, ErrLimit) || !strings.Contains(err.Error(), "MaxReplicas") {
		t.Errorf("third replica: %v, want ErrLimit naming MaxReplicas", err)
	}
	mustRegister(t, r, alice, addrOf(1), httpReg("shared.example.com", 80)) // refreshes still work
	mustRegister(t, r, alice, addrOf(1), httpReg("a.example.com", 80))
	_, err = r.Register(alice, addrOf(1), httpReg("b.example.com", 80))
	if !errors.Is(err, ErrLimit) || !strings.Contains(err.Error(), "MaxHostnames") {
		t.Errorf("third hostname: %v, want ErrLimit naming MaxHostnames", err)
	}
	mustRegister(t, r, alice, addrOf(1), httpReg("a.example.com", 81))
	_, err = r.Register(alice, addrOf(1), httpReg("a.example.com", 82))
	if !errors.Is(err, ErrLimit) || !strings.Contains(err.Error(), "MaxReplicas") {
		t.Errorf("third replica of a.example.com: %v, want ErrLimit naming MaxReplicas", err)
	}
	// Deregistering makes room; so does expiry.
	if err := r.Deregister(alice, "a.example.com", 81); err != nil {
		t.Fatal(err)
	}
	mustRegister(t, r, alice, addrOf(1), httpReg("a.example.com", 82))
	c.Advance(7 * time.Second)
	mustRegister(t, r, carol, addrOf(3), httpReg("b.example.com", 80))
	mustRegister(t, r, carol, addrOf(3), httpReg("c.example.com", 80))

	r2, c := newRegistry(t, Options{MaxPerPeer: 3})
	for i := range 3 {
		mustRegister(t, r2, alice, addrOf(1), httpReg(fmt.Sprintf("h%d.example.com", i), 80))
	}
	_, err = r2.Register(alice, addrOf(1), httpReg("a.example.com", 80))
	if !errors.Is(err, ErrLimit) || !strings.Contains(err.Error(), "MaxPerPeer") {
		t.Errorf("fourth registration of a peer: %v, want ErrLimit naming MaxPerPeer", err)
	}
	mustRegister(t, r2, bob, addrOf(2), httpReg("a.example.com", 80)) // others are not held back
	c.Advance(7 * time.Second)
	mustRegister(t, r2, alice, addrOf(1), httpReg("b.example.com", 80))
}

func TestProtocolMismatch(t *testing.T) {
	r, _ := newRegistry(t, Options{Hostnames: map[string]Hostname{"app.example.com": {Peers: []string{"alice", "bob"}}}})
	mustRegister(t, r, alice, addrOf(1), httpReg("app.example.com", 80))
	tcp := expose.Registration{Hostname: "app.example.com", Port: 22, Protocol: expose.ProtocolTCP}
	if _, err := r.Register(bob, addrOf(2), tcp); !errors.Is(err, ErrConflict) || !strings.Contains(err.Error(), "http") {
		t.Errorf("tcp beside http: %v, want ErrConflict", err)
	}
	if _, err := r.Pick("app.example.com", expose.ProtocolTCP, nil); !errors.Is(err, ErrNoReplica) {
		t.Errorf("Pick tcp of an http hostname: %v, want ErrNoReplica", err)
	}
	if _, err := r.Pick("app.example.com", expose.ProtocolHTTP, nil); err != nil {
		t.Errorf("Pick http: %v", err)
	}
	// The only replica may change its protocol on refresh.
	tcp.Port = 80
	mustRegister(t, r, alice, addrOf(1), tcp)
	if rp, err := r.Pick("app.example.com", expose.ProtocolTCP, nil); err != nil || rp.Protocol != expose.ProtocolTCP {
		t.Errorf("after the change: %+v, %v", rp, err)
	}
}

func TestUnknownAndConfigured(t *testing.T) {
	r, c := newRegistry(t, Options{Hostnames: map[string]Hostname{"app.example.com": {}}})
	if _, err := r.Pick("nope.example.com", "", nil); !errors.Is(err, ErrUnknownHost) {
		t.Errorf("unknown: %v", err)
	}
	if _, err := r.Pick("app.example.com", "", nil); !errors.Is(err, ErrNoReplica) {
		t.Errorf("configured, no replica: %v, want ErrNoReplica", err)
	}
	if !r.Known("app.example.com") || r.Known("nope.example.com") {
		t.Error("Known")
	}
	mustRegister(t, r, alice, addrOf(1), httpReg("dyn.example.com", 80))
	if !r.Known("dyn.example.com") {
		t.Error("Known of a registered hostname")
	}
	svcs := r.Services()
	if len(svcs) != 2 || svcs[0].Hostname != "app.example.com" || len(svcs[0].Replicas) != 0 || svcs[0].Replicas == nil ||
		svcs[1].Hostname != "dyn.example.com" || len(svcs[1].Replicas) != 1 {
		t.Errorf("Services = %+v", svcs)
	}
	// Snapshots are copies.
	svcs[1].Replicas[0].Labels = map[string]string{"x": "y"}
	if got := r.Services()[1].Replicas[0].Labels; got != nil {
		t.Errorf("snapshot changed the registry: %v", got)
	}

	// A hostname whose agent has just gone is still known, while its
	// claim lasts: it has no replica for now, it is not unknown.
	if err := r.Deregister(alice, "dyn.example.com", 80); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Pick("dyn.example.com", "", nil); !errors.Is(err, ErrNoReplica) || !r.Known("dyn.example.com") {
		t.Errorf("claimed, no replica: %v, known %v; want ErrNoReplica, known", err, r.Known("dyn.example.com"))
	}
	c.Advance(3 * DefaultLease)
	if _, err := r.Pick("dyn.example.com", "", nil); !errors.Is(err, ErrUnknownHost) || r.Known("dyn.example.com") {
		t.Errorf("claim over: %v, known %v; want ErrUnknownHost, unknown", err, r.Known("dyn.example.com"))
	}
}

func TestRegisterChecks(t *testing.T) {
	r, _ := newRegistry(t, Options{})
	for _, reg := range []expose.Registration{
		{Hostname: "App.example.com", Port: 80, Protocol: "http"},
		{Hostname: "app.example.com", Port: 0, Protocol: "http"},
		{Hostname: "app.example.com", Port: 80, Protocol: "udp"},
		{Hostname: "app.example.com", Port: 80, Protocol: "http", Labels: map[string]string{"a b": "c"}},
	} {
		if _, err := r.Register(alice, addrOf(1), reg); !errors.Is(err, ErrInvalid) {
			t.Errorf("Register(%+v) = %v, want ErrInvalid", reg, err)
		}
	}
	if _, err := r.Register(alice, netip.Addr{}, httpReg("app.example.com", 80)); !errors.Is(err, ErrInvalid) {
		t.Errorf("no address: %v", err)
	}
	// A v4-mapped v6 source is the v4 address.
	mustRegister(t, r, alice, netip.MustParseAddr("::ffff:10.99.0.1"), httpReg("app.example.com", 80))
	rp, _ := r.Pick("app.example.com", "", nil)
	if rp.Addr.String() != "10.99.0.1:80" {
		t.Errorf("addr %s", rp.Addr)
	}
}

func TestRefreshUpdatesLabels(t *testing.T) {
	r, _ := newRegistry(t, Options{Hostnames: stableCanary})
	mustRegister(t, r, alice, addrOf(1), httpReg("app.example.com", 80, "release=stable"))
	mustRegister(t, r, bob, addrOf(2), httpReg("app.example.com", 80, "release=stable"))
	// Bob turns canary on refresh: the split follows.
	l := mustRegister(t, r, bob, addrOf(2), httpReg("app.example.com", 80, "release=canary"))
	if l.Weight != 10 {
		t.Errorf("bob as canary: weight %d", l.Weight)
	}
	if got := picks(t, r, "app.example.com", 100); got["alice/app.example.com/80"] != 90 {
		t.Errorf("after relabelling: %v", got)
	}
}

func TestSetHostnames(t *testing.T) {
	r, _ := newRegistry(t, Options{Hostnames: map[string]Hostname{
		"app.example.com": {Peers: []string{"alice", "bob"}},
	}})
	mustRegister(t, r, alice, addrOf(1), httpReg("app.example.com", 80, "release=stable"))
	mustRegister(t, r, bob, addrOf(2), httpReg("app.example.com", 80, "release=canary"))
	mustRegister(t, r, carol, addrOf(3), httpReg("free.example.com", 80))

	for _, c := range []struct {
		hosts map[string]Hostname
		want  string
	}{
		{map[string]Hostname{"app": {}}, `"app"`},
		{map[string]Hostname{"app.example.com": {Weights: []Weight{{Weight: -1}}}}, "hostname app.example.com: weights[0].weight -1"},
		{map[string]Hostname{"app.example.com": {Weights: []Weight{{Labels: map[string]string{"Bad": "x"}, Weight: 1}}}}, "hostname app.example.com: weights[0].labels"},
		{map[string]Hostname{"app.example.com": {Peers: []string{""}}}, "hostname app.example.com: peers[0]"},
	} {
		if err := r.SetHostnames(c.hosts, false); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("SetHostnames(%v) = %v, want an error with %q", c.hosts, err, c.want)
		}
	}
	if len(r.Services()) != 2 {
		t.Fatal("a refused configuration changed the registry")
	}

	// Bob is no longer listed; weights now apply; free.example.com is
	// not listed and only listed hostnames may be served.
	err := r.SetHostnames(map[string]Hostname{
		"app.example.com": {Peers: []string{"alice", "carol"}, Weights: []Weight{{Labels: map[string]string{"release": "stable"}, Weight: 5}}},
		"new.example.com": {},
	}, true)
	if err != nil {
		t.Fatal(err)
	}
	svcs := r.Services()
	if len(svcs) != 2 || svcs[0].Hostname != "app.example.com" || len(svcs[0].Replicas) != 1 ||
		svcs[0].Replicas[0].Peer != "alice" || svcs[0].Replicas[0].Weight != 5 ||
		svcs[1].Hostname != "new.example.com" || len(svcs[1].Replicas) != 0 {
		t.Errorf("after the reload: %+v", svcs)
	}
	if _, err := r.Pick("free.example.com", "", nil); !errors.Is(err, ErrUnknownHost) {
		t.Errorf("dropped hostname: %v", err)
	}
	if _, err := r.Register(carol, addrOf(3), httpReg("free.example.com", 80)); !errors.Is(err, ErrNotAllowed) {
		t.Errorf("unlisted after reload: %v", err)
	}
	if _, _, n := r.Counts(); n != 1 {
		t.Errorf("healthy replicas after reload: %d", n)
	}

	// Shared, then unshared: the peer that registered first keeps it.
	r2, c := newRegistry(t, Options{Hostnames: map[string]Hostname{"app.example.com": {Peers: []string{"alice", "bob"}}}})
	mustRegister(t, r2, bob, addrOf(2), httpReg("app.example.com", 80))
	c.Advance(time.Second)
	mustRegister(t, r2, alice, addrOf(1), httpReg("app.example.com", 80))
	if err := r2.SetHostnames(nil, false); err != nil {
		t.Fatal(err)
	}
	if s := r2.Services(); len(s) != 1 || len(s[0].Replicas) != 1 || s[0].Replicas[0].Peer != "bob" {
		t.Errorf("unshared: %+v", s)
	}
}

func TestConcurrent(t *testing.T) {
	r, _ := newRegistry(t, Options{Hostnames: stableCanary})
	var wg sync.WaitGroup
	for i, p := range []Peer{alice, bob, carol} {
		wg.Go(func() {
			for j := range 200 {
				if _, err := r.Register(p, addrOf(i+1), httpReg("app.example.com", uint16(80+j%3), "release=stable")); err != nil {
					t.Error(err)
					return
				}
				if j%50 == 0 {
					r.Deregister(p, "app.example.com", 80)
				}
			}
		})
		wg.Go(func() {
			for range 500 {
				if rp, err := r.Pick("app.example.com", "http", nil); err == nil {
					r.Report(rp.ID, nil)
				}
				r.Services()
				r.Counts()
			}
		})
	}
	wg.Wait()
}

func BenchmarkPick(b *testing.B) {
	r, _ := New(Options{Hostnames: stableCanary, Lease: time.Hour})
	for i := range 8 {
		rel := "stable"
		if i == 0 {
			rel = "canary"
		}
		r.Register(Peer{Name: "alice"}, addrOf(1), httpReg("app.example.com", uint16(80+i), "release="+rel))
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := r.Pick("app.example.com", "http", nil); err != nil {
			b.Fatal(err)
		}
	}
}

func TestForgetPeer(t *testing.T) {
	r, err := New(Options{Hostnames: map[string]Hostname{"a.example.com": {Peers: []string{"p", "q"}}}})
	if err != nil {
		t.Fatal(err)
	}
	p, q := Peer{Name: "p", PublicKey: "kp"}, Peer{Name: "q", PublicKey: "kq"}
	for _, reg := range []struct {
		peer Peer
		host string
		port uint16
	}{{p, "a.example.com", 1}, {q, "a.example.com", 2}, {p, "b.example.com", 3}} {
		if _, err := r.Register(reg.peer, netip.MustParseAddr("100.96.0.2"), expose.Registration{Hostname: reg.host, Port: reg.port, Protocol: expose.ProtocolHTTP}); err != nil {
			t.Fatal(err)
		}
	}
	if n := r.ForgetPeer("p"); n != 2 {
		t.Fatalf("ForgetPeer removed %d, want 2", n)
	}
	if r.Known("b.example.com") {
		t.Error("b.example.com, p's only, is still known")
	}
	rep, err := r.Pick("a.example.com", "", nil)
	if err != nil || rep.Peer != "q" {
		t.Errorf("Pick after ForgetPeer: %+v, %v; want q's replica", rep, err)
	}
	if n := r.ForgetPeer("p"); n != 0 {
		t.Errorf("second ForgetPeer removed %d", n)
	}
}
