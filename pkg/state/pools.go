package state

import (
	"errors"
	"fmt"
	"net/netip"
)

// DefaultPools are the pools a new gateway uses unless configured
// otherwise: a /12 of the CGNAT range and a ULA /64.
var DefaultPools = Pools{
	V4: netip.MustParsePrefix("100.96.0.0/12"),
	V6: netip.MustParsePrefix("fd5c:1ce::/64"),
}

// Pools are the ranges tunnel addresses come from. Either may be the zero
// (or any invalid) Prefix to disable that family, not both. The gateway takes the first
// host address of each; peers get the lowest free address after it. In
// IPv4 the network and broadcast addresses are never assigned, in IPv6
// the subnet-router anycast address (the first one) is not.
type Pools struct {
	V4 netip.Prefix `json:"v4"`
	V6 netip.Prefix `json:"v6"`
}

// Validate checks both pools and returns a *FieldError naming the bad one.
func (p Pools) Validate() error { return p.validate("pools") }

func (p Pools) validate(field string) error {
	if !p.V4.IsValid() && !p.V6.IsValid() {
		return fieldErr(field, "neither v4 nor v6 is set")
	}
	if p.V4.IsValid() {
		if !p.V4.Addr().Is4() {
			return fieldErr(field+".v4", "%s is not an IPv4 prefix", p.V4)
		}
		if err := pool(p.V4).validate(field + ".v4"); err != nil {
			return err
		}
	}
	if p.V6.IsValid() {
		if !p.V6.Addr().Is6() || p.V6.Addr().Is4In6() {
			return fieldErr(field+".v6", "%s is not an IPv6 prefix", p.V6)
		}
		if err := pool(p.V6).validate(field + ".v6"); err != nil {
			return err
		}
	}
	return nil
}

// enabled returns the valid pools, IPv4 first.
func (p Pools) enabled() []pool {
	var out []pool
	if p.V4.IsValid() {
		out = append(out, pool(p.V4))
	}
	if p.V6.IsValid() {
		out = append(out, pool(p.V6))
	}
	return out
}

// pool is one address range with the allocation rules of Pools.
type pool netip.Prefix

func (p pool) String() string { return netip.Prefix(p).String() }

// validate checks that p is a valid network prefix with room for the
// gateway and at least one peer. field names p in the error; "" gives a
// plain error.
func (p pool) validate(field string) error {
	pfx := netip.Prefix(p)
	maxBits := 30 // network, gateway, one peer, broadcast
	if pfx.Addr().Is6() {
		maxBits = 126 // anycast, gateway, one peer (and one more)
	}
	var msg string
	switch {
	case !pfx.IsValid():
		msg = fmt.Sprintf("%s is not a valid prefix", pfx)
	case pfx.Masked() != pfx:
		msg = fmt.Sprintf("%s has host bits set (did you mean %s?)", pfx, pfx.Masked())
	case pfx.Bits() > maxBits:
		msg = fmt.Sprintf("%s is too small for the gateway and a peer (at most /%d)", pfx, maxBits)
	default:
		return nil
	}
	if field == "" {
		return errors.New(msg)
	}
	return &FieldError{Field: field, Msg: msg}
}

// gateway returns the gateway's address in p, the first host address.
func (p pool) gateway() netip.Addr { return netip.Prefix(p).Addr().Next() }

// last returns the highest address of p that may be assigned.
func (p pool) last() netip.Addr {
	pfx := netip.Prefix(p)
	b := pfx.Addr().AsSlice()
	for i := pfx.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	if a.Is4() {
		return a.Prev() // the broadcast address
	}
	return a
}

// allocate returns the lowest address of p after the gateway's that is not
// in used, and marks it used. The scan only passes over used addresses, so
// it is linear in the number of peers, not in the size of the pool.
func (p pool) allocate(used map[netip.Addr]struct{}) (netip.Addr, error) {
	last := p.last()
	for a := p.gateway().Next(); a.IsValid() && a.Compare(last) <= 0; a = a.Next() {
		if _, taken := used[a]; !taken {
			used[a] = struct{}{}
			return a, nil
		}
	}
	return netip.Addr{}, exhaustedError{p}
}

// exhaustedError says which pool ran out; it matches ErrPoolExhausted.
type exhaustedError struct{ pool pool }

func (e exhaustedError) Error() string {
	return fmt.Sprintf("pool %s is exhausted: every address is assigned (widen the pool or remove peers)", e.pool)
}

func (e exhaustedError) Is(target error) bool { return target == ErrPoolExhausted }
