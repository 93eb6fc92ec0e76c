// Package service is what `sluice serve` runs: a gateway bound to a state
// directory, with a control socket there that serves the admin API (flows,
// status, metrics, reload) while it runs. In WireGuard mode the directory
// also holds the gateway's key and its peers, which are added and removed
// through the socket; the functions in peers.go do the same to a gateway
// that is stopped, by editing its state. In TUN mode (Options.Device) the
// directory holds only the lock and the socket.
package service

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"go.uber.org/zap"
	"golang.zx2c4.com/wireguard/tun"

	"github.com/sluice-vpn/sluice/pkg/admin"
	"github.com/sluice-vpn/sluice/pkg/edge"
	"github.com/sluice-vpn/sluice/pkg/edge/registry"
	"github.com/sluice-vpn/sluice/pkg/gateway"
	"github.com/sluice-vpn/sluice/pkg/state"
	"github.com/sluice-vpn/sluice/tunnel/wireguard"
)

// DefaultListenPort is WireGuard's usual port.
const DefaultListenPort = 51820

// SocketName is the control socket's name in the state directory.
const SocketName = "sluice.sock"

// Options configures a Service. The zero value runs a WireGuard gateway
// on UDP 51820 with its state in state.DefaultDir().
type Options struct {
	// StateDir holds the key, the peers and the control socket; "" means
	// state.DefaultDir(). Its lock is held for the service's life, so two
	// gateways, of either mode, never share one.
	StateDir string
	// Device, if set, runs the gateway in TUN mode: clients' packets come
	// from this device (a kernel TUN device, an in-memory tunnel) instead
	// of WireGuard. There are then no key, no peers and no state file,
	// and the WireGuard fields below, ListenPort to FirstPeer, are
	// ignored. The service owns the device from New on, and closes it
	// even when New fails.
	Device tun.Device
	// ListenPort is WireGuard's UDP port [51820].
	ListenPort int
	// ListenAddr limits WireGuard to one local address; the zero value
	// listens on every address.
	ListenAddr netip.Addr
	// Endpoint is the public HOST:PORT written into client configurations;
	// empty means a guess from the host's addresses, marked as such.
	Endpoint string
	// Pools are the tunnel address pools for a new state; an existing
	// state keeps its own [state.DefaultPools].
	Pools state.Pools
	// DNSUpstreams answer the DNS queries clients send to the gateway; nil
	// means the nameservers of /etc/resolv.conf.
	DNSUpstreams []netip.AddrPort
	// FirstPeer names the peer created when the state has none, so that a
	// new user is connected in one step ["peer1"]. "-" creates none.
	FirstPeer string
	// Gateway carries the gateway's egress, policy, limits, table and
	// stack options. Its Device and WireGuard must be unset: the service
	// sets them (Options.Device selects TUN mode). In WireGuard mode the
	// service also sets its Addrs and DNSUpstreams; in TUN mode those are
	// used as given.
	Gateway gateway.Options
	// Admin is a TCP address for the admin API besides the control socket;
	// it must be a loopback address unless AdminInsecure is set. Requests
	// there need the bearer token that the service keeps in the state
	// directory (TokenPath), made on the first start with Admin set.
	Admin         string
	AdminInsecure bool
	// ShutdownGrace is how long Run lets open flows drain once its
	// context is done [30s].
	ShutdownGrace time.Duration
	// Edge publishes the services that peers expose; nil publishes
	// none. WireGuard mode only.
	Edge *EdgeOptions
	// Reload re-reads the configuration on SIGHUP or an admin call; nil
	// means the configuration cannot be reloaded. It returns what can
	// change at once, and the new configuration as YAML for the API.
	Reload func(ctx context.Context) (Reloadable, []byte, error)
	// ConfigYAML is the running configuration, shown by the admin API.
	ConfigYAML []byte
	// Logger receives the service's logs; nil means none.
	Logger *zap.Logger
}

