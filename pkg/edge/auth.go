package edge

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// Caching of successful bcrypt checks: a bcrypt comparison costs tens of
// milliseconds of CPU by design, too much to pay on every request of a
// client that sends the same credentials each time.
const (
	bcryptCacheTTL = time.Minute
	bcryptCacheMax = 1024
)

// authenticator checks the credentials of a request against one
// hostname's bearer tokens and Basic users.
type authenticator struct {
	bearer [][sha256.Size]byte
	basic  map[string]basicUser
	// slots bounds the bcrypt comparisons running at once across the
	// edge, so that a stream of wrong passwords costs a bounded share of
	// the CPU.
	slots chan struct{}

	mu    sync.Mutex
	cache map[cacheKey]time.Time // successful bcrypt checks -> expiry

	// decoy is the costliest of the bcrypt hashes (see pickDecoy); nil
	// when no user's hash is bcrypt.
	decoy []byte
}

type basicUser struct {
	sha    []byte // sha256 digest, or nil
	bcrypt []byte // bcrypt hash, or nil
}

type cacheKey struct {
	user string
	pass [sha256.Size]byte
}

// newAuthenticator checks the stored secrets; nil if there are none.
func newAuthenticator(field string, tokens []string, users map[string]string, slots chan struct{}) (*authenticator, error) {
	if len(tokens) == 0 && len(users) == 0 {
		return nil, nil
	}
	a := &authenticator{basic: make(map[string]basicUser, len(users)), slots: slots, cache: make(map[cacheKey]time.Time)}
	for i, t := range tokens {
		d, err := parseSHA256(t)
		if err != nil {
			return nil, fmt.Errorf("edge: %s.BearerTokens[%d]: %w", field, i, err)
		}
		a.bearer = append(a.bearer, [sha256.Size]byte(d))
	}
	for u, h := range users {
		if u == "" || strings.Contains(u, ":") {
			return nil, fmt.Errorf("edge: %s.BasicUsers[%q]: a user name is not empty and has no ':'", field, u)
		}
		switch {
		case strings.HasPrefix(h, "sha256:"):
			d, err := parseSHA256(h)
			if err != nil {
				return nil, fmt.Errorf("edge: %s.BasicUsers[%q]: %w", field, u, err)
			}
			a.basic[u] = basicUser{sha: d}
		case strings.HasPrefix(h, "$2a$") || strings.HasPrefix(h, "$2b$") || strings.HasPrefix(h, "$2y$"):
			if _, err := bcrypt.Cost([]byte(h)); err != nil {
				return nil, fmt.Errorf("edge: %s.BasicUsers[%q]: bad bcrypt hash: %w", field, u, err)
			}
			a.basic[u] = basicUser{bcrypt: []byte(h)}
		default:
			return nil, fmt.Errorf("edge: %s.BasicUsers[%q]: want \"sha256:<hex>\" (see HashSecret) or a bcrypt hash, never a plain password", field, u)
		}
	}
	a.decoy = pickDecoy(a.basic)
	return a, nil
}

// pickDecoy chooses the bcrypt hash that a failed check runs against
// when the user is unknown, or its password is stored as SHA-256, so
// that every failure costs what a known bcrypt user's does and timing
// does not tell which user names exist. It is the hash of the highest
// cost: a cheaper one would let an unknown user answer faster than the
// costliest known one. Ties go to the least user name, so that the choice
// does not follow map order and change from one load of a policy to the
// next. nil if no hash is bcrypt.
//
// Users whose hashes are cheaper than the decoy still fail faster than
// an unknown user; the cost of every hash should be the same.
func pickDecoy(users map[string]basicUser) []byte {
	var decoy []byte
	var decoyUser string
	decoyCost := -1
	for u, bu := range users {
		if bu.bcrypt == nil {
			continue
		}
		cost, err := bcrypt.Cost(bu.bcrypt)
		if err != nil {
			continue // newAuthenticator has checked every hash
		}
		if cost > decoyCost || cost == decoyCost && u < decoyUser {
			decoy, decoyUser, decoyCost = bu.bcrypt, u, cost
		}
	}
	return decoy
}

