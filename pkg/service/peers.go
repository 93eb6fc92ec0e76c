package service

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/sluice-vpn/sluice/pkg/admin"
	"github.com/sluice-vpn/sluice/pkg/state"
	"github.com/sluice-vpn/sluice/tunnel/wireguard"
)

// PeerRequest asks for a new peer.
type PeerRequest struct {
	Name string
	// PublicKey is the key of a peer that keeps its own private key; zero
	// means generate a key pair and put the private key in the config.
	PublicKey wireguard.Key
	// Endpoint is the gateway's public HOST:PORT for the configuration;
	// empty means the one the gateway was given, else a guess.
	Endpoint string
}

// NewPeer is a peer just added, with its client configuration.
type NewPeer struct {
	Peer   admin.PeerInfo
	Config *wireguard.Config
	// PrivateKeyKnown is false when the peer keeps its own private key:
	// the configuration then lacks it.
	PrivateKeyKnown bool
	// EndpointGuessed says the Endpoint in the configuration is a guess.
	EndpointGuessed bool
}

// addPeerToState adds a peer to st, generating its keys as asked, and
// returns it with a client configuration for the gateway st describes.
func addPeerToState(st *state.State, r PeerRequest) (NewPeer, error) {
	req, priv, err := r.keys()
	if err != nil {
		return NewPeer{}, err
	}
	return addToState(st, req, priv, r.Endpoint)
}

// addToState adds the peer req describes to st and returns it with its
// client configuration; priv is its private key, zero if it keeps its own.
func addToState(st *state.State, req admin.AddPeerRequest, priv wireguard.Key, endpoint string) (NewPeer, error) {
	p, err := st.AddPeer(state.Peer{Name: req.Name, PublicKey: req.PublicKey, PresharedKey: req.PresharedKey})
	if err != nil {
		// The same words whether the gateway runs or not.
		return NewPeer{}, classify(err)
	}
	info, err := serverInfo(st, 0)
	if err != nil {
		return NewPeer{}, err
	}
	return newPeer(admin.AddPeerResponse{Peer: peerInfo(p), Server: info}, req.PresharedKey, priv, endpoint)
}

// addVia adds the peer req describes through a running gateway's API.
func addVia(ctx context.Context, c *admin.Client, req admin.AddPeerRequest, priv wireguard.Key, endpoint string) (NewPeer, error) {
	resp, err := c.AddPeer(ctx, req)
	if err != nil {
		return NewPeer{}, err
	}
	return newPeer(resp, req.PresharedKey, priv, endpoint)
}

// keys makes the request that goes to the gateway: the public key and a
// fresh preshared key. The private key, if generated, stays here.
func (r PeerRequest) keys() (admin.AddPeerRequest, wireguard.Key, error) {
	var priv wireguard.Key
	pub := r.PublicKey
	if pub.IsZero() {
		var err error
		if priv, err = wireguard.GeneratePrivateKey(); err != nil {
			return admin.AddPeerRequest{}, priv, err
		}
		pub = priv.PublicKey()
	}
	psk, err := wireguard.GeneratePresharedKey()
	if err != nil {
		return admin.AddPeerRequest{}, priv, err
	}
	return admin.AddPeerRequest{Name: r.Name, PublicKey: pub.String(), PresharedKey: psk.String()}, priv, nil
}