// Service is a gateway bound to a state directory.
type Service struct {
	opts   Options
	log    *zap.Logger
	store  *state.Store
	unlock func()
	gw     *gateway.Server
	device string // the TUN device's name at New; "" in WireGuard mode

	mu         sync.Mutex   // guards st and configYAML
	st         *state.State // nil in TUN mode
	configYAML []byte
	reloadMu   sync.Mutex

	first      *NewPeer
	adminToken string // for Options.Admin; "" without it

	registry *registry.Registry // nil without an edge
	edge     *edge.Edge         // set under mu, once started
	control  *controlServer     // nil in TUN mode
}

// New opens the state directory and takes its lock for the service's
// life. In WireGuard mode it loads the state (creating it, with a fresh
// key, on first start) and builds the gateway with the stored peers; in
// TUN mode it builds the gateway on Options.Device.
func New(ctx context.Context, opts Options) (*Service, error) {
	if opts.Device != nil {
		return newTUN(ctx, opts)
	}
	if opts.ListenPort == 0 {
		opts.ListenPort = DefaultListenPort
	}
	if opts.ListenPort < 1 || opts.ListenPort > 65535 {
		return nil, fmt.Errorf("service: Options.ListenPort: %d is outside 1-65535", opts.ListenPort)
	}
	if opts.FirstPeer == "" {
		opts.FirstPeer = "peer1"
	}
	if opts.Pools == (state.Pools{}) {
		opts.Pools = state.DefaultPools
	}
	s, err := open(ctx, opts)
	if err != nil {
		return nil, err
	}
	if err := s.startWireGuard(); err != nil {
		s.unlock()
		return nil, err
	}
	return s, nil
}

// open fills the defaults both modes share, checks the options both
// modes read, and opens and locks the state directory.
func open(ctx context.Context, opts Options) (*Service, error) {
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	if opts.ShutdownGrace == 0 {
		opts.ShutdownGrace = 30 * time.Second
	}
	if opts.Gateway.Device != nil {
		return nil, errors.New("service: Options.Gateway.Device: set Options.Device instead, for TUN mode")
	}
	if opts.Gateway.WireGuard != nil {
		return nil, errors.New("service: Options.Gateway.WireGuard: the service configures WireGuard itself; leave it nil")
	}
	s := &Service{opts: opts, log: opts.Logger.Named("service"), configYAML: opts.ConfigYAML}
	var err error
	if s.store, err = state.Open(opts.StateDir); err != nil {
		return nil, err
	}
	s.unlock, err = s.store.TryLock()
	if errors.Is(err, state.ErrLocked) {
		// Status, not Server: a gateway in TUN mode has no server info
		// to give, but it answers.
		if _, perr := admin.NewUnixClient(filepath.Join(s.store.Dir(), SocketName)).Status(ctx); perr == nil {
			return nil, fmt.Errorf("service: state directory %s is in use by a running gateway", s.store.Dir())
		}
		// A peer command is editing the state; it is quick.
		lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		s.unlock, err = s.store.Lock(lctx)
		cancel()
	}
	if err != nil {
		return nil, fmt.Errorf("service: state directory %s is in use: %w", s.store.Dir(), err)
	}
	if opts.Admin != "" {
		// Made here rather than in Run, so that the file is there for
		// clients by the time New returns.
		if s.adminToken, err = admin.LoadOrCreateToken(s.TokenPath()); err != nil {
			s.unlock()
			return nil, fmt.Errorf("service: %w", err)
		}
	}
	return s, nil
}

