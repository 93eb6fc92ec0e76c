// Package gateway is sluice's VPN gateway as a library: it wires a packet
// source to a user-space network stack that terminates every flow, and the
// stack to the in-process NAT that re-dials each flow from the egress
// socket pool. The packet source is either WireGuard (the stack is the
// wireguard-go device's TUN side) or any tun.Device: a kernel TUN device,
// an in-memory tunnel.
//
// The canonical use is
//
//	srv, err := gateway.New(gateway.Options{WireGuard: &gateway.WireGuardOptions{PrivateKey: key}})
//	...
//	err = srv.Start(ctx)
//	...
//	err = srv.AddPeer(gateway.Peer{Name: "laptop", PublicKey: pub, Addrs: addrs})
//	...
//	srv.Close()
package gateway

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/tun"

	"github.com/sluice-vpn/sluice/nat"
	"github.com/sluice-vpn/sluice/netstack"
	"github.com/sluice-vpn/sluice/tunnel/wireguard"
)

// Options configures a Server. Exactly one of Device and WireGuard is
// required; the zero value of every other field means a sensible default.
type Options struct {
	// Device is a packet source: every packet read from it is a client's
	// IP packet, and the answers are written back to it. The server owns
	// it from New on and closes it on Close. A Device with a method
	// VirtioNetHdr() bool that returns true (a kerneltun.Device opened
	// with VirtioNetHdr) exchanges packets behind virtio_net_hdrs, with
	// TCP segmentation offload.
	Device tun.Device

	// WireGuard makes the server a WireGuard endpoint whose peers are the
	// clients. Peers are added with AddPeer.
	WireGuard *WireGuardOptions

	// MTU of the tunnel; zero means the Device's own MTU, or 1420.
	MTU int

	// Egress configures the socket pool flows leave from.
	Egress nat.EgressOptions
	// Policy decides which destinations clients may reach. Its zero value
	// denies the gateway host, loopback, link-local, private, CGNAT and
	// multicast destinations; the tunnel pools are in those ranges, so
	// peers cannot reach each other unless a rule opens it.
	Policy nat.PolicyOptions
	// Table configures the connection table: its size and idle timeouts.
	Table nat.TableOptions
	// UDPFiltering decides which remotes may answer a client's UDP socket
	// [address and port dependent].
	UDPFiltering nat.Filtering
	// Limits bound each peer's new flows per second and concurrent flows.
	Limits nat.LimiterOptions
	// MaxInFlight bounds the TCP handshakes waiting on their egress dial
	// [1024].
	MaxInFlight int

	// CongestionControl is the TCP congestion control of the connections
	// to clients: netstack.CongestionBBR, CongestionCubic or
	// CongestionReno [netstack.DefaultCongestionControl].
	CongestionControl string

	// Addrs are the gateway's own tunnel addresses. It answers pings and
	// DNS (UDP and TCP port 53) there, and nothing else.
	Addrs []netip.Addr
	// DNSUpstreams are the resolvers DNS queries to Addrs are forwarded
	// to, through the egress pool. Empty: DNS on Addrs is refused.
	DNSUpstreams []netip.AddrPort

	// Logger receives the gateway's logs; nil means none.
	Logger *zap.Logger
}

// WireGuardOptions configures the WireGuard front door.
type WireGuardOptions struct {
	PrivateKey wireguard.Key // required
	ListenPort int           // UDP port; 0 picks a free one
	Bind       conn.Bind     // nil: sockets on every address
}