// newPeer builds the client configuration of a peer.
func newPeer(resp admin.AddPeerResponse, psk string, priv wireguard.Key, endpoint string) (NewPeer, error) {
	np := NewPeer{Peer: resp.Peer, PrivateKeyKnown: !priv.IsZero()}
	if endpoint == "" {
		endpoint = resp.Server.Endpoint
	}
	if endpoint == "" {
		endpoint, np.EndpointGuessed = GuessEndpoint(resp.Server.ListenPort), true
	}
	serverKey, err := wireguard.ParseKey(resp.Server.PublicKey)
	if err != nil {
		return np, fmt.Errorf("gateway public key: %w", err)
	}
	pskKey, err := wireguard.ParseKey(psk)
	if err != nil {
		return np, err
	}
	var addrs []netip.Prefix
	for _, a := range resp.Peer.Addrs {
		addrs = append(addrs, netip.PrefixFrom(a, a.BitLen()))
	}
	np.Config = &wireguard.Config{
		Interface: wireguard.Interface{PrivateKey: priv, Addresses: addrs, DNS: resp.Server.DNS, MTU: resp.Server.MTU},
		Peers: []wireguard.ConfigPeer{{
			PublicKey:           serverKey,
			PresharedKey:        pskKey,
			Endpoint:            endpoint,
			AllowedIPs:          []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")},
			PersistentKeepalive: 25,
		}},
	}
	return np, nil
}

func peerInfo(p state.Peer) admin.PeerInfo {
	return admin.PeerInfo{Name: p.Name, PublicKey: p.PublicKey, Addrs: p.Addrs}
}

