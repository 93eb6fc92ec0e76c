package gateway

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/sluice-vpn/sluice/tunnel/wireguard"
)

// Peer is a WireGuard client of the gateway.
type Peer struct {
	Name         string
	PublicKey    wireguard.Key
	PresharedKey wireguard.Key // zero: none
	// Addrs are the peer's tunnel addresses. The gateway accepts from the
	// peer only packets with one of them as source, so every flow is known
	// to belong to it.
	Addrs               []netip.Addr
	PersistentKeepalive time.Duration
}

// PeerStatus is a peer with what WireGuard knows of it now.
type PeerStatus struct {
	Peer
	Endpoint      netip.AddrPort // where its packets last came from
	LastHandshake time.Time      // zero: never
	RxBytes       uint64         // received from the peer
	TxBytes       uint64         // sent to the peer
}

var errNoWireGuard = errors.New("gateway: peers need WireGuard (Options.WireGuard)")

// AddPeer lets a peer in, or updates a peer of the same name. The other
// peers' sessions and flows are not disturbed.
func (s *Server) AddPeer(p Peer) error {
	if s.wg == nil {
		return errNoWireGuard
	}
	if p.Name == "" || p.PublicKey.IsZero() || len(p.Addrs) == 0 {
		return fmt.Errorf("gateway: peer %q needs a name, a public key and addresses", p.Name)
	}
	s.peerMu.Lock()
	defer s.peerMu.Unlock()
	owners := *s.owners.Load()
	for _, a := range p.Addrs {
		if owner, ok := owners[a.Unmap()]; ok && owner != p.Name {
			return fmt.Errorf("gateway: peer %q: address %s belongs to peer %q", p.Name, a, owner)
		}
	}
	for name, other := range s.peers {
		if name != p.Name && other.PublicKey == p.PublicKey {
			return fmt.Errorf("gateway: peer %q: public key already used by peer %q", p.Name, name)
		}
	}
	old, replacing := s.peers[p.Name]
	if replacing && old.PublicKey != p.PublicKey {
		if err := s.wg.RemovePeer(old.PublicKey); err != nil {
			return fmt.Errorf("gateway: peer %q: %w", p.Name, err)
		}
	}
	allowed := make([]netip.Prefix, len(p.Addrs))
	for i, a := range p.Addrs {
		allowed[i] = netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen())
	}
	err := s.wg.AddPeer(wireguard.Peer{
		PublicKey:           p.PublicKey,
		PresharedKey:        p.PresharedKey,
		AllowedIPs:          allowed,
		PersistentKeepalive: p.PersistentKeepalive,
	})
	if err != nil {
		return fmt.Errorf("gateway: peer %q: %w", p.Name, err)
	}
	s.peers[p.Name] = p
	s.publishOwners()
	if replacing {
		s.endFlowsOf(old.Addrs, p.Addrs)
	}
	return nil
}

// RemovePeer shuts a peer out: WireGuard forgets its key and every flow
// it had open is closed.
func (s *Server) RemovePeer(name string) error {
	if s.wg == nil {
		return errNoWireGuard
	}
	s.peerMu.Lock()
	defer s.peerMu.Unlock()
	p, ok := s.peers[name]
	if !ok {
		return fmt.Errorf("gateway: no peer %q", name)
	}
	if err := s.wg.RemovePeer(p.PublicKey); err != nil {
		return fmt.Errorf("gateway: peer %q: %w", name, err)
	}
	delete(s.peers, name)
	s.publishOwners()
	s.endFlowsOf(p.Addrs, nil)
	return nil
}

// Peers lists the peers with their WireGuard status, sorted by name.
func (s *Server) Peers() ([]PeerStatus, error) {
	if s.wg == nil {
		return nil, errNoWireGuard
	}
	stats, err := s.wg.Peers()
	if err != nil {
		return nil, fmt.Errorf("gateway: %w", err)
	}
	byKey := make(map[wireguard.Key]wireguard.PeerStats, len(stats))
	for _, st := range stats {
		byKey[st.PublicKey] = st
	}
	s.peerMu.Lock()
	out := make([]PeerStatus, 0, len(s.peers))
	for _, p := range s.peers {
		st := byKey[p.PublicKey]
		out = append(out, PeerStatus{Peer: p, Endpoint: st.Endpoint, LastHandshake: st.LastHandshake, RxBytes: st.RxBytes, TxBytes: st.TxBytes})
	}
	s.peerMu.Unlock()
	slices.SortFunc(out, func(a, b PeerStatus) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// publishOwners rebuilds the address-to-peer map that the data path reads
// without locks. Called with peerMu held.
func (s *Server) publishOwners() {
	owners := make(map[netip.Addr]string)
	for name, p := range s.peers {
		for _, a := range p.Addrs {
			owners[a.Unmap()] = name
		}
	}
	s.owners.Store(&owners)
}

// peerOf names the peer that owns a tunnel address; "" in TUN mode or for
// an address no peer owns.
func (s *Server) peerOf(a netip.Addr) string {
	return (*s.owners.Load())[a.Unmap()]
}

// endFlowsOf evicts the flows from addresses a peer no longer has.
func (s *Server) endFlowsOf(old, kept []netip.Addr) {
	gone := make(map[netip.Addr]bool)
	for _, a := range old {
		gone[a.Unmap()] = true
	}
	for _, a := range kept {
		delete(gone, a.Unmap())
	}
	if len(gone) == 0 {
		return
	}
	for _, e := range s.table.Snapshot() {
		if gone[e.Key.Client.Addr().Unmap()] {
			s.table.Evict(e.ID)
		}
	}
}