// Server is a running gateway.
type Server struct {
	opts Options
	log  *zap.Logger
	dev  tun.Device        // the packet source in TUN mode
	wg   *wireguard.Device // the packet source in WireGuard mode

	stack   *netstack.Stack
	table   *nat.Table
	egress  *nat.Egress
	policy  atomic.Pointer[nat.Policy] // swapped whole on reload
	limiter *nat.Limiter
	udp     *nat.UDPMapper
	pinger  *nat.Pinger
	dns     *dnsForwarder

	own    map[netip.Addr]bool                   // Addrs, read-only after New
	owners atomic.Pointer[map[netip.Addr]string] // tunnel address -> peer name
	peerMu sync.Mutex                            // serialises AddPeer and RemovePeer
	peers  map[string]Peer                       // guarded by peerMu
	local  sync.Map                              // port -> *localListener

	refusals  [numRefusals]atomic.Uint64
	draining  atomic.Bool
	lastLimit atomic.Int64 // unix nanoseconds of the last limit log line
	limitLogs atomic.Uint64

	mu      sync.Mutex
	started bool
	cancel  context.CancelFunc
	workers sync.WaitGroup

	closeOnce sync.Once
}

// New builds a gateway from opts. Packets flow once Start is called.
func New(opts Options) (srv *Server, err error) {
	if (opts.Device == nil) == (opts.WireGuard == nil) {
		return nil, errors.New("gateway: give exactly one of Options.Device and Options.WireGuard")
	}
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	if opts.MTU == 0 && opts.Device != nil {
		if m, err := opts.Device.MTU(); err == nil {
			opts.MTU = m
		}
	}
	if opts.MTU == 0 {
		opts.MTU = 1420
	}
	log := opts.Logger.Named("gateway")
	s := &Server{opts: opts, log: log, dev: opts.Device, own: map[netip.Addr]bool{}, peers: map[string]Peer{}}
	s.owners.Store(&map[netip.Addr]string{})
	for _, a := range opts.Addrs {
		s.own[a.Unmap()] = true
	}
	defer func() {
		if err != nil {
			s.teardown()
		}
	}()

	if opts.Table.Logger == nil {
		opts.Table.Logger = log.Named("table")
	}
	if s.table, err = nat.NewTable(opts.Table); err != nil {
		return nil, fmt.Errorf("gateway: %w", err)
	}
	if opts.Egress.Logger == nil {
		opts.Egress.Logger = log.Named("egress")
	}
	if s.egress, err = nat.NewEgress(opts.Egress); err != nil {
		return nil, fmt.Errorf("gateway: %w", err)
	}
	policy, err := nat.NewPolicy(opts.Policy)
	if err != nil {
		return nil, fmt.Errorf("gateway: %w", err)
	}
	s.policy.Store(policy)
	if opts.Limits.Logger == nil {
		opts.Limits.Logger = log.Named("limits")
	}
	if s.limiter, err = nat.NewLimiter(opts.Limits); err != nil {
		return nil, fmt.Errorf("gateway: %w", err)
	}
	virtio := hasVirtioNetHdr(opts.Device)
	relayBuf := 0 // the stack's default
	if virtio {
		// With TCP offload on the TUN device, 64 KiB copies become 64
		// KiB segments each way; see RelayBufferSize.
		relayBuf = 64 << 10
	}
	s.stack, err = netstack.New(netstack.Options{
		Handler:           (*handler)(s),
		MTU:               opts.MTU,
		MaxInFlight:       opts.MaxInFlight,
		CongestionControl: opts.CongestionControl,
		// WireGuard authenticates every packet: a checksum could only be
		// wrong if the peer made it so, for its own flows.
		TrustChecksums:  opts.WireGuard != nil,
		VirtioNetHdr:    virtio,
		RelayBufferSize: relayBuf,
		Logger:          log.Named("netstack"),
	})
	if err != nil {
		return nil, fmt.Errorf("gateway: %w", err)
	}
	s.udp, err = nat.NewUDP(nat.UDPOptions{
		Listener:     s.egress,
		Table:        s.table,
		Filtering:    opts.UDPFiltering,
		Deliver:      s.deliverUDP,
		DeliverError: s.deliverUDPError,
		Admit:        s.admitUDP,
		Logger:       log.Named("udp"),
	})
	if err != nil {
		return nil, fmt.Errorf("gateway: %w", err)
	}
	s.pinger, err = nat.NewPinger(nat.PingerOptions{
		Table:        s.table,
		Deliver:      s.deliverEcho,
		DeliverError: s.deliverEchoError,
		FileReserve:  opts.Egress.FileReserve,
		Logger:       log.Named("ping"),
	})
	if err != nil {
		return nil, fmt.Errorf("gateway: %w", err)
	}
	s.dns = newDNSForwarder(s, opts.DNSUpstreams)
	if wo := opts.WireGuard; wo != nil {
		s.wg, err = wireguard.New(s.stack, wireguard.Options{
			PrivateKey: wo.PrivateKey,
			ListenPort: wo.ListenPort,
			Bind:       wo.Bind,
			Logger:     log.Named("wireguard"),
		})
		if err != nil {
			return nil, fmt.Errorf("gateway: %w", err)
		}
	}
	return s, nil
}

