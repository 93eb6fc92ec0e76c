// Package client is sluice's client side as a library: a WireGuard tunnel
// in user space, with no TUN device, no routes and no privileges, and the
// net package's shapes on top of it (DialContext, Listen, ListenPacket, an
// *http.Client), so that a Go program moves its traffic into the tunnel by
// swapping one function.
//
// The canonical use is
//
//	c, err := client.New(client.Options{ConfigFile: "client.conf"})
//	...
//	defer c.Close()
//	if err := c.Up(ctx); err != nil {
//		...
//	}
//	resp, err := c.HTTPClient().Get("https://example.com/")
//
// The configuration is a wg-quick file, such as the one `sluice peer add`
// prints. Its Address lines are the client's own addresses inside the
// tunnel; its DNS servers answer every name the client looks up, through
// the tunnel and never through the host's resolver; its peers' AllowedIPs
// say which destinations the tunnel reaches, and nothing else is
// reachable. The program's own sockets and the host's routes are left
// alone: only the connections made through a Client use the tunnel.
//
// A Client looks after its tunnel by itself. wireguard-go repeats
// handshakes as long as there is traffic; on top of that, when the peer
// has not been heard from for Options.StaleAfter while the client sends,
// the Client resolves a peer endpoint given as a DNS name again, opens new
// UDP sockets, and starts a fresh handshake, as wg-quick's reresolve-dns
// does for a kernel tunnel. It logs each time the tunnel comes up and each
// time it is lost.
package client

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"sync"
	"time"

	"go.uber.org/zap"
	"golang.zx2c4.com/wireguard/conn"

	"github.com/sluice-vpn/sluice/netstack"
	"github.com/sluice-vpn/sluice/tunnel/wireguard"
)

// Defaults and limits.
const (
	// DefaultMTU is the tunnel MTU when the configuration sets none, as
	// wg-quick picks for a 1500-byte path.
	DefaultMTU = 1420
	// DefaultStaleAfter is Options.StaleAfter's default: a WireGuard
	// session lasts at most three minutes, so a peer silent for longer
	// while the client sends is gone.
	DefaultStaleAfter = 3 * time.Minute

	// sessionLifetime is WireGuard's Reject-After-Time: a handshake older
	// than this carries no more traffic.
	sessionLifetime = 180 * time.Second
	// kickInterval is how often Up starts a handshake while it waits,
	// WireGuard's Rekey-Timeout: wireguard-go sends no more often anyway.
	kickInterval = 5 * time.Second
	// upPoll is how often Up looks for the handshake.
	upPoll = 20 * time.Millisecond
	// resolveTimeout bounds one lookup of an endpoint's name.
	resolveTimeout = 10 * time.Second
	// maxRecoveryInterval is the longest wait between two attempts to get
	// a lost tunnel back, reresolve-dns's period.
	maxRecoveryInterval = 30 * time.Second
)

// ErrClosed is returned by the methods of a Client after Close.
var ErrClosed = errors.New("client: closed")

// Options configures New. The configuration is required, given exactly one
// way; every other field's zero value means a sensible default.
type Options struct {
	// Config is the tunnel's configuration, typed.
	Config *wireguard.Config
	// ConfigText is the tunnel's configuration in wg-quick's format.
	ConfigText string
	// ConfigFile is the path of a wg-quick configuration file.
	ConfigFile string

	// Bind carries the encrypted packets; nil means UDP sockets on all
	// local addresses at the configuration's ListenPort (any free port if
	// it sets none).
	Bind conn.Bind
	// EndpointResolver resolves peer endpoints given as DNS names. Those
	// are looked up outside the tunnel, which cannot carry its own
	// handshake; nil means the host's resolver, net.DefaultResolver.
	EndpointResolver *net.Resolver
	// StaleAfter is how long the peer may stay silent, with no handshake
	// either, while the client sends, before the tunnel counts as lost
	// and the client re-resolves the endpoint, rebinds and starts over
	// [DefaultStaleAfter].
	StaleAfter time.Duration
	// Logger receives the client's logs: the tunnel coming up and being
	// lost, endpoints re-resolved; wireguard-go's own messages at Debug.
	// Nil means no logs.
	Logger *zap.Logger
}

