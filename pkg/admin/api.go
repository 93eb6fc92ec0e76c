// Package admin is the gateway's control API: JSON over HTTP, served only
// on a unix socket in the state directory (or on loopback), never on a
// public address. The CLI's peer commands talk to a running gateway
// through it.
package admin

import (
	"context"
	"errors"
	"net/netip"
	"time"

	"github.com/sluice-vpn/sluice/pkg/edge/registry"
)

// PeerInfo describes a peer and its WireGuard status.
type PeerInfo struct {
	Name          string       `json:"name"`
	PublicKey     string       `json:"public_key"`
	Addrs         []netip.Addr `json:"addrs"`
	Endpoint      string       `json:"endpoint,omitempty"`
	LastHandshake *time.Time   `json:"last_handshake,omitempty"`
	RxBytes       uint64       `json:"rx_bytes"`
	TxBytes       uint64       `json:"tx_bytes"`
}

// ServerInfo is what a client configuration needs to know of the gateway.
type ServerInfo struct {
	PublicKey  string       `json:"public_key"`
	ListenPort int          `json:"listen_port"`
	DNS        []netip.Addr `json:"dns"`
	MTU        int          `json:"mtu"`
	// Endpoint is the public HOST:PORT the operator configured; empty
	// when the gateway was not told it.
	Endpoint string `json:"endpoint,omitempty"`
}

// AddPeerRequest adds a peer. The private key never travels: the caller
// keeps it and sends the public key.
type AddPeerRequest struct {
	Name         string `json:"name"`
	PublicKey    string `json:"public_key"`
	PresharedKey string `json:"preshared_key,omitempty"`
}

// AddPeerResponse is the new peer and the gateway's side of its
// configuration.
type AddPeerResponse struct {
	Peer   PeerInfo   `json:"peer"`
	Server ServerInfo `json:"server"`
}

// PeerBackend manages peers. Errors of every backend wrap ErrNotFound,
// ErrConflict or ErrInvalid where those apply, which become 404, 409 and
// 400.
type PeerBackend interface {
	Peers(ctx context.Context) ([]PeerInfo, error)
	AddPeer(ctx context.Context, req AddPeerRequest) (AddPeerResponse, error)
	RemovePeer(ctx context.Context, name string) error
	Server(ctx context.Context) (ServerInfo, error)
}

// FlowBackend lists, deletes and watches flows.
type FlowBackend interface {
	Flows(ctx context.Context, f FlowFilter) ([]FlowInfo, error)
	// DeleteFlow ends a flow, closing both of its sides.
	DeleteFlow(ctx context.Context, id uint64) error
	// Events streams flow events until ctx is done, then closes the
	// channel.
	Events(ctx context.Context) (<-chan FlowEvent, error)
}

// StatusBackend reports the gateway at a glance.
type StatusBackend interface {
	Status(ctx context.Context) (Status, error)
}

// ServiceInfo is a published hostname with its replicas: the agents that
// serve it, their labels, weights and health.
type ServiceInfo = registry.Service

// ServiceBackend lists the services that peers publish through the edge.
type ServiceBackend interface {
	Services(ctx context.Context) ([]ServiceInfo, error)
}

// ConfigBackend shows and reloads the running configuration.
type ConfigBackend interface {
	// Config is the running configuration as YAML.
	Config(ctx context.Context) ([]byte, error)
	// Reload re-reads the configuration and applies it; an invalid one is
	// rejected (ErrInvalid) and the running one stays.
	Reload(ctx context.Context) error
}

// Error classes the backends report.
var (
	ErrNotFound = errors.New("not found")
	ErrConflict = errors.New("conflict")
	ErrInvalid  = errors.New("invalid request")
)