// Start starts moving packets. It returns at once; the gateway runs until
// ctx is done or Close is called.
func (s *Server) Start(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.started {
		return errors.New("gateway: already started")
	}
	s.started = true
	ctx, s.cancel = context.WithCancel(ctx)
	s.table.Start(ctx)

	fields := []zap.Field{zap.Int("mtu", s.opts.MTU), zap.Stringer("egress_ports", s.egress.Slice())}
	if s.wg != nil {
		fields = append(fields, zap.Int("listen_port", s.wg.ListenPort()), zap.Stringer("public_key", s.wg.PublicKey()))
	} else {
		// wireguard-go drives the stack itself; a plain device needs pumps.
		s.workers.Add(2)
		go s.pump("tunnel->stack", s.stack, s.dev)
		go s.pump("stack->tunnel", s.dev, s.stack)
		name, _ := s.dev.Name()
		fields = append(fields, zap.String("device", name))
	}
	go func() {
		<-ctx.Done()
		s.Close()
	}()
	s.log.Info("gateway started", fields...)
	return nil
}

// Close stops the gateway: it closes the packet source, aborts every
// relayed connection, closes every egress socket and waits for its
// goroutines.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		if s.cancel != nil {
			s.cancel()
		}
		s.mu.Unlock()
		s.teardown()
		s.workers.Wait()
		s.log.Info("gateway stopped")
	})
	return nil
}

// teardown closes whatever New built, in the order that unblocks the
// goroutines: the packet source and the stack first.
func (s *Server) teardown() {
	s.local.Range(func(_, ln any) bool {
		ln.(*localListener).Close()
		return true
	})
	if s.wg != nil {
		s.wg.Close()
	}
	if s.dev != nil {
		s.dev.Close()
	}
	if s.stack != nil {
		s.stack.Close()
	}
	if s.dns != nil {
		s.dns.close()
	}
	if s.udp != nil {
		s.udp.Close()
	}
	if s.pinger != nil {
		s.pinger.Close()
	}
	if s.table != nil {
		s.table.Close()
	}
}

// Table returns the connection table, for listing and watching flows.
func (s *Server) Table() *nat.Table { return s.table }

// PublicKey is the server's WireGuard public key; zero in TUN mode.
func (s *Server) PublicKey() wireguard.Key {
	if s.wg == nil {
		return wireguard.Key{}
	}
	return s.wg.PublicKey()
}

// ListenPort is the UDP port WireGuard listens on; zero in TUN mode.
func (s *Server) ListenPort() int {
	if s.wg == nil {
		return 0
	}
	return s.wg.ListenPort()
}

// Stats are the gateway's counters.
type Stats struct {
	Stack  netstack.Stats
	Table  nat.TableStats
	Egress nat.EgressStats
	UDP    nat.UDPStats
	DNS    DNSStats
	Limits []nat.PeerLimitStats
	// Refused counts refused flows by reason, indexed like RefusalNames.
	Refused [numRefusals]uint64
}

