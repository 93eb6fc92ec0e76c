package service

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"time"

	"go.uber.org/zap"

	"github.com/sluice-vpn/sluice/pkg/admin"
	"github.com/sluice-vpn/sluice/pkg/edge"
	"github.com/sluice-vpn/sluice/pkg/edge/registry"
	"github.com/sluice-vpn/sluice/pkg/expose"
)

// EdgeOptions publish the services that peers expose (`sluice expose`):
// the registry their agents register with, and the edge's public
// listeners that route to them.
type EdgeOptions struct {
	// Registry configures the directory of hostnames and replicas; its
	// Logger is the service's when nil.
	Registry registry.Options
	// Edge configures the listeners, routes and per-hostname policies.
	// The service sets Registry and Dial; Logger is the service's when
	// nil.
	Edge edge.Options
}

// EdgeReload is what a reload changes in the edge: the hostnames'
// peers, weights and policies. Listeners and certificates stay until a
// restart.
type EdgeReload struct {
	Hostnames  map[string]registry.Hostname
	OnlyListed bool
	Policies   map[string]edge.Policy
}

// controlServer answers agents on expose.ControlPort of the gateway's
// tunnel addresses.
type controlServer struct {
	srv  *http.Server
	done chan error
}

// startEdge serves the control API to agents inside the tunnel and, if
// the edge is configured, the edge's listeners. Without an edge, agents
// are told so when they try to register, rather than left to time out.
func (s *Service) startEdge(ctx context.Context) error {
	ln, err := s.gw.ListenLocal(expose.ControlPort)
	if err != nil {
		return fmt.Errorf("service: control API for agents: %w", err)
	}
	handler := http.Handler(http.HandlerFunc(noEdge))
	if eo := s.opts.Edge; eo != nil {
		ro := eo.Registry
		if ro.Logger == nil {
			ro.Logger = s.opts.Logger.Named("registry")
		}
		if s.registry, err = registry.New(ro); err != nil {
			ln.Close()
			return fmt.Errorf("service: %w", err)
		}
		o := eo.Edge
		o.Registry = s.registry
		o.Dial = s.gw.DialPeer
		if o.Logger == nil {
			o.Logger = s.opts.Logger
		}
		e, err := edge.New(o)
		if err != nil {
			ln.Close()
			return fmt.Errorf("service: %w", err)
		}
		if err := e.Start(ctx); err != nil {
			ln.Close()
			return fmt.Errorf("service: %w", err)
		}
		s.mu.Lock()
		s.edge = e
		s.mu.Unlock()
		handler = s.registry.Handler(s.peerOf)
	}
	s.control = &controlServer{
		srv: &http.Server{
			Handler:           handler,
			ReadHeaderTimeout: 5 * time.Second,
			// A registration is a few hundred bytes each way: a
			// peer trickling one must not hold a connection, which
			// every agent's refreshes share the backlog with.
			ReadTimeout:    10 * time.Second,
			WriteTimeout:   10 * time.Second,
			IdleTimeout:    2 * time.Minute,
			MaxHeaderBytes: 16 << 10,
			ErrorLog:       zap.NewStdLog(s.log.Named("control")),
		},
		done: make(chan error, 1),
	}
	go func() { s.control.done <- s.control.srv.Serve(ln) }()
	return nil
}

// peerOf names the peer behind an agent's tunnel address.
func (s *Service) peerOf(a netip.Addr) (registry.Peer, bool) {
	p, ok := s.gw.PeerByAddr(a)
	if !ok {
		return registry.Peer{}, false
	}
	return registry.Peer{Name: p.Name, PublicKey: p.PublicKey.String()}, true
}

// stopEdge lets the edge's requests finish until ctx, then stops the
// edge and the control API.
func (s *Service) stopEdge(ctx context.Context) {
	if s.edge != nil {
		s.edge.Shutdown(ctx)
		s.edge.Close()
	}
	if s.control != nil {
		s.control.srv.Close()
		if err := <-s.control.done; err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, net.ErrClosed) {
			s.log.Warn("control API", zap.Error(err))
		}
	}
}

// noEdge answers agents of a gateway that publishes nothing.
func noEdge(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusForbidden)
	json.NewEncoder(w).Encode(expose.ErrorBody{Error: "this gateway publishes no services: start it with --edge-http, --edge-https or --edge-tcp (or edge: in its configuration)"})
}

// Services implements admin.ServiceBackend.
func (s *Service) Services(context.Context) ([]admin.ServiceInfo, error) {
	if s.registry == nil {
		return []admin.ServiceInfo{}, nil
	}
	return s.registry.Services(), nil
}

// reloadEdge applies the edge part of a reload.
func (s *Service) reloadEdge(r *EdgeReload) error {
	if r == nil || s.registry == nil {
		return nil
	}
	// The policies first: they are what may still fail (a credential
	// hash, say) once the configuration has validated.
	if err := s.edge.SetPolicies(r.Policies); err != nil {
		return err
	}
	return s.registry.SetHostnames(r.Hostnames, r.OnlyListed)
}

// edgeStatus is the edge's part of Status; nil without an edge.
func (s *Service) edgeStatus() *admin.EdgeStatus {
	e := s.Edge()
	if e == nil {
		return nil
	}
	st := &admin.EdgeStatus{Listeners: []string{}}
	if a := e.HTTPAddr(); a != nil {
		st.Listeners = append(st.Listeners, "http "+a.String())
	}
	if a := e.HTTPSAddr(); a != nil {
		st.Listeners = append(st.Listeners, "https "+a.String())
	}
	for _, a := range e.TCPAddrs() {
		st.Listeners = append(st.Listeners, "tcp "+a.String())
	}
	st.Hostnames, st.Replicas, st.Healthy = s.registry.Counts()
	return st
}