// Client is a WireGuard tunnel in user space and a TCP/IP stack behind it.
// Its methods are safe for concurrent use.
type Client struct {
	log        *zap.Logger
	listenPort int
	ns         *netstack.Client
	addrs      []netip.Addr // the tunnel addresses, IPv4 unmapped
	has4, has6 bool         // whether there is an address of each family
	dev        *wireguard.Device
	dns        *resolver
	routes     []netip.Prefix
	transport  *http.Transport
	endpoints  *net.Resolver
	staleAfter time.Duration
	started    time.Time

	mu    sync.Mutex // guards the peers' state and serialises their reconfiguration
	peers []*peer

	ctx       context.Context // done once Close starts
	cancel    context.CancelFunc
	wg        sync.WaitGroup // the monitor
	closeOnce sync.Once
}

// peer is one peer of the configuration and what the monitor knows of it.
type peer struct {
	cfg  wireguard.Peer // as configured; Endpoint is zero while a name is unresolved
	name string         // the endpoint's host when it is a DNS name
	port uint16         // the endpoint's port when it is a DNS name

	up           bool      // a handshake completed and the peer was not lost since
	handshake    time.Time // the latest handshake seen
	tx, rx       uint64    // counters at the last check
	heard        time.Time // when rx last grew
	lastRecovery time.Time
	lastResolve  time.Time
}

// endpoint describes where the peer is, for messages.
func (p *peer) endpoint() string {
	if p.name != "" {
		return net.JoinHostPort(p.name, strconv.Itoa(int(p.port)))
	}
	return p.cfg.Endpoint.String()
}

// hasEndpoint reports whether the configuration gives the peer an
// endpoint, resolved or not.
func (p *peer) hasEndpoint() bool { return p.name != "" || p.cfg.Endpoint.IsValid() }

