// Package registry is the gateway's directory of exposed services: which
// agents serve each hostname, on which tunnel address, with which labels,
// and whether they are healthy. Agents register through the control API
// (Handler) and hold their place with a lease; the edge asks Pick for a
// replica per request or connection and Reports how the attempt went.
package registry

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/sluice-vpn/sluice/pkg/expose"
)

// Errors of Pick and Register.
var (
	ErrUnknownHost = errors.New("registry: no such hostname")
	ErrNoReplica   = errors.New("registry: no healthy replica")
	ErrNotAllowed  = errors.New("registry: peer may not serve this hostname")
	ErrLimit       = errors.New("registry: registration limit reached")
	// ErrInvalid wraps the reason a registration failed its checks
	// (expose.Registration.Check, a missing address or peer).
	ErrInvalid = errors.New("registry: invalid registration")
	// ErrConflict: the hostname is served with another protocol by live
	// replicas, which must all share one.
	ErrConflict = errors.New("registry: hostname served with another protocol")
	// ErrClaimed: the hostname's last holder keeps it for a while (see
	// Options.ClaimGrace); trying again later may succeed.
	ErrClaimed = errors.New("registry: hostname held by the peer that served it last")
)

// Defaults of Options.
const (
	DefaultLease           = 6 * time.Second
	DefaultFailureCooldown = 5 * time.Second
	DefaultMaxHostnames    = 1024
	DefaultMaxReplicas     = 64
	DefaultMaxPerPeer      = 16
)

// Peer is the identity of a registering agent: the WireGuard peer that
// owns the source address of its control connection.
type Peer struct {
	Name      string
	PublicKey string // base64
}

// key is how the registry names a peer in replica IDs, claims and counts:
// its name, or its public key for a peer without one.
func (p Peer) key() string {
	if p.Name != "" {
		return p.Name
	}
	return p.PublicKey
}

// Weight gives the replicas whose labels include all of Labels a share of
// their hostname's traffic.
type Weight struct {
	Labels map[string]string
	Weight int
}

// Hostname is the configuration of one hostname.
type Hostname struct {
	// Peers may serve the hostname; empty means the first peer to
	// register it, while it has a live replica and for ClaimGrace after.
	// An entry matches a peer by name or by public key.
	Peers []string
	// Weights split the traffic between groups of replicas by label;
	// empty means evenly between replicas. A replica belongs to the
	// first rule whose Labels it all carries; the rule's Weight is the
	// share of the whole group, however many replicas it has. A rule of
	// weight 0 takes its replicas out of rotation; replicas that match
	// no rule serve only when no replica of a weighted group is healthy.
	Weights []Weight
}

// Options configures a Registry. The zero value works.
type Options struct {
	// Hostnames are configured hostnames, by name.
	Hostnames map[string]Hostname
	// OnlyListed refuses registrations of hostnames not in Hostnames.
	OnlyListed bool
	// Lease is how long a registration stands without a refresh [6s];
	// agents are told to refresh every third of it.
	Lease time.Duration
	// FailureCooldown is how long a replica that failed an attempt is
	// kept out of rotation, unless it is the last one [5s].
	FailureCooldown time.Duration
	// ClaimGrace is how long a hostname that lists no peers stays its
	// last holder's after its last replica has gone, expired or
	// withdrawn [3 × Lease; negative: not at all]. Without it, any peer
	// could take the name while the holder's agent restarts.
	ClaimGrace time.Duration
	// MaxHostnames bounds the registered hostnames [1024],
	// MaxReplicas the replicas of one hostname [64], MaxPerPeer the
	// registrations of one peer [16].
	MaxHostnames, MaxReplicas, MaxPerPeer int
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// Logger receives registrations, expiries and refusals; nil: none.
	// The caller names it.
	Logger *zap.Logger
}

// Replica is one agent's registration behind a hostname.
//
// Weight is the replica's share of the hostname's traffic at the time of
// the snapshot, in the units of the weight rules (percent when they add up
// to 100): its group's weight divided by the group's healthy replicas,
// rounded, at least 1. With no rules every healthy replica has weight 1
// (an even split). 0 means the replica gets traffic only as a last resort:
// it is cooling down after a failure, its agent reports its origin down,
// matches no rule, or matches a rule of weight 0 (which keeps it out of
// rotation altogether).
//
// Labels is shared with the registry: read it, do not modify it.
type Replica struct {
	ID         string            `json:"id"`
	Hostname   string            `json:"hostname"`
	Peer       string            `json:"peer"`
	PublicKey  string            `json:"public_key"`
	Addr       netip.AddrPort    `json:"addr"`
	Protocol   string            `json:"protocol"`
	Labels     map[string]string `json:"labels,omitempty"`
	Weight     int               `json:"weight"`
	Healthy    bool              `json:"healthy"`
	OriginDown bool              `json:"origin_down,omitempty"`
	Registered time.Time         `json:"registered"`
	LastSeen   time.Time         `json:"last_seen"`
	Failures   uint64            `json:"failures"`
	LastError  string            `json:"last_error,omitempty"`
}