// Server implements admin.PeerBackend; in TUN mode there is no server
// for a client configuration to name.
func (s *Service) Server(context.Context) (admin.ServerInfo, error) {
	if s.isTUN() {
		return admin.ServerInfo{}, s.errNoPeers()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	info, err := serverInfo(s.st, s.opts.Gateway.MTU)
	info.ListenPort = s.gw.ListenPort()
	return info, err
}

// Peers implements admin.PeerBackend.
func (s *Service) Peers(context.Context) ([]admin.PeerInfo, error) {
	if s.isTUN() {
		return nil, s.errNoPeers()
	}
	peers, err := s.gw.Peers()
	if err != nil {
		return nil, err
	}
	out := make([]admin.PeerInfo, len(peers))
	for i, p := range peers {
		out[i] = admin.PeerInfo{Name: p.Name, PublicKey: p.PublicKey.String(), Addrs: p.Addrs, RxBytes: p.RxBytes, TxBytes: p.TxBytes}
		if p.Endpoint.IsValid() {
			out[i].Endpoint = p.Endpoint.String()
		}
		if !p.LastHandshake.IsZero() {
			t := p.LastHandshake
			out[i].LastHandshake = &t
		}
	}
	return out, nil
}

// AddPeer implements admin.PeerBackend: the peer is stored, then let in.
func (s *Service) AddPeer(_ context.Context, req admin.AddPeerRequest) (admin.AddPeerResponse, error) {
	if s.isTUN() {
		return admin.AddPeerResponse{}, s.errNoPeers()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	next := s.st.Clone()
	p, err := next.AddPeer(state.Peer{Name: req.Name, PublicKey: req.PublicKey, PresharedKey: req.PresharedKey})
	if err != nil {
		return admin.AddPeerResponse{}, classify(err)
	}
	gp, err := gatewayPeer(p)
	if err != nil {
		return admin.AddPeerResponse{}, fmt.Errorf("%w: %v", admin.ErrInvalid, err)
	}
	if err := s.store.Save(next); err != nil {
		return admin.AddPeerResponse{}, err
	}
	if err := s.gw.AddPeer(gp); err != nil {
		// Keep the state true to what runs.
		s.store.Save(s.st)
		return admin.AddPeerResponse{}, err
	}
	s.st = next
	info, err := serverInfo(s.st, s.opts.Gateway.MTU)
	info.ListenPort = s.gw.ListenPort()
	return admin.AddPeerResponse{Peer: peerInfo(p), Server: info}, err
}

// RemovePeer implements admin.PeerBackend: the peer is shut out, then
// forgotten.
func (s *Service) RemovePeer(_ context.Context, name string) error {
	if s.isTUN() {
		return s.errNoPeers()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	next := s.st.Clone()
	if _, err := next.RemovePeer(name); err != nil {
		return classify(err)
	}
	if err := s.store.Save(next); err != nil {
		return err
	}
	if err := s.gw.RemovePeer(name); err != nil {
		s.store.Save(s.st)
		return err
	}
	s.st = next
	if s.registry != nil {
		s.registry.ForgetPeer(name)
	}
	return nil
}

// classify maps state errors onto the admin API's classes.
func classify(err error) error {
	switch {
	case errors.Is(err, state.ErrNoPeer):
		return fmt.Errorf("%w: %v", admin.ErrNotFound, err)
	case errors.Is(err, state.ErrPeerExists):
		return fmt.Errorf("%w: %v", admin.ErrConflict, err)
	}
	return fmt.Errorf("%w: %v", admin.ErrInvalid, err)
}

// AddPeer adds a peer to the gateway whose state is in dir: through its
// control socket when it runs, so that it applies at once, else by
// editing the state under its lock.
func AddPeer(ctx context.Context, dir string, r PeerRequest) (NewPeer, error) {
	req, priv, err := r.keys()
	if err != nil {
		return NewPeer{}, err
	}
	var np NewPeer
	err = withGateway(ctx, dir,
		func(c *admin.Client) (err error) {
			np, err = addVia(ctx, c, req, priv, r.Endpoint)
			return err
		},
		func(st *state.State) (save bool, err error) {
			np, err = addToState(st, req, priv, r.Endpoint)
			return true, err
		})
	return np, err
}

// AddPeerVia adds a peer through a running gateway's API client.
func AddPeerVia(ctx context.Context, c *admin.Client, r PeerRequest) (NewPeer, error) {
	req, priv, err := r.keys()
	if err != nil {
		return NewPeer{}, err
	}
	return addVia(ctx, c, req, priv, r.Endpoint)
}

// RemovePeer removes a peer from the gateway whose state is in dir, like
// AddPeer adds one.
func RemovePeer(ctx context.Context, dir, name string) error {
	return withGateway(ctx, dir,
		func(c *admin.Client) error { return c.RemovePeer(ctx, name) },
		func(st *state.State) (bool, error) {
			_, err := st.RemovePeer(name)
			return true, err
		})
}

// ListPeers lists the peers of the gateway whose state is in dir, with
// their WireGuard status when it runs (running reports which).
func ListPeers(ctx context.Context, dir string) (peers []admin.PeerInfo, running bool, err error) {
	err = withGateway(ctx, dir,
		func(c *admin.Client) error {
			running = true
			peers, err = c.Peers(ctx)
			return err
		},
		func(st *state.State) (bool, error) {
			for _, p := range st.Peers {
				peers = append(peers, peerInfo(p))
			}
			slices.SortFunc(peers, func(a, b admin.PeerInfo) int { return strings.Compare(a.Name, b.Name) })
			return false, nil
		})
	return peers, running, err
}

// withGateway runs online against the gateway of dir when one answers on
// its control socket, else offline on its state, under the state's lock,
// saving the state if offline says so. A gateway that is starting holds
// the lock before it answers: then both are tried again until one works
// or a few seconds have passed.
func withGateway(ctx context.Context, dir string, online func(*admin.Client) error, offline func(*state.State) (save bool, err error)) error {
	store, err := state.Open(dir)
	if err != nil {
		return err
	}
	client := admin.NewUnixClient(filepath.Join(store.Dir(), SocketName))
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := online(client)
		if !errors.Is(err, admin.ErrNotRunning) {
			return err
		}
		unlock, err := store.TryLock()
		if err == nil {
			defer unlock()
			st, err := store.Load()
			if err != nil {
				return err
			}
			save, err := offline(st)
			if err != nil || !save {
				return err
			}
			return store.Save(st)
		}
		if !errors.Is(err, state.ErrLocked) || time.Now().After(deadline) {
			return fmt.Errorf("state %s is locked, but no gateway answers on its control socket: %w", store.Dir(), err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}