func parseSHA256(s string) ([]byte, error) {
	hx, ok := strings.CutPrefix(s, "sha256:")
	if !ok {
		return nil, fmt.Errorf("want \"sha256:<hex>\" (see HashSecret), never the secret itself")
	}
	d, err := hex.DecodeString(hx)
	if err != nil || len(d) != sha256.Size {
		return nil, fmt.Errorf("want \"sha256:\" and %d hex digits", 2*sha256.Size)
	}
	return d, nil
}

// challenge is the WWW-Authenticate values of a 401 for host.
func (a *authenticator) challenge(host string) []string {
	var c []string
	if len(a.basic) > 0 {
		c = append(c, fmt.Sprintf("Basic realm=%q, charset=\"UTF-8\"", host))
	}
	if len(a.bearer) > 0 {
		c = append(c, fmt.Sprintf("Bearer realm=%q", host))
	}
	return c
}

// check reports whether r carries good credentials. ctx bounds the wait
// for a bcrypt slot.
func (a *authenticator) check(ctx context.Context, r *http.Request) bool {
	h := r.Header.Get("Authorization")
	scheme, cred, _ := strings.Cut(h, " ")
	switch {
	case strings.EqualFold(scheme, "Bearer") && len(a.bearer) > 0:
		return a.checkBearer(strings.TrimSpace(cred))
	case strings.EqualFold(scheme, "Basic") && len(a.basic) > 0:
		user, pass, ok := r.BasicAuth()
		return ok && a.checkBasic(ctx, user, pass)
	}
	return false
}

// checkBearer compares the token's digest with every stored one, in time
// that does not depend on which one matches or where they differ.
func (a *authenticator) checkBearer(token string) bool {
	d := sha256.Sum256([]byte(token))
	ok := 0
	for i := range a.bearer {
		ok |= subtle.ConstantTimeCompare(d[:], a.bearer[i][:])
	}
	return ok == 1
}

var unknownUser = sha256.Sum256([]byte("sluice: no such user"))

func (a *authenticator) checkBasic(ctx context.Context, user, pass string) bool {
	d := sha256.Sum256([]byte(pass))
	u, ok := a.basic[user]
	if !ok {
		// Do the work a known user costs, so that timing does not
		// tell which user names exist.
		subtle.ConstantTimeCompare(d[:], unknownUser[:])
		a.runDecoy(ctx, pass)
		return false
	}
	if u.sha != nil {
		if subtle.ConstantTimeCompare(d[:], u.sha) == 1 {
			return true
		}
		// Microseconds against an unknown user's bcrypt would tell
		// that this user exists.
		a.runDecoy(ctx, pass)
		return false
	}
	key := cacheKey{user: user, pass: d}
	now := time.Now()
	a.mu.Lock()
	exp, hit := a.cache[key]
	a.mu.Unlock()
	if hit && now.Before(exp) {
		return true
	}
	select {
	case a.slots <- struct{}{}:
	case <-ctx.Done():
		return false
	}
	err := bcrypt.CompareHashAndPassword(u.bcrypt, []byte(pass))
	<-a.slots
	if err != nil {
		return false
	}
	a.remember(key, now)
	return true
}

// runDecoy spends on a failed check what a bcrypt user's costs, if any
// user's hash is bcrypt. Like a real check it waits for a slot, or for
// ctx to end.
func (a *authenticator) runDecoy(ctx context.Context, pass string) {
	if a.decoy == nil {
		return
	}
	select {
	case a.slots <- struct{}{}:
		bcrypt.CompareHashAndPassword(a.decoy, []byte(pass))
		<-a.slots
	case <-ctx.Done():
	}
}

// remember caches a successful check. The cache is bounded: when full, the
// expired entries go, and if none has expired, all of them.
func (a *authenticator) remember(key cacheKey, now time.Time) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.cache) >= bcryptCacheMax {
		for k, exp := range a.cache {
			if !now.Before(exp) {
				delete(a.cache, k)
			}
		}
		if len(a.cache) >= bcryptCacheMax {
			clear(a.cache)
		}
	}
	a.cache[key] = now.Add(bcryptCacheTTL)
}