// Service is a hostname and its replicas, for listing. HeldBy and
// HeldUntil name the peer that keeps a hostname without replicas for a
// while after its last one went (see Options.ClaimGrace).
type Service struct {
	Hostname  string    `json:"hostname"`
	Protocol  string    `json:"protocol"`
	Replicas  []Replica `json:"replicas"`
	HeldBy    string    `json:"held_by,omitempty"`
	HeldUntil time.Time `json:"held_until,omitzero"`
}

// Registry is safe for concurrent use.
//
// One mutex guards everything: Pick's critical section is a pass over one
// hostname's replicas (at most MaxReplicas), without allocation.
// Expired replicas leave lazily: a hostname's are purged whenever it is
// touched, every hostname's by Register at most once per Lease and before
// a limit refuses a registration, so what is held stays within the limits.
type Registry struct {
	lease, cooldown, claimGrace     time.Duration
	maxHosts, maxReplicas, maxPerPr int
	now                             func() time.Time
	log                             *zap.Logger

	// identity orders the control API's check of who calls (read) before
	// ForgetPeer (write): a peer removed from the gateway between the
	// check and its registration would otherwise leave a replica behind
	// at an address that may soon be another peer's.
	identity sync.RWMutex

	mu         sync.Mutex
	hosts      map[string]Hostname // configuration, replaced whole
	onlyListed bool
	services   map[string]*service // hostnames with at least one replica held
	byID       map[string]*replica
	perPeer    map[string]int   // replicas held, by Peer.key
	claims     map[string]claim // hostnames without replicas, held for a while
	lastSweep  time.Time
}

// claim holds a hostname that lists no peers for the peer whose replicas
// served it last, until a grace period after the last one went.
type claim struct {
	peerKey, peer string // Peer.key and name
	until         time.Time
}

// service is the state of one hostname that has replicas.
type service struct {
	name     string
	protocol string
	rules    []Weight   // of the hostname's configuration, when set
	replicas []*replica // sorted by ID

	// Smooth weighted round-robin across rule groups: cur[g] is group
	// g's current weight. healthy is Pick's scratch, counting group
	// members that can be picked.
	cur     []int
	healthy []int
	picks   uint64 // sequence of picks, for least-recently-picked
}

// replica is the registry's record of one registration.
type replica struct {
	Replica  // Weight and Healthy are filled in snapshots only
	peerKey  string
	group    int // index of the first matching rule, -1 for none
	expires  time.Time
	coolTill time.Time // zero when not cooling down
	lastFail time.Time
	lastPick uint64
}

// New builds a registry.
func New(opts Options) (*Registry, error) {
	r := &Registry{
		lease:       opts.Lease,
		cooldown:    opts.FailureCooldown,
		claimGrace:  opts.ClaimGrace,
		maxHosts:    opts.MaxHostnames,
		maxReplicas: opts.MaxReplicas,
		maxPerPr:    opts.MaxPerPeer,
		now:         opts.Now,
		log:         opts.Logger,
		services:    map[string]*service{},
		byID:        map[string]*replica{},
		perPeer:     map[string]int{},
		claims:      map[string]claim{},
	}
	switch {
	case r.lease < 0:
		return nil, fmt.Errorf("registry: Options.Lease %s is negative", r.lease)
	case r.lease == 0:
		r.lease = DefaultLease
	}
	switch {
	case r.cooldown < 0:
		return nil, fmt.Errorf("registry: Options.FailureCooldown %s is negative", r.cooldown)
	case r.cooldown == 0:
		r.cooldown = DefaultFailureCooldown
	}
	if r.claimGrace == 0 {
		r.claimGrace = 3 * r.lease
	}
	for _, l := range []struct {
		name string
		v    *int
		def  int
	}{
		{"MaxHostnames", &r.maxHosts, DefaultMaxHostnames},
		{"MaxReplicas", &r.maxReplicas, DefaultMaxReplicas},
		{"MaxPerPeer", &r.maxPerPr, DefaultMaxPerPeer},
	} {
		switch {
		case *l.v < 0:
			return nil, fmt.Errorf("registry: Options.%s %d is negative", l.name, *l.v)
		case *l.v == 0:
			*l.v = l.def
		}
	}
	if r.now == nil {
		r.now = time.Now
	}
	if r.log == nil {
		r.log = zap.NewNop()
	}
	hosts, err := checkHostnames(opts.Hostnames)
	if err != nil {
		return nil, fmt.Errorf("registry: Options.Hostnames: %w", err)
	}
	r.hosts, r.onlyListed = hosts, opts.OnlyListed
	r.lastSweep = r.now()
	return r, nil
}

