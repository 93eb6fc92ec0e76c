package edge

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"
	"golang.org/x/time/rate"
)

func compile(t *testing.T, p Policy) *policy {
	t.Helper()
	c, err := compilePolicy("test", p, nil, make(chan struct{}, 2))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestHashSecret(t *testing.T) {
	d := sha256.Sum256([]byte("s3cret"))
	if got, want := HashSecret("s3cret"), "sha256:"+hex.EncodeToString(d[:]); got != want {
		t.Fatalf("HashSecret = %s, want %s", got, want)
	}
}

func TestPolicyAddressLists(t *testing.T) {
	p := compile(t, Policy{
		Allow: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("2001:db8::/32")},
		Deny:  []netip.Prefix{netip.MustParsePrefix("10.9.0.0/16")},
	})
	for addr, want := range map[string]bool{
		"10.1.2.3":         true,
		"::ffff:10.1.2.3":  true, // an IPv4 client on a dual-stack socket
		"10.9.1.1":         false,
		"11.0.0.1":         false,
		"2001:db8::1":      true,
		"2001:db9::1":      false,
		"::ffff:10.9.0.10": false,
	} {
		if got := p.admitAddr(netip.MustParseAddr(addr)); got != want {
			t.Errorf("admitAddr(%s) = %v, want %v", addr, got, want)
		}
	}
	deny := compile(t, Policy{Deny: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}})
	if !deny.admitAddr(netip.MustParseAddr("198.51.100.1")) || deny.admitAddr(netip.MustParseAddr("192.0.2.7")) {
		t.Error("a Deny list alone should refuse only its prefixes")
	}
	var none *policy
	if !none.admitAddr(netip.MustParseAddr("192.0.2.7")) {
		t.Error("no policy should admit everyone")
	}
}

func TestPolicyPaths(t *testing.T) {
	p := compile(t, Policy{Paths: []string{"/api", "/static/"}})
	for path, want := range map[string]bool{
		"/api":           true,
		"/api/":          true,
		"/api/v1/x":      true,
		"/apix":          false,
		"/":              false,
		"":               false,
		"/api/../admin":  false,
		"/static/app.js": true,
		"/static":        true, // "/static/" is cleaned to "/static"
		// The origin gets the path as sent: one that is not in its
		// canonical form cannot be judged by prefix, and is refused.
		"//api//v1":        false,
		"/x/../api/y":      false,
		"/admin/../api":    false,
		"/api/v1/":         true,
		"/api/./../secret": false,
	} {
		if got := p.admitPath(path); got != want {
			t.Errorf("admitPath(%q) = %v, want %v", path, got, want)
		}
	}
	all := compile(t, Policy{Paths: []string{"/"}})
	if !all.admitPath("/anything/at/all") {
		t.Error(`"/" should admit every path`)
	}
	if _, err := compilePolicy("Hostnames[x]", Policy{Paths: []string{"api"}}, nil, nil); err == nil || !strings.Contains(err.Error(), "Hostnames[x].Paths[0]") {
		t.Errorf("a relative path prefix: err = %v, want one naming Hostnames[x].Paths[0]", err)
	}
}

func basicReq(user, pass string) *http.Request {
	r, _ := http.NewRequest("GET", "http://app.example.com/", nil)
	r.SetBasicAuth(user, pass)
	return r
}

func bearerReq(token string) *http.Request {
	r, _ := http.NewRequest("GET", "http://app.example.com/", nil)
	r.Header.Set("Authorization", "Bearer "+token)
	return r
}

func TestPolicyBearer(t *testing.T) {
	p := compile(t, Policy{BearerTokens: []string{HashSecret("tok-1"), HashSecret("tok-2")}})
	ctx := context.Background()
	for token, want := range map[string]bool{"tok-1": true, "tok-2": true, "tok-3": false, "": false, HashSecret("tok-1"): false} {
		if got := p.auth.check(ctx, bearerReq(token)); got != want {
			t.Errorf("bearer %q: %v, want %v", token, got, want)
		}
	}
	lower, _ := http.NewRequest("GET", "http://app.example.com/", nil)
	lower.Header.Set("Authorization", "bearer tok-2")
	if !p.auth.check(ctx, lower) {
		t.Error("the auth scheme is case-insensitive")
	}
	if p.auth.check(ctx, basicReq("tok-1", "tok-1")) {
		t.Error("Basic credentials passed where only bearer tokens are configured")
	}
	if _, err := compilePolicy("H", Policy{BearerTokens: []string{"plain-token"}}, nil, nil); err == nil || !strings.Contains(err.Error(), "H.BearerTokens[0]") {
		t.Errorf("a plain token: err = %v, want one naming H.BearerTokens[0]", err)
	}
}

