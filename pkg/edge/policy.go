package edge

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math"
	"net/netip"
	"path"
	"strings"
	"time"

	"golang.org/x/time/rate"

	"github.com/sluice-vpn/sluice/pkg/expose"
)

// Policy is what the edge checks before a request or connection for one
// hostname may reach an origin. The zero Policy allows everything.
//
// The checks run in a fixed order, and the first that fails answers:
// client address (Deny, then Allow; HTTP 403), rate (per client, then
// total; HTTP 429 with Retry-After), path (HTTP 403), authentication
// (HTTP 401 with WWW-Authenticate). TCP connections get the first two and
// are closed when refused. A refused request never reaches an origin: no
// replica is picked and nothing is dialled.
type Policy struct {
	// RatePerClient bounds the new requests (HTTP) or connections (TCP)
	// per second from one client; 0 means unlimited. IPv4 clients are
	// told apart by address, IPv6 clients by /64, since one host commonly
	// holds a whole /64. BurstPerClient is the bucket size
	// [max(1, 2*RatePerClient)]. Up to 65,536 clients per hostname are
	// tracked at once; clients are forgotten once their buckets are full
	// again, and while the table is full of clients still paying off a
	// burst, newcomers share one bucket of this size.
	RatePerClient  float64
	BurstPerClient int
	// RateTotal and BurstTotal are the same over all clients of the
	// hostname together. A request that the total refuses does not count
	// against its client's own rate.
	RateTotal  float64
	BurstTotal int
	// Allow, when not empty, admits only clients inside one of its
	// prefixes; Deny refuses clients inside one of its prefixes, and wins
	// over Allow.
	Allow []netip.Prefix
	Deny  []netip.Prefix
	// Paths, when not empty, admits only HTTP requests under one of these
	// prefixes. Both sides are compared cleaned (path.Clean, so "." and
	// ".." segments and doubled slashes are resolved first, on the
	// percent-decoded path) and segment by segment: "/api" admits "/api"
	// and "/api/x" but not "/apix"; "/" admits everything.
	Paths []string
	// BearerTokens are accepted in "Authorization: Bearer <token>", each
	// stored as HashSecret(token): "sha256:<hex>".
	BearerTokens []string
	// BasicUsers are accepted with HTTP Basic authentication: user name ->
	// HashSecret(password) or a bcrypt hash ("$2a$", "$2b$", "$2y$").
	// When BearerTokens or BasicUsers is set, a request needs one of them,
	// and the Authorization header it was admitted with is not passed on
	// to the origin.
	BasicUsers map[string]string
	// ProxyProtocol makes TCP routes send a PROXY protocol v2 header (the
	// client's address and the edge's) to the origin before the client's
	// first byte, or a LOCAL header when those addresses are not known,
	// so that the origin always finds a header. HTTP requests carry the
	// client's address in X-Forwarded-For and Forwarded instead.
	ProxyProtocol bool
}

// HashSecret returns the form in which Policy stores a bearer token or
// password: "sha256:" and the hex SHA-256 digest of secret.
func HashSecret(secret string) string {
	d := sha256.Sum256([]byte(secret))
	return "sha256:" + hex.EncodeToString(d[:])
}

// policy is a Policy checked and made ready to apply.
type policy struct {
	src Policy

	allow, deny []netip.Prefix
	perClient   *clientLimiters // nil: unlimited
	total       *rate.Limiter   // nil: unlimited
	paths       []string        // cleaned
	auth        *authenticator  // nil: no authentication
}

// compilePolicy checks p and builds its policy; field names it in errors.
// Rate limiters of old, the policy p replaces, are kept when their rates
// did not change, so that a reload does not hand every client a fresh
// burst.
func compilePolicy(field string, p Policy, old *policy, bcryptSlots chan struct{}) (*policy, error) {
	for _, f := range []struct {
		name string
		v    float64
	}{{"RatePerClient", p.RatePerClient}, {"RateTotal", p.RateTotal}} {
		if f.v < 0 || math.IsNaN(f.v) || math.IsInf(f.v, 0) {
			return nil, fmt.Errorf("edge: %s.%s %v: want a finite number >= 0", field, f.name, f.v)
		}
	}
	if p.BurstPerClient < 0 {
		return nil, fmt.Errorf("edge: %s.BurstPerClient %d is negative", field, p.BurstPerClient)
	}
	if p.BurstTotal < 0 {
		return nil, fmt.Errorf("edge: %s.BurstTotal %d is negative", field, p.BurstTotal)
	}
	c := &policy{src: p}
	for i, pf := range p.Allow {
		if !pf.IsValid() {
			return nil, fmt.Errorf("edge: %s.Allow[%d]: not a valid prefix", field, i)
		}
		c.allow = append(c.allow, pf.Masked())
	}
	for i, pf := range p.Deny {
		if !pf.IsValid() {
			return nil, fmt.Errorf("edge: %s.Deny[%d]: not a valid prefix", field, i)
		}
		c.deny = append(c.deny, pf.Masked())
	}
	for i, pp := range p.Paths {
		if !strings.HasPrefix(pp, "/") {
			return nil, fmt.Errorf("edge: %s.Paths[%d] %q: must start with '/'", field, i, pp)
		}
		c.paths = append(c.paths, path.Clean(pp))
	}
	if p.RatePerClient > 0 {
		burst := burstOf(p.RatePerClient, p.BurstPerClient)
		if old != nil && old.perClient != nil && old.src.RatePerClient == p.RatePerClient && burstOf(old.src.RatePerClient, old.src.BurstPerClient) == burst {
			c.perClient = old.perClient
		} else {
			c.perClient = newClientLimiters(rate.Limit(p.RatePerClient), burst, maxClients)
		}
	}
	if p.RateTotal > 0 {
		burst := burstOf(p.RateTotal, p.BurstTotal)
		if old != nil && old.total != nil && old.src.RateTotal == p.RateTotal && burstOf(old.src.RateTotal, old.src.BurstTotal) == burst {
			c.total = old.total
		} else {
			c.total = rate.NewLimiter(rate.Limit(p.RateTotal), burst)
		}
	}
	auth, err := newAuthenticator(field, p.BearerTokens, p.BasicUsers, bcryptSlots)
	if err != nil {
		return nil, err
	}
	c.auth = auth
	return c, nil
}

