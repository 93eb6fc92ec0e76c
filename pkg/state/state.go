// Package state keeps the gateway's durable state: its private key, its
// peers and their tunnel addresses, and the address pools they come from.
//
// A [State] is plain data that round-trips through JSON; a [Store] owns the
// directory it lives in, writes it atomically (a crash leaves the old or the
// new file, never a broken one, and the version before is kept as
// state.json.prev), refuses to load or overwrite a damaged file, and hands
// out the advisory lock that serialises the gateway and the CLI.
//
// Keys are WireGuard keys in their usual text form: standard base64 of 32
// bytes, 44 characters. This package checks the form only; it does not
// derive public keys.
package state

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"
)

// FormatVersion is the State.Version this package reads and writes.
const FormatVersion = 1

// ErrPeerExists is matched (errors.Is) by AddPeer's error when the new
// peer's name or public key is already taken.
var ErrPeerExists = errors.New("state: peer already exists")

// ErrNoPeer is matched (errors.Is) by RemovePeer's error when no peer has
// the name.
var ErrNoPeer = errors.New("state: no such peer")

// ErrPoolExhausted is matched (errors.Is) by AddPeer's error when a pool
// has no free address left.
var ErrPoolExhausted = errors.New("state: address pool exhausted")

// FieldError reports an invalid field of a State or Peer. Field is the JSON
// path of the field, such as "peers[3].public_key".
type FieldError struct {
	Field string
	Msg   string
}

// Error returns "field: message".
func (e *FieldError) Error() string { return e.Field + ": " + e.Msg }

func fieldErr(field, format string, args ...any) *FieldError {
	return &FieldError{Field: field, Msg: fmt.Sprintf(format, args...)}
}

// Peer is one client of the gateway.
type Peer struct {
	// Name identifies the peer to people and to the CLI: 1 to 64 of
	// A-Z a-z 0-9 . _ -, unique within the state.
	Name string `json:"name"`
	// PublicKey is the peer's WireGuard public key in base64, unique
	// within the state.
	PublicKey string `json:"public_key"`
	// PresharedKey is an optional WireGuard preshared key in base64.
	PresharedKey string `json:"preshared_key,omitempty"`
	// Addrs are the peer's tunnel addresses, at most one per family; each
	// stands for a /32 or /128.
	Addrs []netip.Addr `json:"addrs"`
	// Created is when the peer was added.
	Created time.Time `json:"created"`
}

// clone returns p with its own copy of Addrs, so that callers cannot reach
// into a State through a Peer they were handed.
func (p Peer) clone() Peer {
	p.Addrs = slices.Clone(p.Addrs)
	return p
}

// State is everything the gateway must remember across restarts. Its
// methods are not safe for concurrent use; the owner serialises them.
type State struct {
	// Version is the format version; FormatVersion for states this
	// package writes.
	Version int `json:"version"`
	// PrivateKey is the gateway's WireGuard private key in base64.
	PrivateKey string `json:"private_key"`
	// Pools are the ranges tunnel addresses are assigned from.
	Pools Pools `json:"pools"`
	// Peers are the gateway's clients, in the order they were added.
	Peers []Peer `json:"peers"`
	// ListenPort is the UDP port the gateway last listened on, and
	// Endpoint the public HOST:PORT it was told, if any: what a peer
	// added while the gateway is stopped needs for its configuration.
	ListenPort int    `json:"listen_port,omitempty"`
	Endpoint   string `json:"endpoint,omitempty"`
}

// New returns a valid State with no peers, or an error naming the field
// that is wrong. Pass DefaultPools unless configured otherwise.
func New(privateKey string, pools Pools) (*State, error) {
	st := &State{Version: FormatVersion, PrivateKey: privateKey, Pools: pools, Peers: []Peer{}}
	if err := st.Validate(); err != nil {
		return nil, fmt.Errorf("state: new: %w", err)
	}
	return st, nil
}

// Clone returns a deep copy of st, so that a change can be made and saved
// on the copy and adopted only once the save succeeded.
func (st *State) Clone() *State {
	c := *st
	c.Peers = make([]Peer, len(st.Peers))
	for i, p := range st.Peers {
		c.Peers[i] = p.clone()
	}
	return &c
}