func TestPolicyBasic(t *testing.T) {
	bc, err := bcrypt.GenerateFromPassword([]byte("hunter2"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	p := compile(t, Policy{BasicUsers: map[string]string{
		"alice": HashSecret("wonderland"),
		"bob":   string(bc),
	}})
	ctx := context.Background()
	cases := []struct {
		user, pass string
		want       bool
	}{
		{"alice", "wonderland", true},
		{"alice", "Wonderland", false},
		{"bob", "hunter2", true},
		{"bob", "hunter3", false},
		{"bob", "hunter2", true}, // from the cache this time
		{"carol", "wonderland", false},
		{"", "", false},
	}
	for _, c := range cases {
		if got := p.auth.check(ctx, basicReq(c.user, c.pass)); got != c.want {
			t.Errorf("basic %s:%s: %v, want %v", c.user, c.pass, got, c.want)
		}
	}
	p.auth.mu.Lock()
	cached := len(p.auth.cache)
	p.auth.mu.Unlock()
	if cached != 1 {
		t.Errorf("%d cached bcrypt checks, want 1 (only the success)", cached)
	}
	if p.auth.check(ctx, bearerReq("wonderland")) {
		t.Error("a bearer token passed where only Basic users are configured")
	}
	if ch := p.auth.challenge("app.example.com"); len(ch) != 1 || !strings.HasPrefix(ch[0], `Basic realm="app.example.com"`) {
		t.Errorf("challenge = %q", ch)
	}

	// A bcrypt check waits for a slot; a client that gives up first is
	// refused without one.
	slots := make(chan struct{}, 1)
	q, err := compilePolicy("H", Policy{BasicUsers: map[string]string{"bob": string(bc)}}, nil, slots)
	if err != nil {
		t.Fatal(err)
	}
	slots <- struct{}{}
	cctx, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if q.auth.check(cctx, basicReq("bob", "hunter2")) {
		t.Error("a bcrypt check ran without a free slot")
	}
	<-slots
	if !q.auth.check(ctx, basicReq("bob", "hunter2")) {
		t.Error("bcrypt check failed with a free slot")
	}

	for _, bad := range []map[string]string{
		{"eve": "plaintext"},
		{"ev:e": HashSecret("x")},
		{"eve": "$2b$10$short"},
		{"eve": "sha256:abcd"},
	} {
		if _, err := compilePolicy("H", Policy{BasicUsers: bad}, nil, nil); err == nil || !strings.Contains(err.Error(), "H.BasicUsers[") {
			t.Errorf("BasicUsers %v: err = %v, want one naming H.BasicUsers", bad, err)
		}
	}
}

func TestPolicyRates(t *testing.T) {
	p := compile(t, Policy{RatePerClient: 1, BurstPerClient: 3, RateTotal: 2, BurstTotal: 5})
	a, b, c := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2"), netip.MustParseAddr("192.0.2.3")
	for i := 0; i < 3; i++ {
		if got := p.admitRate(a); got != limitNone {
			t.Fatalf("request %d of a: refused by %d within the burst", i+1, got)
		}
	}
	if got := p.admitRate(a); got != limitClient {
		t.Fatalf("a's 4th request: %d, want the per-client limit", got)
	}
	for i := 0; i < 2; i++ {
		if got := p.admitRate(b); got != limitNone {
			t.Fatalf("request %d of b: refused by %d", i+1, got)
		}
	}
	// 3 + 2 requests took the total's burst of 5.
	if got := p.admitRate(c); got != limitTotal {
		t.Fatalf("c's first request: %d, want the total limit", got)
	}
	if got := p.retryAfter(limitClient); got != 1 {
		t.Errorf("Retry-After %d, want 1", got)
	}

	// The default burst is twice the rate, at least 1.
	d := compile(t, Policy{RatePerClient: 0.1})
	if d.admitRate(a) != limitNone || d.admitRate(a) != limitClient {
		t.Error("rate 0.1: want a burst of 1")
	}
	if got := d.retryAfter(limitClient); got != 10 {
		t.Errorf("rate 0.1: Retry-After %d, want 10", got)
	}
	e := compile(t, Policy{RatePerClient: 5})
	for i := 0; i < 10; i++ {
		if e.admitRate(a) != limitNone {
			t.Fatalf("rate 5: request %d refused inside the default burst of 10", i+1)
		}
	}
	if e.admitRate(a) != limitClient {
		t.Fatal("rate 5: the 11th request passed")
	}

	// A reload with the same rates keeps the buckets; other rates start
	// afresh.
	kept, err := compilePolicy("H", Policy{RatePerClient: 5, Paths: []string{"/x"}}, e, nil)
	if err != nil {
		t.Fatal(err)
	}
	if kept.admitRate(a) != limitClient {
		t.Error("a reload with the same rate refilled the bucket")
	}
	fresh, err := compilePolicy("H", Policy{RatePerClient: 6}, e, nil)
	if err != nil {
		t.Fatal(err)
	}
	if fresh.admitRate(a) != limitNone {
		t.Error("a reload with a new rate kept the old bucket")
	}

	for _, bad := range []Policy{{RatePerClient: -1}, {RateTotal: -0.5}, {BurstTotal: -1}, {BurstPerClient: -2}} {
		if _, err := compilePolicy("H", bad, nil, nil); err == nil || !strings.Contains(err.Error(), "H.") {
			t.Errorf("%+v: err = %v", bad, err)
		}
	}
}

func TestClientLimitersBounded(t *testing.T) {
	// 100 per second with a burst of 1: a bucket refills in 10 ms.
	c := newClientLimiters(rate.Limit(100), 1, 4)
	addr := func(i int) netip.Addr { return netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}) }
	for i := 1; i <= 4; i++ {
		if !c.allow(addr(i)) {
			t.Fatalf("client %d refused its first request", i)
		}
	}
	if c.len() != 4 {
		t.Fatalf("%d clients tracked, want 4", c.len())
	}
	// The table is full and every bucket is empty: newcomers share the
	// overflow bucket, and tracked clients keep theirs.
	if !c.allow(addr(5)) {
		t.Fatal("the first newcomer was refused by an unused overflow bucket")
	}
	if c.allow(addr(6)) {
		t.Fatal("a second newcomer got a token from the spent overflow bucket")
	}
	if c.allow(addr(1)) {
		t.Fatal("a tracked client lost its empty bucket")
	}
	if c.len() != 4 {
		t.Fatalf("%d clients tracked, want at most 4", c.len())
	}
	// Once their buckets are full again the clients can be forgotten
	// without changing anything, and newcomers get buckets of their own.
	time.Sleep(30 * time.Millisecond)
	c.mu.Lock()
	c.lastSweep = time.Now().Add(-time.Hour)
	c.mu.Unlock()
	if !c.allow(addr(7)) {
		t.Fatal("a newcomer was refused after the table could be swept")
	}
	if n := c.len(); n != 1 {
		t.Fatalf("%d clients tracked after the sweep, want 1", n)
	}

	// IPv6 clients count by /64.
	v6 := newClientLimiters(rate.Limit(0.001), 1, 10)
	if !v6.allow(netip.MustParseAddr("2001:db8:1:2::1")) || v6.allow(netip.MustParseAddr("2001:db8:1:2:ffff::9")) {
		t.Error("two addresses of one /64 should share a bucket")
	}
	if !v6.allow(netip.MustParseAddr("2001:db8:1:3::1")) {
		t.Error("another /64 should have its own bucket")
	}
}

