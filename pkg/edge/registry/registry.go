// Package registry is the gateway's directory of exposed services: which
// agents serve each hostname, on which tunnel address, with which labels,
// and whether they are healthy. Agents register through the control API
// (Handler) and hold their place with a lease; the edge asks Pick for a
// replica per request or connection and Reports how the attempt went.
package registry

import (
	"errors"
	"net/http"
	"net/netip"
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
)

// Peer is the identity of a registering agent: the WireGuard peer that
// owns the source address of its control connection.
type Peer struct {
	Name      string
	PublicKey string // base64
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
	// register it, while it has a live replica.
	Peers []string
	// Weights split the traffic between groups of replicas by label;
	// empty means evenly between replicas.
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
	// MaxHostnames bounds the registered hostnames [1024],
	// MaxReplicas the replicas of one hostname [64], MaxPerPeer the
	// registrations of one peer [16].
	MaxHostnames, MaxReplicas, MaxPerPeer int
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// Logger receives registrations, expiries and refusals; nil: none.
	Logger *zap.Logger
}

// Replica is one agent's registration behind a hostname.
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
	Registered time.Time         `json:"registered"`
	LastSeen   time.Time         `json:"last_seen"`
	Failures   uint64            `json:"failures"`
	LastError  string            `json:"last_error,omitempty"`
}

// Service is a hostname and its replicas, for listing.
type Service struct {
	Hostname string    `json:"hostname"`
	Protocol string    `json:"protocol"`
	Replicas []Replica `json:"replicas"`
}

// Registry is safe for concurrent use.
type Registry struct{}

// New builds a registry.
func New(opts Options) (*Registry, error) { panic("registry: not yet built") }

// SetHostnames replaces the hostname configuration (a reload).
func (r *Registry) SetHostnames(hosts map[string]Hostname, onlyListed bool) error {
	panic("registry: not yet built")
}

// Register adds or refreshes peer's registration, served at addr.
func (r *Registry) Register(peer Peer, addr netip.Addr, reg expose.Registration) (expose.Lease, error) {
	panic("registry: not yet built")
}

// Deregister removes a registration of peer's.
func (r *Registry) Deregister(peer Peer, hostname string, port uint16) error {
	panic("registry: not yet built")
}

// Pick chooses a replica of hostname serving protocol, skipping the IDs
// in exclude (replicas already tried for this request).
func (r *Registry) Pick(hostname, protocol string, exclude []string) (Replica, error) {
	panic("registry: not yet built")
}

// Report tells how an attempt on replica id went: nil for success.
func (r *Registry) Report(id string, err error) { panic("registry: not yet built") }

// Known reports whether hostname is registered or configured.
func (r *Registry) Known(hostname string) bool { panic("registry: not yet built") }

// Services lists the hostnames with their replicas, sorted by hostname.
func (r *Registry) Services() []Service { panic("registry: not yet built") }

// Handler serves the control API to agents. peerOf names the peer that
// owns a tunnel address (the source of the control connection).
func (r *Registry) Handler(peerOf func(netip.Addr) (Peer, bool)) http.Handler {
	panic("registry: not yet built")
}
