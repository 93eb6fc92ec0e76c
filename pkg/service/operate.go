package service

import (
	"context"
	"fmt"

	"github.com/sluice-vpn/sluice/nat"
	"github.com/sluice-vpn/sluice/pkg/admin"
)

// Reloadable is what a configuration reload changes at once.
type Reloadable struct {
	Policy nat.PolicyOptions
	Limits nat.LimiterOptions
	// Edge is the edge's part; nil leaves it as it is.
	Edge *EdgeReload
}

// Flows implements admin.FlowBackend.
func (s *Service) Flows(_ context.Context, f admin.FlowFilter) ([]admin.FlowInfo, error) {
	var out []admin.FlowInfo
	for _, e := range s.gw.Table().Snapshot() {
		fi := flowInfo(e)
		if f.Match(fi) {
			out = append(out, fi)
		}
	}
	return out, nil
}

// DeleteFlow implements admin.FlowBackend: both sides of the flow close.
func (s *Service) DeleteFlow(_ context.Context, id uint64) error {
	if !s.gw.Table().Evict(id) {
		return fmt.Errorf("%w: no flow %d", admin.ErrNotFound, id)
	}
	return nil
}

// Events implements admin.FlowBackend.
func (s *Service) Events(ctx context.Context) (<-chan admin.FlowEvent, error) {
	events, cancel := s.gw.Table().Subscribe(1024)
	out := make(chan admin.FlowEvent)
	go func() {
		defer close(out)
		defer cancel()
		for {
			select {
			case ev, ok := <-events:
				if !ok {
					return
				}
				fe := admin.FlowEvent{Type: ev.Type.String(), Flow: flowInfo(ev.Entry)}
				if ev.Type == nat.EventEnded {
					fe.Reason = ev.Reason.String()
				}
				select {
				case out <- fe:
				case <-ctx.Done():
					return
				}
			case <-ctx.Done():
				return
			}
		}
	}()
	return out, nil
}

func flowInfo(e nat.Entry) admin.FlowInfo {
	return admin.FlowInfo{
		ID: e.ID, Proto: e.Key.Proto.String(), Client: e.Key.Client, Dest: e.Key.Dest, Egress: e.Egress,
		Peer: e.Peer, State: e.State.String(),
		OrigBytes: e.OrigBytes, OrigPackets: e.OrigPackets, ReplyBytes: e.ReplyBytes, ReplyPackets: e.ReplyPackets,
		Created: e.Created, LastSeen: e.LastSeen,
	}
}

// Status implements admin.StatusBackend. In TUN mode it names the device
// and has no peers.
func (s *Service) Status(ctx context.Context) (admin.Status, error) {
	if s.isTUN() {
		return admin.Status{
			Mode:   modeTUN,
			Device: s.deviceName(),
			Flows:  s.gw.Table().Len(),
			Peers:  []admin.PeerStatus{},
		}, nil
	}
	peers, err := s.Peers(ctx)
	if err != nil {
		return admin.Status{}, err
	}
	perPeer := map[string]int{}
	flows := s.gw.Table().Snapshot()
	for _, e := range flows {
		perPeer[e.Peer]++
	}
	st := admin.Status{
		Mode:       modeWireGuard,
		PublicKey:  s.gw.PublicKey().String(),
		ListenPort: s.gw.ListenPort(),
		Flows:      len(flows),
		Peers:      make([]admin.PeerStatus, len(peers)),
	}
	s.mu.Lock()
	st.Addrs = s.st.GatewayAddrs()
	s.mu.Unlock()
	for i, p := range peers {
		st.Peers[i] = admin.PeerStatus{PeerInfo: p, Flows: perPeer[p.Name]}
	}
	st.Edge = s.edgeStatus()
	return st, nil
}

// Config implements admin.ConfigBackend.
func (s *Service) Config(context.Context) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.configYAML == nil {
		return []byte("# no configuration file: defaults and flags only\n"), nil
	}
	return s.configYAML, nil
}

// Reload implements admin.ConfigBackend: policy and limits change at once,
// and flows the new policy denies are closed. An invalid configuration is
// rejected and the running one stays.
func (s *Service) Reload(ctx context.Context) error {
	if s.opts.Reload == nil {
		return fmt.Errorf("%w: this gateway has no configuration file to reload", admin.ErrInvalid)
	}
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	r, yaml, err := s.opts.Reload(ctx)
	if err != nil {
		return fmt.Errorf("%w: %v", admin.ErrInvalid, err)
	}
	if err := s.reloadEdge(r.Edge); err != nil {
		return fmt.Errorf("%w: %v", admin.ErrInvalid, err)
	}
	if err := s.gw.SetLimits(r.Limits); err != nil {
		return fmt.Errorf("%w: %v", admin.ErrInvalid, err)
	}
	if err := s.gw.SetPolicy(r.Policy); err != nil {
		return fmt.Errorf("%w: %v", admin.ErrInvalid, err)
	}
	s.mu.Lock()
	s.configYAML = yaml
	s.mu.Unlock()
	s.log.Info("configuration reloaded")
	return nil
}