func TestPolicyZonedAddress(t *testing.T) {
	// A link-local client carries the zone of the edge's interface; no
	// prefix contains a zoned address, so the zone must not decide.
	deny := compile(t, Policy{Deny: []netip.Prefix{netip.MustParsePrefix("fe80::/10")}})
	allow := compile(t, Policy{Allow: []netip.Prefix{netip.MustParsePrefix("fe80::/10")}})
	zoned := netip.MustParseAddr("fe80::1%eth0")
	if deny.admitAddr(zoned) {
		t.Errorf("admitAddr(%s) passed a Deny of fe80::/10", zoned)
	}
	if !allow.admitAddr(zoned) {
		t.Errorf("admitAddr(%s) refused by an Allow of fe80::/10", zoned)
	}

	if got, want := remoteIP("[fe80::1%eth0]:443"), netip.MustParseAddr("fe80::1"); got != want {
		t.Errorf("remoteIP kept the zone: %s, want %s", got, want)
	}
	ta := &net.TCPAddr{IP: net.ParseIP("fe80::1"), Port: 443, Zone: "eth0"}
	if got, want := addrPortOf(ta), netip.MustParseAddrPort("[fe80::1]:443"); got != want {
		t.Errorf("addrPortOf(%s) = %s, want %s", ta, got, want)
	}
	if got := addrPortOf(nil); got.IsValid() {
		t.Errorf("addrPortOf(nil) = %s, want the zero AddrPort", got)
	}
	v4 := &net.TCPAddr{IP: net.ParseIP("192.0.2.1"), Port: 80}
	if got, want := addrPortOf(v4), netip.MustParseAddrPort("192.0.2.1:80"); got != want {
		t.Errorf("addrPortOf(%s) = %s, want %s", v4, got, want)
	}
}