// startWireGuard loads or creates the state and builds a WireGuard
// gateway with its key and peers.
func (s *Service) startWireGuard() error {
	if err := s.loadOrCreate(); err != nil {
		return err
	}
	opts := s.opts
	if opts.DNSUpstreams == nil {
		var err error
		opts.DNSUpstreams, err = ResolvConfUpstreams("/etc/resolv.conf")
		if err != nil {
			s.log.Warn("no DNS upstream: clients' DNS queries to the gateway will be refused", zap.Error(err))
		}
	}

	priv, err := wireguard.ParseKey(s.st.PrivateKey)
	if err != nil {
		return fmt.Errorf("service: %s: private_key: %w", s.store.Path(), err)
	}
	gopts := opts.Gateway
	gopts.WireGuard = &gateway.WireGuardOptions{PrivateKey: priv, ListenPort: opts.ListenPort}
	if opts.ListenAddr.IsValid() && !opts.ListenAddr.IsUnspecified() {
		gopts.WireGuard.Bind = wireguard.NewAddrBind(opts.ListenAddr)
	}
	gopts.Addrs = s.st.GatewayAddrs()
	gopts.DNSUpstreams = opts.DNSUpstreams
	if gopts.Logger == nil {
		gopts.Logger = opts.Logger
	}
	if s.gw, err = gateway.New(gopts); err != nil {
		return err
	}
	for _, p := range s.st.Peers {
		gp, err := gatewayPeer(p)
		if err == nil {
			err = s.gw.AddPeer(gp)
		}
		if err != nil {
			s.gw.Close()
			return fmt.Errorf("service: %s: peer %q: %w", s.store.Path(), p.Name, err)
		}
	}
	return nil
}

// loadOrCreate loads the state, or makes a new one on first start. A
// state that exists but does not load is an error: nothing is written
// over it.
func (s *Service) loadOrCreate() error {
	st, err := s.store.Load()
	switch {
	case errors.Is(err, state.ErrNoState):
		key, err := wireguard.GeneratePrivateKey()
		if err != nil {
			return fmt.Errorf("service: %w", err)
		}
		if st, err = state.New(key.String(), s.opts.Pools); err != nil {
			return fmt.Errorf("service: %w", err)
		}
		s.log.Info("new state: generated the server key", zap.String("state", s.store.Path()))
	case err != nil:
		return err
	}
	st.ListenPort = s.opts.ListenPort
	if s.opts.Endpoint != "" {
		st.Endpoint = s.opts.Endpoint
	}
	if len(st.Peers) == 0 && s.opts.FirstPeer != "-" {
		np, err := addPeerToState(st, PeerRequest{Name: s.opts.FirstPeer})
		if err != nil {
			return fmt.Errorf("service: first peer: %w", err)
		}
		s.first = &np
	}
	if err := s.store.Save(st); err != nil {
		return err
	}
	s.st = st
	return nil
}

// FirstPeer is the peer created on this start because the state had none,
// with its client configuration; nil otherwise.
func (s *Service) FirstPeer() *NewPeer { return s.first }

// Edge is the edge that publishes peers' services, once Run has started
// it; nil before, and without Options.Edge.
func (s *Service) Edge() *edge.Edge {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.edge
}

// Gateway is the running gateway.
func (s *Service) Gateway() *gateway.Server { return s.gw }

// StateDir is the state directory.
func (s *Service) StateDir() string { return s.store.Dir() }

