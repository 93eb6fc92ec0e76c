// Package gateway is sluice's VPN gateway as a library: it wires a packet
// source (a kernel TUN device, an in-memory tunnel, later WireGuard) to a
// user-space network stack that terminates every flow, and the stack to the
// in-process NAT that re-dials each flow from the egress socket pool.
//
// The canonical use is
//
//	srv, err := gateway.New(gateway.Options{Device: dev})
//	...
//	err = srv.Start(ctx)
//	...
//	srv.Close()
package gateway

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"go.uber.org/zap"
	"golang.zx2c4.com/wireguard/tun"

	"github.com/sluice-vpn/sluice/nat"
	"github.com/sluice-vpn/sluice/netstack"
)

// Options configures a Server. The zero value of every field but Device
// means a sensible default.
type Options struct {
	// Device is the packet source: every packet read from it is a client's
	// IP packet, and the answers are written back to it. The server owns
	// it from New on and closes it on Close. Required.
	Device tun.Device

	// MTU of the tunnel; zero means the Device's own MTU.
	MTU int

	// Egress configures the socket pool flows leave from.
	Egress nat.EgressOptions
	// Policy decides which destinations clients may reach. Its zero value
	// denies the gateway host, loopback, link-local, private, CGNAT and
	// multicast destinations.
	Policy nat.PolicyOptions
	// Table configures the connection table: its size and idle timeouts.
	Table nat.TableOptions
	// UDPFiltering decides which remotes may answer a client's UDP socket
	// [address and port dependent].
	UDPFiltering nat.Filtering
	// MaxInFlight bounds the TCP handshakes waiting on their egress dial
	// [1024].
	MaxInFlight int

	// Logger receives the gateway's logs; nil means none.
	Logger *zap.Logger
}

// Server is a running gateway.
type Server struct {
	opts Options
	log  *zap.Logger
	dev  tun.Device

	stack  *netstack.Stack
	table  *nat.Table
	egress *nat.Egress
	policy *nat.Policy
	udp    *nat.UDPMapper
	pinger *nat.Pinger

	mu      sync.Mutex
	started bool
	cancel  context.CancelFunc
	wg      sync.WaitGroup

	closeOnce sync.Once
}

// New builds a gateway from opts. Nothing runs until Start.
func New(opts Options) (srv *Server, err error) {
	if opts.Device == nil {
		return nil, errors.New("gateway: Options.Device is required")
	}
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	if opts.MTU == 0 {
		if opts.MTU, err = opts.Device.MTU(); err != nil || opts.MTU == 0 {
			opts.MTU = 1420
		}
	}
	log := opts.Logger.Named("gateway")
	s := &Server{opts: opts, log: log, dev: opts.Device}
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
	if s.policy, err = nat.NewPolicy(opts.Policy); err != nil {
		return nil, fmt.Errorf("gateway: %w", err)
	}
	s.stack, err = netstack.New(netstack.Options{
		Handler:     (*handler)(s),
		MTU:         opts.MTU,
		MaxInFlight: opts.MaxInFlight,
		Logger:      log.Named("netstack"),
	})
	if err != nil {
		return nil, fmt.Errorf("gateway: %w", err)
	}
	s.udp, err = nat.NewUDP(nat.UDPOptions{
		Listener:  s.egress,
		Table:     s.table,
		Filtering: opts.UDPFiltering,
		Deliver:   s.deliverUDP,
		Logger:    log.Named("udp"),
	})
	if err != nil {
		return nil, fmt.Errorf("gateway: %w", err)
	}
	s.pinger, err = nat.NewPinger(nat.PingerOptions{
		Table:   s.table,
		Deliver: s.deliverEcho,
		Logger:  log.Named("ping"),
	})
	if err != nil {
		return nil, fmt.Errorf("gateway: %w", err)
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

	s.wg.Add(2)
	go s.pump("tunnel->stack", s.stack, s.dev)
	go s.pump("stack->tunnel", s.dev, s.stack)
	go func() {
		<-ctx.Done()
		s.Close()
	}()
	name, _ := s.dev.Name()
	s.log.Info("gateway started",
		zap.String("device", name), zap.Int("mtu", s.opts.MTU),
		zap.Stringer("egress_ports", s.egress.Slice()))
	return nil
}

// Close stops the gateway: it closes the device, aborts every relayed
// connection, closes every egress socket and waits for its goroutines.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		if s.cancel != nil {
			s.cancel()
		}
		s.mu.Unlock()
		s.teardown()
		s.wg.Wait()
		s.log.Info("gateway stopped")
	})
	return nil
}

// teardown closes whatever New built, in the order that unblocks the
// goroutines: the device and the stack first, so that the pumps return.
func (s *Server) teardown() {
	s.dev.Close()
	if s.stack != nil {
		s.stack.Close()
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

// Stats are the gateway's counters.
type Stats struct {
	Stack  netstack.Stats
	Table  nat.TableStats
	Egress nat.EgressStats
	UDP    nat.UDPStats
}

// Stats returns a snapshot of the gateway's counters.
func (s *Server) Stats() Stats {
	return Stats{
		Stack:  s.stack.Stats(),
		Table:  s.table.Stats(),
		Egress: s.egress.Stats(),
		UDP:    s.udp.Stats(),
	}
}