// burstOf is the bucket size for a rate: burst, or twice the rate.
func burstOf(r float64, burst int) int {
	if burst > 0 {
		return burst
	}
	return max(1, int(math.Ceil(2*r)))
}

// compilePolicies checks a whole set of policies; nothing changes unless
// all of them are good.
func compilePolicies(field string, ps map[string]Policy, old map[string]*policy, bcryptSlots chan struct{}) (map[string]*policy, error) {
	out := make(map[string]*policy, len(ps))
	for host, p := range ps {
		f := fmt.Sprintf("%s[%q]", field, host)
		if err := expose.CheckHostname(host); err != nil {
			return nil, fmt.Errorf("edge: %s: %w", f, err)
		}
		c, err := compilePolicy(f, p, old[host], bcryptSlots)
		if err != nil {
			return nil, err
		}
		out[host] = c
	}
	return out, nil
}

// Reasons for refusing, as the refused_total metric labels them.
const (
	reasonIP = iota
	reasonRate
	reasonPath
	reasonAuth
	reasonNoReplica
	reasonMisdirected
	numReasons
)

var reasonNames = [numReasons]string{"ip", "rate", "path", "auth", "no_replica", "misdirected"}

// admitAddr applies the address lists: false if ip may not connect.
func (p *policy) admitAddr(ip netip.Addr) bool {
	if p == nil {
		return true
	}
	// A prefix never contains an address with a zone; the zone names
	// the edge's interface, not the client, so it must not let a
	// link-local client past Deny.
	ip = ip.Unmap().WithZone("")
	for _, pf := range p.deny {
		if pf.Contains(ip) {
			return false
		}
	}
	if len(p.allow) == 0 {
		return true
	}
	for _, pf := range p.allow {
		if pf.Contains(ip) {
			return true
		}
	}
	return false
}

// Limits that admitRate can report.
const (
	limitNone = iota
	limitClient
	limitTotal
)

// admitRate takes a token for one new request or connection from ip: the
// client's first, then the hostname's. It returns which limit refused,
// or limitNone. A request that the total limit refuses gives the client's
// token back: it reached nothing, and a client must not run out of
// requests because others used up the hostname's.
func (p *policy) admitRate(ip netip.Addr) int {
	if p == nil {
		return limitNone
	}
	now := time.Now()
	var r *rate.Reservation
	if p.perClient != nil {
		if r = p.perClient.reserve(ip, now); r == nil {
			return limitClient
		}
	}
	if p.total != nil && !p.total.AllowN(now, 1) {
		if r != nil {
			p.perClient.cancel(r, now)
		}
		return limitTotal
	}
	return limitNone
}

// retryAfter is the Retry-After value, in whole seconds, for a request
// refused by limit: the time one token takes to come back.
func (p *policy) retryAfter(limit int) int {
	r := p.src.RateTotal
	if limit == limitClient {
		r = p.src.RatePerClient
	}
	if r <= 0 {
		return 1
	}
	return max(1, int(math.Ceil(1/r)))
}

// admitPath applies Paths to a request's (decoded) URL path. The origin
// gets the path as the client sent it, so only a path already in its
// canonical form can be judged by prefix: "/admin/../public" (or its
// %2F-encoded twin) is refused, not read as "/public", since an origin
// that does not clean paths would serve /admin for it.
func (p *policy) admitPath(urlPath string) bool {
	if p == nil || len(p.paths) == 0 {
		return true
	}
	clean := path.Clean("/" + urlPath)
	if strings.HasSuffix(urlPath, "/") && clean != "/" {
		clean += "/"
	}
	if clean != urlPath {
		return false
	}
	clean = strings.TrimSuffix(clean, "/")
	if clean == "" {
		clean = "/"
	}
	for _, pp := range p.paths {
		if pathUnder(clean, pp) {
			return true
		}
	}
	return false
}

// pathUnder reports whether the cleaned path p is prefix or below it.
func pathUnder(p, prefix string) bool {
	if prefix == "/" || p == prefix {
		return true
	}
	return strings.HasPrefix(p, prefix) && p[len(prefix)] == '/'
}