// Run starts the gateway and serves the admin API on the control socket
// (and on Options.Admin) until ctx is done; then it lets open flows drain
// for Options.ShutdownGrace, stops, and releases the state directory.
func (s *Service) Run(ctx context.Context) error {
	defer s.unlock()
	defer s.gw.Close()
	runCtx, stop := context.WithCancel(context.Background())
	defer stop()
	if err := s.gw.Start(runCtx); err != nil {
		return err
	}
	aopts := admin.Options{
		Peers: s, Flows: s, Status: s, Config: s,
		Ready: s.gw.Ready,
	}
	if !s.isTUN() {
		if err := s.startEdge(runCtx); err != nil {
			return err
		}
		aopts.Services = s
	}
	aopts.Metrics = s.metrics()
	h := admin.NewHandler(aopts)
	sock := filepath.Join(s.store.Dir(), SocketName)
	ln, err := admin.ListenUnix(sock)
	if err != nil {
		return err
	}
	// The socket is 0600: being able to open it is the credential.
	lns := []net.Listener{ln}
	hs := []http.Handler{admin.Guard(h, admin.GuardOptions{Hosts: []string{admin.UnixHost}})}
	if s.opts.Admin != "" {
		tl, th, err := s.listenAdminTCP(h)
		if err != nil {
			ln.Close()
			return err
		}
		lns, hs = append(lns, tl), append(hs, th)
	}
	apiCtx, stopAPI := context.WithCancel(context.Background())
	errc := make(chan error, len(lns))
	for i, l := range lns {
		s.log.Info("admin API", zap.String("addr", l.Addr().String()))
		go func() { errc <- admin.Serve(apiCtx, l, hs[i], s.log.Named("admin")) }()
	}

	<-ctx.Done()
	// The API stays up while flows drain, so an operator can watch them.
	// The edge's requests reach their agents through the gateway, so the
	// gateway closes only once both have drained (or the grace is over).
	grace, cancel := context.WithTimeout(context.Background(), s.opts.ShutdownGrace)
	edgeDone := make(chan struct{})
	go func() {
		defer close(edgeDone)
		s.stopEdge(grace)
	}()
	s.gw.Drain(grace)
	<-edgeDone
	s.gw.Close()
	cancel()
	stopAPI()
	var errs []error
	for range lns {
		errs = append(errs, <-errc)
	}
	return errors.Join(errs...)
}

// TokenPath is where the admin API's bearer token is kept, once a
// service with Options.Admin has been made.
func (s *Service) TokenPath() string { return filepath.Join(s.store.Dir(), admin.TokenName) }

// listenAdminTCP listens on Options.Admin, behind the token in the state
// directory. Any local user can connect to a loopback port, so, unlike
// the socket, the listener is no credential; the token file is 0600 in a
// 0700 directory, as the socket is, so it asks exactly as much as the
// socket does. The token stays the same across restarts, so scripts and
// Prometheus keep working.
func (s *Service) listenAdminTCP(h http.Handler) (net.Listener, http.Handler, error) {
	ln, err := admin.ListenTCP(s.opts.Admin, s.opts.AdminInsecure)
	if err != nil {
		return nil, nil, err
	}
	var hosts []string
	if ap, err := netip.ParseAddrPort(ln.Addr().String()); err == nil {
		hosts = append(hosts, ap.Addr().String())
	}
	return ln, admin.Guard(h, admin.GuardOptions{Token: s.adminToken, Hosts: hosts}), nil
}

func (s *Service) metrics() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		s.gw.Collector(),
	)
	if s.edge != nil {
		reg.MustRegister(s.edge.Collector())
	}
	return reg
}

// Close stops a service that was never run.
func (s *Service) Close() {
	s.gw.Close()
	s.unlock()
}

func gatewayPeer(p state.Peer) (gateway.Peer, error) {
	pub, err := wireguard.ParseKey(p.PublicKey)
	if err != nil {
		return gateway.Peer{}, fmt.Errorf("public_key: %w", err)
	}
	var psk wireguard.Key
	if p.PresharedKey != "" {
		if psk, err = wireguard.ParseKey(p.PresharedKey); err != nil {
			return gateway.Peer{}, fmt.Errorf("preshared_key: %w", err)
		}
	}
	return gateway.Peer{Name: p.Name, PublicKey: pub, PresharedKey: psk, Addrs: p.Addrs}, nil
}

// serverInfo describes the gateway of a state for client configurations.
func serverInfo(st *state.State, mtu int) (admin.ServerInfo, error) {
	priv, err := wireguard.ParseKey(st.PrivateKey)
	if err != nil {
		return admin.ServerInfo{}, err
	}
	port := st.ListenPort
	if port == 0 {
		port = DefaultListenPort
	}
	if mtu == 0 {
		mtu = 1420
	}
	return admin.ServerInfo{
		PublicKey:  priv.PublicKey().String(),
		ListenPort: port,
		DNS:        st.GatewayAddrs(),
		MTU:        mtu,
		Endpoint:   st.Endpoint,
	}, nil
}