// Stats returns a snapshot of the gateway's counters.
func (s *Server) Stats() Stats {
	st := Stats{
		Stack:  s.stack.Stats(),
		Table:  s.table.Stats(),
		Egress: s.egress.Stats(),
		UDP:    s.udp.Stats(),
		DNS:    s.dns.stats(),
		Limits: s.limiter.Stats(),
	}
	for i := range st.Refused {
		st.Refused[i] = s.refusals[i].Load()
	}
	return st
}

// SetPolicy replaces the policy at once. Flows that the new policy denies
// are closed, both sides; the others carry on.
func (s *Server) SetPolicy(opts nat.PolicyOptions) error {
	p, err := nat.NewPolicy(opts)
	if err != nil {
		return fmt.Errorf("gateway: %w", err)
	}
	s.policy.Store(p)
	closed := 0
	for _, e := range s.table.Snapshot() {
		if s.own[e.Key.Dest.Addr().Unmap()] {
			continue
		}
		dst := e.Key.Dest
		if e.Key.Proto == nat.ICMP {
			dst = netip.AddrPortFrom(dst.Addr(), 0)
		}
		if p.CheckPeer(e.Peer, e.Key.Proto, dst) != nil && s.table.Evict(e.ID) {
			closed++
		}
	}
	if closed > 0 {
		s.log.Info("policy changed: closed flows it now denies", zap.Int("flows", closed))
	}
	return nil
}

// SetLimits replaces the per-peer limits at once; live flows are kept.
func (s *Server) SetLimits(opts nat.LimiterOptions) error {
	if opts.Logger == nil {
		opts.Logger = s.log.Named("limits")
	}
	if err := s.limiter.Update(opts); err != nil {
		return fmt.Errorf("gateway: %w", err)
	}
	return nil
}

// Shutdown stops taking new flows, waits until ctx is done for the open
// TCP connections to end, then closes the gateway. UDP and ICMP flows have
// no end of their own to wait for; they close with it.
func (s *Server) Shutdown(ctx context.Context) error {
	s.Drain(ctx)
	return s.Close()
}

// Drain is Shutdown without the close: it stops taking new flows from
// clients and waits, until ctx is done, for the open TCP connections to
// end. The gateway's local listeners and DialPeer keep working, so that
// what is built on them (a publishing edge) can drain in the meantime.
func (s *Server) Drain(ctx context.Context) {
	s.draining.Store(true)
	if n := s.openTCP(); n > 0 {
		s.log.Info("draining TCP connections", zap.Int("connections", n))
	}
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for s.openTCP() > 0 {
		select {
		case <-ctx.Done():
			s.log.Info("grace period over, closing connections", zap.Int("connections", s.openTCP()))
			return
		case <-tick.C:
		}
	}
}

func (s *Server) openTCP() int {
	n := 0
	for _, e := range s.table.Snapshot() {
		if e.Key.Proto == nat.TCP {
			n++
		}
	}
	return n
}

// Ready reports whether the gateway is started and not shutting down.
func (s *Server) Ready() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.started && !s.draining.Load()
}

// logLimit logs refusals for limits at most once every 10 seconds, with
// how many were not logged.
func (s *Server) logLimit(err error) {
	n := s.limitLogs.Add(1)
	now := time.Now().UnixNano()
	last := s.lastLimit.Load()
	if now-last < int64(10*time.Second) || !s.lastLimit.CompareAndSwap(last, now) {
		return
	}
	s.limitLogs.Store(0)
	s.log.Warn("flows refused by a limit", zap.Error(err), zap.Uint64("refused_since_last_line", n))
}

// hasVirtioNetHdr tells whether dev's packets carry virtio_net_hdrs.
func hasVirtioNetHdr(dev tun.Device) bool {
	v, ok := dev.(interface{ VirtioNetHdr() bool })
	return ok && v.VirtioNetHdr()
}