// Validate checks every field and returns a *FieldError naming the first
// bad one, such as "peers[3].public_key: not 32 bytes of base64".
//
// Peer addresses need not lie inside the current pools (a pool change
// keeps existing assignments) but must be unique and must not be the
// gateway's own addresses.
func (st *State) Validate() error {
	switch {
	case st.Version == 0:
		return fieldErr("version", "missing")
	case st.Version != FormatVersion:
		return fieldErr("version", "%d is not supported (this build reads version %d)", st.Version, FormatVersion)
	}
	if err := checkKey("private_key", st.PrivateKey, true); err != nil {
		return err
	}
	if err := st.Pools.validate("pools"); err != nil {
		return err
	}
	if st.ListenPort < 0 || st.ListenPort > 65535 {
		return fieldErr("listen_port", "%d is outside 1-65535", st.ListenPort)
	}
	gw := st.GatewayAddrs()
	names := make(map[string]int, len(st.Peers))
	keys := make(map[string]int, len(st.Peers))
	addrs := make(map[netip.Addr]int, 2*len(st.Peers))
	for i, p := range st.Peers {
		f := fmt.Sprintf("peers[%d]", i)
		if err := checkName(f+".name", p.Name); err != nil {
			return err
		}
		if j, dup := names[p.Name]; dup {
			return fieldErr(f+".name", "%q is also the name of peers[%d]", p.Name, j)
		}
		names[p.Name] = i
		if err := checkKey(f+".public_key", p.PublicKey, true); err != nil {
			return err
		}
		if j, dup := keys[p.PublicKey]; dup {
			return fieldErr(f+".public_key", "also the key of peers[%d] (%q)", j, st.Peers[j].Name)
		}
		keys[p.PublicKey] = i
		if p.PresharedKey != "" {
			if err := checkKey(f+".preshared_key", p.PresharedKey, false); err != nil {
				return err
			}
		}
		if len(p.Addrs) == 0 {
			return fieldErr(f+".addrs", "empty (a peer needs at least one tunnel address)")
		}
		if err := checkAddrs(f+".addrs", p.Addrs, gw); err != nil {
			return err
		}
		for k, a := range p.Addrs {
			if j, dup := addrs[a]; dup {
				return fieldErr(fmt.Sprintf("%s.addrs[%d]", f, k), "%s is also assigned to peers[%d] (%q)", a, j, st.Peers[j].Name)
			}
			addrs[a] = i
		}
	}
	return nil
}

// checkAddrs checks one peer's addresses on their own: valid, plain (no
// zone, no IPv4-mapped IPv6), at most one per family, none the gateway's.
func checkAddrs(field string, addrs, gateway []netip.Addr) error {
	var have4, have6 bool
	for k, a := range addrs {
		f := fmt.Sprintf("%s[%d]", field, k)
		switch {
		case !a.IsValid():
			return fieldErr(f, "missing or invalid address")
		case a.Zone() != "":
			return fieldErr(f, "%s has a zone", a)
		case a.Is4In6():
			return fieldErr(f, "%s is an IPv4-mapped IPv6 address (write it as %s)", a, a.Unmap())
		case a.IsUnspecified() || a.IsMulticast() || a.IsLoopback():
			return fieldErr(f, "%s cannot be a tunnel address", a)
		case slices.Contains(gateway, a):
			return fieldErr(f, "%s is the gateway's own address", a)
		case a.Is4() && have4, a.Is6() && have6:
			return fieldErr(f, "%s is a second address of the same family", a)
		}
		have4 = have4 || a.Is4()
		have6 = have6 || a.Is6()
	}
	return nil
}

// checkName enforces [A-Za-z0-9._-]{1,64}.
func checkName(field, name string) error {
	if name == "" {
		return fieldErr(field, "missing")
	}
	if len(name) > 64 {
		return fieldErr(field, "%d bytes long (at most 64)", len(name))
	}
	for _, c := range []byte(name) {
		ok := 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-'
		if !ok {
			return fieldErr(field, "%q has characters other than A-Z a-z 0-9 . _ -", name)
		}
	}
	return nil
}