// checkHostnames validates a hostname configuration and returns a deep
// copy of it, so that the caller's maps may change afterwards.
func checkHostnames(hosts map[string]Hostname) (map[string]Hostname, error) {
	out := make(map[string]Hostname, len(hosts))
	for _, name := range slices.Sorted(maps.Keys(hosts)) {
		h := hosts[name]
		if err := expose.CheckHostname(name); err != nil {
			return nil, err
		}
		var c Hostname
		for i, p := range h.Peers {
			if p == "" {
				return nil, fmt.Errorf("hostname %s: peers[%d] is empty", name, i)
			}
			c.Peers = append(c.Peers, p)
		}
		for i, w := range h.Weights {
			if w.Weight < 0 {
				return nil, fmt.Errorf("hostname %s: weights[%d].weight %d is negative", name, i, w.Weight)
			}
			if err := expose.CheckLabels(w.Labels); err != nil {
				return nil, fmt.Errorf("hostname %s: weights[%d].labels: %w", name, i, err)
			}
			c.Weights = append(c.Weights, Weight{Labels: maps.Clone(w.Labels), Weight: w.Weight})
		}
		out[name] = c
	}
	return out, nil
}

// SetHostnames replaces the hostname configuration (a reload).
// Registrations that the new configuration no longer allows are dropped;
// the weights of the others are recomputed.
func (r *Registry) SetHostnames(hosts map[string]Hostname, onlyListed bool) error {
	hosts, err := checkHostnames(hosts)
	if err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.hosts, r.onlyListed = hosts, onlyListed
	now := r.now()
	for _, name := range slices.Sorted(maps.Keys(r.services)) {
		s := r.services[name]
		r.purge(s, now)
		if r.services[name] == nil {
			continue
		}
		h, configured := hosts[name]
		// Without a peer list the hostname belongs to one peer; if the
		// old configuration let several share it, the one that
		// registered first keeps it.
		holder := ""
		if len(h.Peers) == 0 {
			var first *replica
			for _, rp := range s.replicas {
				if first == nil || rp.Registered.Before(first.Registered) {
					first = rp
				}
			}
			holder = first.peerKey
		}
		for _, rp := range slices.Clone(s.replicas) {
			var why string
			switch {
			case !configured && onlyListed:
				why = "the hostname is no longer configured"
			case len(h.Peers) > 0 && !peerListed(h.Peers, rp.Peer, rp.PublicKey):
				why = "the peer is not in the hostname's peers"
			case len(h.Peers) == 0 && rp.peerKey != holder:
				why = "the hostname is no longer shared; peer " + holder + " holds it"
			default:
				continue
			}
			r.log.Info("registration dropped by new configuration",
				zap.String("replica", rp.ID), zap.String("reason", why))
			r.remove(s, rp, time.Time{})
		}
		if r.services[name] != nil {
			s.setRules(h.Weights)
		}
	}
	return nil
}

func peerListed(peers []string, name, publicKey string) bool {
	for _, p := range peers {
		if p == name && name != "" || p == publicKey && publicKey != "" {
			return true
		}
	}
	return false
}

// setRules gives s the weight rules of its configuration and regroups its
// replicas; the round-robin starts afresh if the rules changed.
func (s *service) setRules(rules []Weight) {
	// Unchanged rules keep the round-robin's place, so that a reload
	// does not disturb the split.
	if s.cur == nil || !slices.EqualFunc(s.rules, rules, func(a, b Weight) bool {
		return a.Weight == b.Weight && maps.Equal(a.Labels, b.Labels)
	}) {
		s.cur = make([]int, len(rules))
		s.healthy = make([]int, len(rules))
	}
	s.rules = rules
	for _, rp := range s.replicas {
		rp.group = groupOf(rules, rp.Labels)
	}
}