// New builds the tunnel from opts and starts it: the UDP sockets are open
// and packets flow once New returns, and the first handshake starts with
// the first connection or with Up.
func New(opts Options) (*Client, error) {
	conf, err := opts.config()
	if err != nil {
		return nil, err
	}
	if opts.StaleAfter < 0 {
		return nil, fmt.Errorf("client: Options.StaleAfter %s is negative", opts.StaleAfter)
	}
	if opts.StaleAfter == 0 {
		opts.StaleAfter = DefaultStaleAfter
	}
	if opts.EndpointResolver == nil {
		opts.EndpointResolver = net.DefaultResolver
	}
	log := opts.Logger
	if log == nil {
		log = zap.NewNop()
	}
	log = log.Named("client")

	iface := conf.Interface
	if len(iface.Addresses) == 0 {
		return nil, errors.New("client: config: [Interface] has no Address: the tunnel needs an address of its own")
	}
	if len(conf.Peers) == 0 {
		return nil, errors.New("client: config: no [Peer] section: the tunnel needs a peer to send to")
	}
	mtu := iface.MTU
	if mtu == 0 {
		mtu = DefaultMTU
	}
	if mtu < 1280 && slices.ContainsFunc(iface.Addresses, func(p netip.Prefix) bool { return p.Addr().Is6() }) {
		return nil, fmt.Errorf("client: config: MTU %d is below IPv6's minimum of 1280", mtu)
	}

	c := &Client{
		log:        log,
		listenPort: iface.ListenPort,
		endpoints:  opts.EndpointResolver,
		staleAfter: opts.StaleAfter,
		started:    time.Now(),
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	defer func() {
		if c.dev == nil {
			c.cancel() // New failed
		}
	}()
	var devPeers []wireguard.Peer
	for i, cp := range conf.Peers {
		p, err := newPeer(cp)
		if err != nil {
			return nil, fmt.Errorf("client: config: [Peer] %d (%s): %w", i+1, cp.PublicKey, err)
		}
		p.heard = c.started
		c.peers = append(c.peers, p)
		devPeers = append(devPeers, p.cfg)
		c.routes = append(c.routes, cp.AllowedIPs...)
	}

	// The tunnel is the stack's only interface, and WireGuard has
	// authenticated every packet on it.
	c.ns, err = netstack.NewClient(netstack.ClientOptions{
		Addrs:          iface.Addresses,
		Routes:         c.routes,
		MTU:            mtu,
		TrustChecksums: true,
		Logger:         log.Named("netstack"),
	})
	if err != nil {
		return nil, fmt.Errorf("client: %w", err)
	}
	c.addrs = c.ns.Addrs()
	for _, a := range c.addrs {
		c.has4 = c.has4 || a.Is4()
		c.has6 = c.has6 || a.Is6()
	}
	c.dev, err = wireguard.New(c.ns, wireguard.Options{
		PrivateKey: iface.PrivateKey,
		ListenPort: iface.ListenPort,
		Bind:       opts.Bind,
		Peers:      devPeers,
		Logger:     log,
	})
	if err != nil {
		c.ns.Close() // the device may have failed before it took the stack over
		return nil, fmt.Errorf("client: %w", err)
	}
	c.dns = &resolver{servers: slices.Clone(iface.DNS), dial: c.dialRouted}
	c.transport = &http.Transport{
		// The tunnel is the route: the host's proxy settings do not apply.
		Proxy:                 nil,
		DialContext:           c.DialContext,
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          100,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: time.Second,
	}
	c.wg.Add(1)
	go c.monitor()
	log.Info("tunnel started",
		zap.Stringer("public_key", c.dev.PublicKey()),
		zap.Int("listen_port", c.dev.ListenPort()),
		zap.Stringers("addresses", iface.Addresses),
		zap.Stringers("dns", iface.DNS))
	return c, nil
}

// config returns the configuration opts give, parsed and copied.
func (o *Options) config() (*wireguard.Config, error) {
	n := 0
	for _, set := range []bool{o.Config != nil, o.ConfigText != "", o.ConfigFile != ""} {
		if set {
			n++
		}
	}
	if n != 1 {
		return nil, errors.New("client: give exactly one of Options.Config, Options.ConfigText and Options.ConfigFile")
	}
	switch {
	case o.Config != nil:
		conf := *o.Config
		conf.Interface.Addresses = slices.Clone(conf.Interface.Addresses)
		conf.Interface.DNS = slices.Clone(conf.Interface.DNS)
		conf.Peers = slices.Clone(conf.Peers)
		for i := range conf.Peers {
			conf.Peers[i].AllowedIPs = slices.Clone(conf.Peers[i].AllowedIPs)
		}
		if conf.Interface.PrivateKey.IsZero() {
			return nil, errors.New("client: Options.Config.Interface.PrivateKey is required")
		}
		return &conf, nil
	case o.ConfigText != "":
		conf, err := wireguard.ParseConfig(o.ConfigText)
		if err != nil {
			return nil, fmt.Errorf("client: Options.ConfigText: %w", err)
		}
		return conf, nil
	default:
		text, err := os.ReadFile(o.ConfigFile)
		if err != nil {
			return nil, fmt.Errorf("client: Options.ConfigFile: %w", err)
		}
		conf, err := wireguard.ParseConfig(string(text))
		if err != nil {
			return nil, fmt.Errorf("client: Options.ConfigFile %s: %w", o.ConfigFile, err)
		}
		return conf, nil
	}
}

func newPeer(cp wireguard.ConfigPeer) (*peer, error) {
	p := &peer{cfg: wireguard.Peer{
		PublicKey:           cp.PublicKey,
		PresharedKey:        cp.PresharedKey,
		AllowedIPs:          slices.Clone(cp.AllowedIPs),
		PersistentKeepalive: time.Duration(cp.PersistentKeepalive) * time.Second,
	}}
	if cp.Endpoint == "" {
		return p, nil
	}
	if ap, err := netip.ParseAddrPort(cp.Endpoint); err == nil {
		p.cfg.Endpoint = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
		return p, nil
	}
	host, port, err := net.SplitHostPort(cp.Endpoint)
	if err != nil {
		return nil, fmt.Errorf("Endpoint %q is not HOST:PORT", cp.Endpoint)
	}
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil || n == 0 {
		return nil, fmt.Errorf("Endpoint %q: port %q is not a number in [1, 65535]", cp.Endpoint, port)
	}
	p.name, p.port = host, uint16(n)
	return p, nil
}

// Up starts a handshake with every peer that has an endpoint and returns
// once each has completed one, or with ctx's error (wrapped, so that
// errors.Is finds it) if ctx ends first. A tunnel whose handshakes are
// fresh returns at once. Up is optional: the first connection through the
// tunnel starts the handshake too, but only Up tells a tunnel that works
// from one that cannot (a wrong key, an endpoint that does not answer).
func (c *Client) Up(ctx context.Context) error {
	if c.ctx.Err() != nil {
		return ErrClosed
	}
	var targets []*peer
	for _, p := range c.peers {
		if p.hasEndpoint() {
			targets = append(targets, p)
		}
	}
	if len(targets) == 0 {
		return errors.New("client: no peer has an Endpoint, so there is nobody to start a handshake with")
	}
	poll := time.NewTicker(upPoll)
	defer poll.Stop()
	var lastKick time.Time
	for {
		stats, err := c.stats()
		if err != nil {
			return err
		}
		var waiting []*peer
		for _, p := range targets {
			st := stats[p.cfg.PublicKey]
			if st.LastHandshake.IsZero() || time.Since(st.LastHandshake) >= sessionLifetime {
				waiting = append(waiting, p)
				continue
			}
			c.mu.Lock()
			c.noteHandshake(p, st)
			c.mu.Unlock()
		}
		if len(waiting) == 0 {
			return nil
		}
		if time.Since(lastKick) >= kickInterval {
			lastKick = time.Now()
			for _, p := range waiting {
				if err := c.kick(ctx, p); err != nil {
					c.log.Debug("cannot start a handshake", zap.String("endpoint", p.endpoint()), zap.Error(err))
				}
			}
		}
		select {
		case <-ctx.Done():
			names := make([]string, len(waiting))
			for i, p := range waiting {
				names[i] = p.endpoint()
				if names[i] == "" {
					names[i] = p.cfg.PublicKey.String()
				}
			}
			return fmt.Errorf("client: no handshake with %v: %w", names, ctx.Err())
		case <-c.ctx.Done():
			return ErrClosed
		case <-poll.C:
		}
	}
}

// stats returns the device's view of each peer by public key.
func (c *Client) stats() (map[wireguard.Key]wireguard.PeerStats, error) {
	list, err := c.dev.Peers()
	if errors.Is(err, wireguard.ErrClosed) {
		return nil, ErrClosed
	}
	if err != nil {
		return nil, fmt.Errorf("client: %w", err)
	}
	m := make(map[wireguard.Key]wireguard.PeerStats, len(list))
	for _, st := range list {
		m[st.PublicKey] = st
	}
	return m, nil
}

// kick makes wireguard-go start a handshake with p now, resolving p's
// endpoint first if it is a name not resolved yet. wireguard-go has no
// call for it, but it sends a keepalive at once when persistent keepalive
// is switched on, and a keepalive with no session starts a handshake: so
// kick switches it on (off and on again if it is configured), and back to
// what the configuration says.
func (c *Client) kick(ctx context.Context, p *peer) error {
	if err := c.resolveIfNeeded(ctx, p); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	cfg := p.cfg
	cfg.Endpoint = netip.AddrPort{} // keep the device's, which may have moved
	ka := cfg.PersistentKeepalive
	steps := []time.Duration{time.Second, 0}
	if ka != 0 {
		steps = []time.Duration{0, ka}
	}
	for _, k := range steps {
		cfg.PersistentKeepalive = k
		if err := c.dev.AddPeer(cfg); err != nil {
			return err
		}
	}
	return nil
}

// resolveIfNeeded resolves p's endpoint name unless it was resolved
// already, and configures the address.
func (c *Client) resolveIfNeeded(ctx context.Context, p *peer) error {
	c.mu.Lock()
	need := p.name != "" && !p.cfg.Endpoint.IsValid()
	c.mu.Unlock()
	if !need {
		return nil
	}
	_, err := c.resolve(ctx, p)
	return err
}

// resolve looks p's endpoint name up again and, if it now points
// elsewhere, moves the peer there. It reports whether the endpoint
// changed.
func (c *Client) resolve(ctx context.Context, p *peer) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, resolveTimeout)
	defer cancel()
	addrs, err := c.endpoints.LookupNetIP(ctx, "ip", p.name)
	c.mu.Lock()
	defer c.mu.Unlock()
	p.lastResolve = time.Now()
	if err != nil {
		return false, fmt.Errorf("client: resolve endpoint %s: %w", p.endpoint(), err)
	}
	if len(addrs) == 0 {
		return false, fmt.Errorf("client: resolve endpoint %s: no addresses", p.endpoint())
	}
	old := p.cfg.Endpoint
	for _, a := range addrs {
		if netip.AddrPortFrom(a.Unmap(), p.port) == old {
			return false, nil // still one of the name's addresses: stay
		}
	}
	p.cfg.Endpoint = netip.AddrPortFrom(addrs[0].Unmap(), p.port)
	if err := c.dev.AddPeer(p.cfg); err != nil {
		p.cfg.Endpoint = old
		return false, fmt.Errorf("client: endpoint %s: %w", p.endpoint(), err)
	}
	if old.IsValid() {
		c.log.Info("endpoint re-resolved", zap.String("endpoint", p.endpoint()), zap.Stringer("from", old), zap.Stringer("to", p.cfg.Endpoint))
	} else {
		c.log.Debug("endpoint resolved", zap.String("endpoint", p.endpoint()), zap.Stringer("address", p.cfg.Endpoint))
	}
	return true, nil
}