// GatewayAddrs returns the gateway's own tunnel addresses: the first host
// address of each enabled pool, IPv4 first. Invalid pools are skipped.
func (st *State) GatewayAddrs() []netip.Addr {
	var out []netip.Addr
	for _, p := range st.Pools.enabled() {
		if p.validate("") == nil {
			out = append(out, p.gateway())
		}
	}
	return out
}

// Peer returns the peer with the given name and whether there is one. The
// result is a copy.
func (st *State) Peer(name string) (Peer, bool) {
	for _, p := range st.Peers {
		if p.Name == name {
			return p.clone(), true
		}
	}
	return Peer{}, false
}

// AddPeer adds a peer and returns it as stored. The caller gives Name,
// PublicKey and optionally PresharedKey. Addrs, if empty, are allocated:
// the lowest free address of each enabled pool; given addresses are kept
// if they are free. Created is set to now if zero.
//
// On error st is unchanged. Errors are a *FieldError for a bad field, or
// match ErrPeerExists or ErrPoolExhausted.
func (st *State) AddPeer(p Peer) (Peer, error) {
	p = p.clone()
	if err := checkName("name", p.Name); err != nil {
		return Peer{}, fmt.Errorf("state: add peer: %w", err)
	}
	if err := checkKey("public_key", p.PublicKey, true); err != nil {
		return Peer{}, fmt.Errorf("state: add peer %q: %w", p.Name, err)
	}
	if p.PresharedKey != "" {
		if err := checkKey("preshared_key", p.PresharedKey, false); err != nil {
			return Peer{}, fmt.Errorf("state: add peer %q: %w", p.Name, err)
		}
	}
	used := make(map[netip.Addr]struct{}, 2*len(st.Peers)+2)
	for _, q := range st.Peers {
		if q.Name == p.Name {
			return Peer{}, fmt.Errorf("%w: name %q is taken", ErrPeerExists, p.Name)
		}
		if q.PublicKey == p.PublicKey {
			return Peer{}, fmt.Errorf("%w: public key %s already belongs to %q", ErrPeerExists, p.PublicKey, q.Name)
		}
		for _, a := range q.Addrs {
			used[a] = struct{}{}
		}
	}
	gw := st.GatewayAddrs()
	if len(p.Addrs) > 0 {
		if err := checkAddrs("addrs", p.Addrs, gw); err != nil {
			return Peer{}, fmt.Errorf("state: add peer %q: %w", p.Name, err)
		}
		for _, a := range p.Addrs {
			if _, taken := used[a]; taken {
				return Peer{}, fmt.Errorf("state: add peer %q: %w", p.Name, fieldErr("addrs", "%s is already assigned", a))
			}
		}
	} else {
		if err := st.Pools.Validate(); err != nil {
			return Peer{}, fmt.Errorf("state: add peer %q: %w", p.Name, err)
		}
		for _, pool := range st.Pools.enabled() {
			a, err := pool.allocate(used)
			if err != nil {
				return Peer{}, fmt.Errorf("state: add peer %q: %w", p.Name, err)
			}
			p.Addrs = append(p.Addrs, a)
		}
	}
	if p.Created.IsZero() {
		p.Created = time.Now().UTC().Truncate(time.Second)
	}
	st.Peers = append(st.Peers, p)
	return p.clone(), nil
}

// RemovePeer removes the peer with the given name and returns it. Its
// addresses become free again. The error matches ErrNoPeer if there is no
// such peer.
func (st *State) RemovePeer(name string) (Peer, error) {
	for i, p := range st.Peers {
		if p.Name == name {
			st.Peers = slices.Delete(st.Peers, i, i+1)
			return p, nil
		}
	}
	return Peer{}, fmt.Errorf("%w named %q", ErrNoPeer, name)
}

// SetPools replaces the address pools. Peers keep the addresses they
// have, even outside the new pools, so that no client is re-addressed
// behind its back; new peers are allocated from the new pools. It fails,
// leaving st unchanged, if the new pools are invalid or their gateway
// addresses are already assigned to a peer.
func (st *State) SetPools(pools Pools) error {
	c := *st
	c.Pools = pools
	if err := c.Validate(); err != nil {
		return fmt.Errorf("state: set pools: %w", err)
	}
	st.Pools = pools
	return nil
}