// groupOf returns the index of the first rule whose labels are all in
// labels, or -1.
func groupOf(rules []Weight, labels map[string]string) int {
next:
	for i, w := range rules {
		for k, v := range w.Labels {
			if lv, ok := labels[k]; !ok || lv != v {
				continue next
			}
		}
		return i
	}
	return -1
}

// ReplicaID is the ID of peer's registration of hostname at port, as
// Register names it.
func ReplicaID(peer Peer, hostname string, port uint16) string {
	return peer.key() + "/" + hostname + "/" + strconv.Itoa(int(port))
}

// Register adds or refreshes peer's registration, served at addr.
func (r *Registry) Register(peer Peer, addr netip.Addr, reg expose.Registration) (expose.Lease, error) {
	if err := reg.Check(); err != nil {
		return expose.Lease{}, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if !addr.IsValid() {
		return expose.Lease{}, fmt.Errorf("%w: no address", ErrInvalid)
	}
	if peer.key() == "" {
		return expose.Lease{}, fmt.Errorf("%w: anonymous peer", ErrInvalid)
	}
	id := ReplicaID(peer, reg.Hostname, reg.Port)
	r.mu.Lock()
	defer r.mu.Unlock()
	now := r.now()
	r.sweepIfDue(now)
	s := r.services[reg.Hostname]
	if s != nil {
		r.purge(s, now)
		s = r.services[reg.Hostname]
	}
	if err := r.admit(peer, reg, s, now); err != nil {
		r.log.Info("registration refused", zap.String("replica", id), zap.Error(err))
		return expose.Lease{}, err
	}
	if s == nil {
		delete(r.claims, reg.Hostname) // the live replica holds it now
		s = &service{name: reg.Hostname, protocol: reg.Protocol}
		s.setRules(r.hosts[reg.Hostname].Weights)
		r.services[reg.Hostname] = s
	}
	rp := r.byID[id]
	fresh := rp == nil
	if fresh {
		rp = &replica{peerKey: peer.key()}
		rp.ID, rp.Hostname, rp.Registered = id, reg.Hostname, now
		r.byID[id] = rp
		r.perPeer[rp.peerKey]++
		i, _ := slices.BinarySearchFunc(s.replicas, id, func(x *replica, id string) int { return strings.Compare(x.ID, id) })
		s.replicas = slices.Insert(s.replicas, i, rp)
	}
	rp.Peer, rp.PublicKey = peer.Name, peer.PublicKey
	rp.Addr = netip.AddrPortFrom(addr.Unmap(), reg.Port)
	rp.Protocol = reg.Protocol
	s.protocol = reg.Protocol
	if !maps.Equal(rp.Labels, reg.Labels) || fresh {
		// Labels are shared with snapshots: replace, never modify.
		rp.Labels = maps.Clone(reg.Labels)
		rp.group = groupOf(s.rules, rp.Labels)
	}
	if rp.OriginDown != reg.OriginDown && !fresh {
		if reg.OriginDown {
			r.log.Info("replica's origin is down", zap.String("replica", id))
		} else {
			r.log.Info("replica's origin is up again", zap.String("replica", id))
		}
	}
	rp.OriginDown = reg.OriginDown
	rp.LastSeen = now
	rp.expires = now.Add(r.lease)
	if fresh {
		r.log.Info("replica registered", zap.String("replica", id),
			zap.Stringer("addr", rp.Addr), zap.String("protocol", rp.Protocol), zap.Any("labels", rp.Labels),
			zap.Bool("origin_down", rp.OriginDown))
	} else {
		r.log.Debug("replica refreshed", zap.String("replica", id))
	}
	w, _ := s.weightOf(rp, now)
	return expose.Lease{
		ID:             id,
		TTLSeconds:     r.lease.Seconds(),
		RefreshSeconds: (r.lease / 3).Seconds(),
		Weight:         w,
	}, nil
}

// admit decides whether peer may register reg on s (nil: no live replica
// of the hostname), from the configuration, the claims and the limits.
// s holds no expired replica.
func (r *Registry) admit(peer Peer, reg expose.Registration, s *service, now time.Time) error {
	name := reg.Hostname
	h, configured := r.hosts[name]
	switch {
	case !configured && r.onlyListed:
		return fmt.Errorf("%w: %s is not a configured hostname (edge.hostnames), and only those may be served", ErrNotAllowed, name)
	case len(h.Peers) > 0:
		if !peerListed(h.Peers, peer.Name, peer.PublicKey) {
			return fmt.Errorf("%w: %s may only be served by peers %s, not by %s", ErrNotAllowed, name, strings.Join(h.Peers, ", "), peer.key())
		}
	case s != nil:
		// The first peer to register an unshared hostname holds it while
		// any of its replicas lives.
		if holder := s.replicas[0].peerKey; holder != peer.key() {
			return fmt.Errorf("%w: %s is served by peer %s; to let %s serve it too, list both under edge.hostnames.%s.peers in the config",
				ErrNotAllowed, name, holder, peer.key(), name)
		}
	default:
		// ...and for a grace period after its last replica has gone.
		if c := r.claims[name]; r.claimed(name, now) && c.peerKey != peer.key() {
			return fmt.Errorf("%w: %s was last served by peer %s, which keeps it for %s more; to hand it over at once, list %s under edge.hostnames.%s.peers in the config",
				ErrClaimed, name, c.peerKey, c.until.Sub(now).Round(100*time.Millisecond), peer.key(), name)
		}
	}
	if s != nil && s.protocol != reg.Protocol {
		// A refresh may change the protocol of the hostname's only replica.
		if len(s.replicas) != 1 || s.replicas[0].ID != ReplicaID(peer, name, reg.Port) {
			return fmt.Errorf("%w: %s is served as %s, not %s", ErrConflict, name, s.protocol, reg.Protocol)
		}
	}
	if r.byID[ReplicaID(peer, name, reg.Port)] != nil {
		return nil // a refresh takes no more room
	}
	if err := r.checkLimits(peer, s); err != nil {
		// The counts may include replicas that expired elsewhere; look
		// again before refusing.
		r.sweep(now)
		return r.checkLimits(peer, r.services[name])
	}
	return nil
}

func (r *Registry) checkLimits(peer Peer, s *service) error {
	switch {
	case s == nil && len(r.services) >= r.maxHosts:
		return fmt.Errorf("%w: %d hostnames registered (MaxHostnames)", ErrLimit, r.maxHosts)
	case s != nil && len(s.replicas) >= r.maxReplicas:
		return fmt.Errorf("%w: %s has %d replicas (MaxReplicas)", ErrLimit, s.name, r.maxReplicas)
	case r.perPeer[peer.key()] >= r.maxPerPr:
		return fmt.Errorf("%w: peer %s has %d registrations (MaxPerPeer)", ErrLimit, peer.key(), r.maxPerPr)
	}
	return nil
}

// Deregister removes a registration of peer's. Removing one that is not
// there (already expired, say) is not an error.
func (r *Registry) Deregister(peer Peer, hostname string, port uint16) error {
	if err := expose.CheckHostname(hostname); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if port == 0 {
		return fmt.Errorf("%w: port is 0", ErrInvalid)
	}
	id := ReplicaID(peer, hostname, port)
	r.mu.Lock()
	defer r.mu.Unlock()
	rp := r.byID[id]
	if rp == nil {
		return nil
	}
	r.log.Info("replica deregistered", zap.String("replica", id))
	r.remove(r.services[hostname], rp, r.now())
	return nil
}

// ForgetPeer removes every registration of the named peer, as when the
// peer is removed from the gateway: its address may soon be another
// peer's. It returns how many it removed.
func (r *Registry) ForgetPeer(name string) int {
	r.identity.Lock()
	defer r.identity.Unlock()
	r.mu.Lock()
	defer r.mu.Unlock()
	var gone []*replica
	for _, rp := range r.byID {
		if rp.Peer == name {
			gone = append(gone, rp)
		}
	}
	for _, rp := range gone {
		r.log.Info("replica removed with its peer", zap.String("replica", rp.ID))
		r.remove(r.services[rp.Hostname], rp, time.Time{})
	}
	for host, c := range r.claims {
		if c.peer == name {
			delete(r.claims, host)
		}
	}
	return len(gone)
}

// Known reports whether hostname is registered or configured.
func (r *Registry) Known(hostname string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.hosts[hostname]; ok {
		return true
	}
	now := r.now()
	if s := r.services[hostname]; s != nil {
		r.purge(s, now) // what expires leaves a claim behind
	}
	return r.services[hostname] != nil || r.claimed(hostname, now)
}

// Services lists the hostnames with their replicas, sorted by hostname,
// replicas sorted by ID. Configured hostnames without replicas are listed
// with none.
func (r *Registry) Services() []Service {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := r.now()
	r.sweep(now)
	names := slices.Collect(maps.Keys(r.services))
	for h := range r.hosts {
		if r.services[h] == nil {
			names = append(names, h)
		}
	}
	for h := range r.claims {
		if _, configured := r.hosts[h]; !configured && r.services[h] == nil {
			names = append(names, h)
		}
	}
	slices.Sort(names)
	out := make([]Service, 0, len(names))
	for _, name := range names {
		svc := Service{Hostname: name, Replicas: []Replica{}}
		if c, ok := r.claims[name]; ok && r.services[name] == nil {
			svc.HeldBy, svc.HeldUntil = c.peerKey, c.until
		}
		if s := r.services[name]; s != nil {
			svc.Protocol = s.protocol
			for _, rp := range s.replicas {
				c := rp.Replica
				c.Labels = maps.Clone(rp.Labels)
				c.Weight, c.Healthy = s.weightOf(rp, now)
				svc.Replicas = append(svc.Replicas, c)
			}
		}
		out = append(out, svc)
	}
	return out
}

// Counts returns how many hostnames have replicas, how many replicas
// there are, and how many of them are healthy (neither cooling down after
// a failure nor reporting their origin down), for metrics.
func (r *Registry) Counts() (hostnames, replicas, healthy int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := r.now()
	r.sweep(now)
	for _, s := range r.services {
		for _, rp := range s.replicas {
			replicas++
			if !rp.resting(now) {
				healthy++
			}
		}
	}
	return len(r.services), replicas, healthy
}

// sweepIfDue purges every hostname's expired replicas if it has not been
// done for a Lease.
func (r *Registry) sweepIfDue(now time.Time) {
	if now.Sub(r.lastSweep) >= r.lease || now.Before(r.lastSweep) {
		r.sweep(now)
	}
}

func (r *Registry) sweep(now time.Time) {
	r.lastSweep = now
	for _, s := range r.services {
		r.purge(s, now)
	}
	r.sweepClaims(now)
}

// purge removes the expired replicas of s, and s itself if none is left.
func (r *Registry) purge(s *service, now time.Time) {
	for i := 0; i < len(s.replicas); {
		rp := s.replicas[i]
		if !now.After(rp.expires) {
			i++
			continue
		}
		r.log.Info("replica expired", zap.String("replica", rp.ID),
			zap.Duration("silent", now.Sub(rp.LastSeen)))
		r.remove(s, rp, now) // shifts the rest down to i
	}
}

// remove forgets rp, a replica of s. If it was the last, and the
// hostname lists no peers, rp's peer keeps the hostname for ClaimGrace
// from now; a zero now (the configuration or the peer went away) keeps
// nothing.
func (r *Registry) remove(s *service, rp *replica, now time.Time) {
	delete(r.byID, rp.ID)
	if r.perPeer[rp.peerKey]--; r.perPeer[rp.peerKey] <= 0 {
		delete(r.perPeer, rp.peerKey)
	}
	s.replicas = slices.DeleteFunc(s.replicas, func(x *replica) bool { return x == rp })
	if len(s.replicas) > 0 {
		return
	}
	delete(r.services, s.name)
	if now.IsZero() || r.claimGrace < 0 || len(r.hosts[s.name].Peers) > 0 {
		return
	}
	if len(r.claims) >= r.maxHosts {
		r.sweepClaims(now)
	}
	if len(r.claims) >= r.maxHosts {
		// As many claims as hostnames: a peer cycling through names.
		// Holding this one is a courtesy that the bound outranks.
		r.log.Debug("hostname claim not kept: too many", zap.String("hostname", s.name))
		return
	}
	r.claims[s.name] = claim{peerKey: rp.peerKey, peer: rp.Peer, until: now.Add(r.claimGrace)}
}

// claimed reports whether hostname's last holder still keeps it: its
// agent may be restarting, so the name is not unknown.
func (r *Registry) claimed(hostname string, now time.Time) bool {
	c, ok := r.claims[hostname]
	return ok && now.Before(c.until)
}

// sweepClaims forgets the claims that have run out.
func (r *Registry) sweepClaims(now time.Time) {
	for name, c := range r.claims {
		if !now.Before(c.until) {
			delete(r.claims, name)
		}
	}
}