// restart replaces p by a fresh copy of itself, which drops its session,
// and starts a handshake: the way to make wireguard-go give up a session
// the peer has forgotten (a restarted gateway) before it expires.
func (c *Client) restart(p *peer) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.dev.RemovePeer(p.cfg.PublicKey); err != nil {
		return err
	}
	cfg := p.cfg
	ka := cfg.PersistentKeepalive
	cfg.PersistentKeepalive = max(ka, time.Second) // on from off: a keepalive, hence a handshake
	if err := c.dev.AddPeer(cfg); err != nil {
		return err
	}
	if ka == 0 {
		cfg.Endpoint, cfg.PersistentKeepalive = netip.AddrPort{}, 0
		return c.dev.AddPeer(cfg)
	}
	return nil
}

// monitor watches the peers until Close: it logs the tunnel coming up and
// being lost, and gets a lost tunnel back.
func (c *Client) monitor() {
	defer c.wg.Done()
	interval := min(5*time.Second, max(c.staleAfter/4, 50*time.Millisecond))
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for _, p := range c.peers {
		if err := c.resolveIfNeeded(c.ctx, p); err != nil && c.ctx.Err() == nil {
			c.log.Warn("cannot resolve the endpoint yet; retrying", zap.Error(err))
		}
	}
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-tick.C:
			c.check()
		}
	}
}