func TestPolicyRateTotalRefusalKeepsClientToken(t *testing.T) {
	// Slow enough that no bucket refills during the test.
	p := compile(t, Policy{RatePerClient: 0.001, BurstPerClient: 2, RateTotal: 0.001, BurstTotal: 1})
	a, b := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2")
	if got := p.admitRate(a); got != limitNone {
		t.Fatalf("a's first request: refused by %d", got)
	}
	// The hostname's only token is gone. b's requests are refused by the
	// total, however many it sends, and cost b nothing.
	for i := 0; i < 5; i++ {
		if got := p.admitRate(b); got != limitTotal {
			t.Fatalf("b's request %d: %d, want the total limit (b's own bucket is untouched)", i+1, got)
		}
	}
	p.perClient.mu.Lock()
	tokens := p.perClient.m[clientKey(b)].TokensAt(time.Now())
	p.perClient.mu.Unlock()
	if tokens < 1.99 {
		t.Errorf("b's bucket holds %.3f tokens after refusals by the total, want its burst of 2", tokens)
	}
}

func TestPolicyBasicDecoy(t *testing.T) {
	hash := func(cost int) string {
		h, err := bcrypt.GenerateFromPassword([]byte("pw"), cost)
		if err != nil {
			t.Fatal(err)
		}
		return string(h)
	}
	cheap, dear, dear2 := hash(bcrypt.MinCost), hash(bcrypt.MinCost+2), hash(bcrypt.MinCost+2)
	users := map[string]string{
		"a-cheap": cheap, "b-cheap": hash(bcrypt.MinCost), "c-cheap": hash(bcrypt.MinCost),
		"dave": dear2, "carol": dear, // tie on cost: the least name
		"erin": HashSecret("x"), "frank": HashSecret("y"),
	}
	// Map order varies from run to run; the choice must not.
	for i := 0; i < 20; i++ {
		a, err := newAuthenticator("H", nil, users, nil)
		if err != nil {
			t.Fatal(err)
		}
		if string(a.decoy) != dear {
			t.Fatalf("load %d: decoy %q, want carol's, of the highest cost", i, a.decoy)
		}
	}
	a, err := newAuthenticator("H", nil, map[string]string{"erin": HashSecret("x")}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if a.decoy != nil {
		t.Errorf("decoy %q without any bcrypt user", a.decoy)
	}

	// A SHA-256 user's wrong password pays the decoy too: with every
	// bcrypt slot taken, its check waits as a bcrypt user's would.
	slots := make(chan struct{}, 1)
	p, err := compilePolicy("H", Policy{BasicUsers: map[string]string{"erin": HashSecret("x"), "carol": dear}}, nil, slots)
	if err != nil {
		t.Fatal(err)
	}
	slots <- struct{}{}
	const wait = 50 * time.Millisecond
	for _, c := range []struct {
		user, pass string
		want       bool
		slow       bool
	}{
		{"erin", "x", true, false},
		{"erin", "wrong", false, true},
		{"nobody", "x", false, true},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		start := time.Now()
		got := p.auth.check(ctx, basicReq(c.user, c.pass))
		took := time.Since(start)
		cancel()
		if got != c.want {
			t.Errorf("%s:%s: %v, want %v", c.user, c.pass, got, c.want)
		}
		if slow := took >= wait; slow != c.slow {
			t.Errorf("%s:%s took %v; want it to wait for a bcrypt slot: %v", c.user, c.pass, took, c.slow)
		}
	}
}