// check looks at each peer once.
func (c *Client) check() {
	stats, err := c.stats()
	if err != nil {
		return
	}
	now := time.Now()
	retry := min(c.staleAfter, maxRecoveryInterval)
	rebound := false
	for _, p := range c.peers {
		st := stats[p.cfg.PublicKey]
		c.mu.Lock()
		if st.TxBytes < p.tx || st.RxBytes < p.rx {
			p.tx, p.rx = 0, 0 // restart re-created the peer
		}
		sending := st.TxBytes > p.tx
		if st.RxBytes > p.rx {
			p.heard = now
		}
		p.tx, p.rx = st.TxBytes, st.RxBytes
		fresh := c.noteHandshake(p, st)
		since := p.handshake
		if since.Before(c.started) {
			since = c.started
		}
		stale := now.Sub(since) > c.staleAfter && now.Sub(p.heard) > c.staleAfter
		recover := false
		switch {
		case fresh:
		case p.up && stale && sending:
			p.up = false
			recover = true
			c.log.Warn("handshake lost: the peer has not answered for a while; re-resolving and rebinding",
				zap.String("peer", p.cfg.PublicKey.String()), zap.String("endpoint", p.endpoint()),
				zap.Duration("since_handshake", now.Sub(p.handshake).Round(time.Second)))
		case !p.up && stale && sending && p.hasEndpoint() && now.Sub(p.lastRecovery) >= retry:
			recover = true
		}
		unresolved := p.name != "" && !p.cfg.Endpoint.IsValid() && now.Sub(p.lastResolve) >= kickInterval
		if recover {
			p.lastRecovery = now
		}
		c.mu.Unlock()

		if recover {
			if p.name != "" {
				if _, err := c.resolve(c.ctx, p); err != nil && c.ctx.Err() == nil {
					c.log.Warn("cannot re-resolve the endpoint", zap.Error(err))
				}
			}
			if !rebound {
				rebound = true
				if err := c.dev.SetListenPort(c.listenPort); err != nil {
					c.log.Warn("cannot rebind the UDP sockets", zap.Error(err))
				} else {
					c.log.Debug("rebound the UDP sockets", zap.Int("listen_port", c.dev.ListenPort()))
				}
			}
			if err := c.restart(p); err != nil && c.ctx.Err() == nil {
				c.log.Warn("cannot restart the handshake", zap.Error(err))
			}
		} else if unresolved {
			if _, err := c.resolve(c.ctx, p); err != nil && c.ctx.Err() == nil {
				c.log.Warn("cannot resolve the endpoint yet; retrying", zap.Error(err))
			}
		}
	}
}

// noteHandshake records st's handshake if it is new, and logs the peer
// coming up. It reports whether the handshake was new. The caller holds
// c.mu.
func (c *Client) noteHandshake(p *peer, st wireguard.PeerStats) bool {
	if !st.LastHandshake.After(p.handshake) {
		return false
	}
	p.handshake = st.LastHandshake
	if !p.up {
		p.up = true
		c.log.Info("handshake up", zap.String("peer", p.cfg.PublicKey.String()), zap.Stringer("endpoint", st.Endpoint))
	}
	return true
}

// PeerStatus is what the client knows of one of its peers now.
type PeerStatus struct {
	// PublicKey identifies the peer.
	PublicKey wireguard.Key
	// Endpoint is where the client sends the peer's packets; zero while
	// it is a name not resolved yet.
	Endpoint netip.AddrPort
	// LastHandshake is when the last handshake completed; zero if never.
	// A session lasts three minutes after it, less if it is renewed.
	LastHandshake time.Time
	// RxBytes and TxBytes count the WireGuard traffic from and to the
	// peer since the client started or last restarted the peer.
	RxBytes, TxBytes uint64
}

// Peers returns the state of each peer, in configuration order.
func (c *Client) Peers() ([]PeerStatus, error) {
	if c.ctx.Err() != nil {
		return nil, ErrClosed
	}
	stats, err := c.stats()
	if err != nil {
		return nil, err
	}
	out := make([]PeerStatus, len(c.peers))
	for i, p := range c.peers {
		st := stats[p.cfg.PublicKey]
		out[i] = PeerStatus{PublicKey: p.cfg.PublicKey, Endpoint: st.Endpoint, LastHandshake: st.LastHandshake, RxBytes: st.RxBytes, TxBytes: st.TxBytes}
	}
	return out, nil
}

// PublicKey returns the client's public key, the one its peers configure.
func (c *Client) PublicKey() wireguard.Key { return c.dev.PublicKey() }

// Addrs returns the client's own addresses inside the tunnel.
func (c *Client) Addrs() []netip.Addr { return slices.Clone(c.addrs) }

// DNSServers are the configuration's DNS servers, which answer every name
// the client looks up. A configuration that `sluice peer add` wrote names
// the gateway's own tunnel addresses there.
func (c *Client) DNSServers() []netip.Addr { return slices.Clone(c.dns.servers) }

// ListenPort returns the UDP port the client's WireGuard sockets use now.
func (c *Client) ListenPort() int { return c.dev.ListenPort() }

// HTTPClient returns an HTTP client whose connections all go through the
// tunnel, names resolved by the tunnel's DNS servers. The host's proxy
// settings are ignored. Clients returned by different calls share one
// pool of connections.
func (c *Client) HTTPClient() *http.Client {
	return &http.Client{Transport: c.transport}
}

// Close takes the tunnel down: it aborts every connection made through
// it, closes the UDP sockets and waits for the client's goroutines. It is
// idempotent.
func (c *Client) Close() error {
	c.closeOnce.Do(func() {
		c.cancel()
		c.wg.Wait()
		c.transport.CloseIdleConnections()
		c.dev.Close() // closes the stack too
		c.log.Info("tunnel closed")
	})
	return nil
}
