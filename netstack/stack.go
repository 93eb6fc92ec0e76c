package netstack

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/time/rate"
	"golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
)

// Options configures a Stack. The zero value of every field but Handler
// means a sensible default.
type Options struct {
	// Handler receives every flow. Required.
	Handler Handler

	// MTU of the tunnel side, in bytes [1420, WireGuard's].
	MTU int

	// MaxInFlight bounds the TCP handshakes in flight, from the client's
	// SYN until its connection is relayed or refused [1024]. Further SYNs
	// are dropped (the client retransmits), counted and logged. It backs
	// up the share of each client, which a Handler that is a
	// HandshakeAdmitter enforces.
	MaxInFlight int

	// HandshakeTimeout bounds how long the stack waits for a client to
	// answer its SYN-ACK once the destination is connected [10s]; then the
	// handshake and the destination's connection are dropped. gVisor's
	// SYN-ACK retransmissions (after 1, 3 and 7 s) fit within the default.
	HandshakeTimeout time.Duration

	// BatchSize is the most packets one Read returns [128].
	BatchSize int

	// QueueLen is the number of packets the stack may queue toward the
	// tunnel before it drops [4096].
	QueueLen int

	// ICMPErrorRate bounds the ICMP errors (unreachable, prohibited, too
	// big) the stack sends per second [1000]; like a router's, so that a
	// scan cannot turn the gateway into a reflector.
	ICMPErrorRate int

	// TrustChecksums skips the checksum checks of packets from clients
	// and merges their TCP segments (GRO). Set it when the tunnel has
	// authenticated every packet, as WireGuard does.
	TrustChecksums bool

	// RelayBufferSize is the size of the buffer a TCP relay copies through
	// [32 KiB]: one read of the upstream socket and one write into the
	// stack each. Only connections with data in hand hold one. Larger
	// buffers save system calls per byte; over WireGuard, 64 KiB bursts
	// halved downloads on the bench, while a TUN device with offloads
	// gained from them.
	RelayBufferSize int

	// VirtioNetHdr puts a virtio_net_hdr (VirtioNetHdrLen bytes, as
	// linux/virtio_net.h defines it) in front of every packet that Read
	// returns and Write takes, as a Linux TUN device opened with
	// IFF_VNET_HDR and TCP segmentation offload does. TCP segments then
	// cross whole, up to 64 KiB each way: the kernel merges what it sends
	// and cuts what it receives, and Read's buffers must hold 64 KiB plus
	// the header. Checksums the header does not vouch for are verified,
	// except those of IP fragments, which the kernel passes on as they
	// came: the stack reassembles them unchecked.
	VirtioNetHdr bool

	// CongestionControl is the TCP congestion control of the connections
	// to clients: CongestionBBR, CongestionCubic or CongestionReno
	// [DefaultCongestionControl].
	CongestionControl string

	// Logger receives the stack's logs; nil means none.
	Logger *zap.Logger
}

func (o *Options) setDefaults() error {
	if o.Handler == nil {
		return errors.New("netstack: Options.Handler is required")
	}
	if o.MTU == 0 {
		o.MTU = 1420
	}
	if o.MTU < 1280 || o.MTU > 65535 {
		return fmt.Errorf("netstack: Options.MTU: %d is outside 1280-65535", o.MTU)
	}
	if o.MaxInFlight == 0 {
		o.MaxInFlight = 1024
	}
	if o.MaxInFlight < 0 {
		return fmt.Errorf("netstack: Options.MaxInFlight: %d is negative", o.MaxInFlight)
	}
	if o.HandshakeTimeout == 0 {
		o.HandshakeTimeout = 10 * time.Second
	}
	if o.HandshakeTimeout < 0 {
		return fmt.Errorf("netstack: Options.HandshakeTimeout: %v is negative", o.HandshakeTimeout)
	}
	if o.BatchSize == 0 {
		o.BatchSize = 128
	}
	if o.BatchSize < 0 {
		return fmt.Errorf("netstack: Options.BatchSize: %d is negative", o.BatchSize)
	}
	if o.QueueLen == 0 {
		o.QueueLen = 4096
	}
	if o.QueueLen < 0 {
		return fmt.Errorf("netstack: Options.QueueLen: %d is negative", o.QueueLen)
	}
	if o.RelayBufferSize == 0 {
		o.RelayBufferSize = 32 << 10
	}
	if o.RelayBufferSize < 1<<10 || o.RelayBufferSize > 1<<20 {
		return fmt.Errorf("netstack: Options.RelayBufferSize: %d is outside 1 KiB-1 MiB", o.RelayBufferSize)
	}
	if o.ICMPErrorRate == 0 {
		o.ICMPErrorRate = 1000
	}
	if err := checkCongestionControl("Options.CongestionControl", &o.CongestionControl); err != nil {
		return err
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	return nil
}

const nicID tcpip.NICID = 1

// Stack is a user-space network stack that terminates the flows clients
// send into it. It implements tun.Device: packets written to it are the
// clients' packets, packets read from it go back to the clients.
type Stack struct {
	opts   Options
	log    *zap.Logger
	stack  *stack.Stack
	link   *link
	events chan tun.Event

	ctx    context.Context
	cancel context.CancelFunc

	tcp       *tcpForwarder
	icmpLimit *rate.Limiter
	frag6     frag6Reassembler // fragmented ICMPv6 echo requests

	malformed   atomic.Uint64
	packetsIn   atomic.Uint64
	unsupported atomic.Uint64 // fragmented echo requests and the like
	refused     atomic.Uint64
	icmpSent    atomic.Uint64

	closeOnce sync.Once
}

var _ tun.Device = (*Stack)(nil)

// New builds a stack. It is ready for packets when New returns.
func New(opts Options) (*Stack, error) {
	if err := opts.setDefaults(); err != nil {
		return nil, err
	}
	s := &Stack{
		opts:      opts,
		log:       opts.Logger,
		link:      newLink(opts.MTU, opts.QueueLen, opts.TrustChecksums, opts.VirtioNetHdr),
		events:    make(chan tun.Event, 1),
		icmpLimit: rate.NewLimiter(rate.Limit(opts.ICMPErrorRate), max(opts.ICMPErrorRate/10, 1)),
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.events <- tun.EventUp

	s.stack = stack.New(stack.Options{
		// Clients may be allowed to reach the gateway host's loopback
		// (policy decides), so loopback destinations are not martians here.
		NetworkProtocols: []stack.NetworkProtocolFactory{
			ipv4.NewProtocolWithOptions(ipv4.Options{AllowExternalLoopbackTraffic: true}),
			ipv6.NewProtocolWithOptions(ipv6.Options{AllowExternalLoopbackTraffic: true}),
		},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol, icmp.NewProtocol4, icmp.NewProtocol6},
	})
	if err := s.configure(); err != nil {
		s.stack.Close()
		s.cancel()
		return nil, err
	}
	return s, nil
}

func (s *Stack) configure() error {
	if err := s.stack.CreateNICWithOptions(nicID, s.link, stack.NICOptions{Name: "sluice"}); err != nil {
		return fmt.Errorf("netstack: create NIC: %s", err)
	}
	// Promiscuous: accept packets for any destination. Spoofing: send from
	// any source, so replies carry the destination's address.
	if err := s.stack.SetPromiscuousMode(nicID, true); err != nil {
		return fmt.Errorf("netstack: promiscuous mode: %s", err)
	}
	if err := s.stack.SetSpoofing(nicID, true); err != nil {
		return fmt.Errorf("netstack: spoofing: %s", err)
	}
	s.stack.SetRouteTable([]tcpip.Route{
		{Destination: header.IPv4EmptySubnet, NIC: nicID},
		{Destination: header.IPv6EmptySubnet, NIC: nicID},
	})

	// gVisor hands a new SYN that meets a TIME_WAIT endpoint only to a
	// listener, and the gateway has none: a client that reuses its port
	// within TIME_WAIT would hang. A second covers old duplicates on a
	// tunnel whose round trips are milliseconds.
	if err := tuneTCP(s.stack, s.opts.CongestionControl, ptr(tcpip.TCPTimeWaitTimeoutOption(time.Second))); err != nil {
		return err
	}

	s.tcp = newTCPForwarder(s)
	s.stack.SetTransportProtocolHandler(tcp.ProtocolNumber, s.tcp.handlePacket)
	s.stack.SetTransportProtocolHandler(udp.ProtocolNumber, s.handleUDP)
	s.stack.SetTransportProtocolHandler(icmp.ProtocolNumber4, s.handleICMPv4)
	return nil
}

func ptr[T any](v T) *T { return &v }

// Write implements tun.Device: each packet is one IP packet from a client.
// A packet that is not a well-formed IPv4 or IPv6 packet is dropped and
// counted; Write itself only fails once the stack is closed.
func (s *Stack) Write(bufs [][]byte, offset int) (int, error) {
	select {
	case <-s.ctx.Done():
		return 0, os.ErrClosed
	default:
	}
	in := s.link.begin()
	if in == nil {
		return len(bufs), nil
	}
	defer s.flushBatch(in)
	for _, buf := range bufs {
		if offset > len(buf) {
			s.malformed.Add(1)
			continue
		}
		b := buf[offset:]
		var vh virtioHdr
		if s.opts.VirtioNetHdr {
			if len(b) < VirtioNetHdrLen {
				s.malformed.Add(1)
				continue
			}
			vh.decode(b)
			b = b[VirtioNetHdrLen:]
		}
		pi, ok := inspect(b)
		if !ok {
			s.malformed.Add(1)
			continue
		}
		b = b[:ipLen(b, pi)]
		segs := uint64(1)
		if s.opts.VirtioNetHdr {
			if !checkVirtio(&vh, b, pi) {
				s.malformed.Add(1)
				continue
			}
			segs = gsoSegments(&vh, len(b))
		}
		s.packetsIn.Add(1)
		if s.stopsHere(b, pi) {
			continue
		}
		if pi.version == 4 {
			s.link.deliver(in, header.IPv4ProtocolNumber, b, segs)
			continue
		}
		// gVisor answers IPv6 pings for any address it accepts; the
		// gateway must never answer on a destination's behalf, so echo
		// requests are taken out before the stack sees them.
		if pi.proto != protoTCP && pi.proto != protoUDP && s.interceptICMPv6(b, pi) {
			continue
		}
		s.link.deliver(in, header.IPv6ProtocolNumber, b, segs)
	}
	return len(bufs), nil
}

// flushBatch hands the stack what GRO still holds of a Write's packets,
// then tells a Batcher handler that the batch is over.
func (s *Stack) flushBatch(in *inbound) {
	s.link.end(in)
	if b, ok := s.opts.Handler.(Batcher); ok {
		b.FlushBatch()
	}
}

// Read implements tun.Device: it returns packets for the clients.
func (s *Stack) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	return s.link.read(bufs, sizes, offset)
}

// MTU implements tun.Device.
func (s *Stack) MTU() (int, error) { return int(s.link.MTU()), nil }

// Name implements tun.Device.
func (s *Stack) Name() (string, error) { return "sluice", nil }

// File implements tun.Device; the stack has no file descriptor.
func (s *Stack) File() *os.File { return nil }

// Events implements tun.Device.
func (s *Stack) Events() <-chan tun.Event { return s.events }

// BatchSize implements tun.Device.
func (s *Stack) BatchSize() int { return s.opts.BatchSize }

// closeWaitLimit bounds how long Close waits for the forwarder's
// handshakes and relays, all of which it has aborted: only one stuck in a
// Handler's DialTCP that ignores its context, say, is still running then.
const closeWaitLimit = 5 * time.Second

// Close implements tun.Device: it refuses new packets, tears down every
// relayed connection and every handshake in progress, and waits for the
// stack's goroutines. It returns within a few seconds whatever state the
// flows were in.
func (s *Stack) Close() error {
	s.closeOnce.Do(func() {
		s.cancel()
		s.link.close()
		s.tcp.shutdown()
		// Closing the stack ends the handshakes that wait for a client's
		// ACK; only then can the forwarder's goroutines be waited for.
		s.stack.Close()
		waited := make(chan struct{})
		go func() {
			s.tcp.wg.Wait()
			s.stack.Wait()
			close(waited)
		}()
		t := time.NewTimer(closeWaitLimit)
		defer t.Stop()
		select {
		case <-waited:
		case <-t.C:
			var st Stats
			s.tcp.stats(&st)
			s.log.Warn("closed without waiting for the last TCP handshakes and relays",
				zap.Int("in_flight", st.InFlight), zap.Int("relays", st.TCPRelays))
		}
		close(s.events)
	})
	return nil
}

// Stats are the stack's counters.
type Stats struct {
	PacketsIn  uint64 // well-formed packets from clients
	PacketsOut uint64 // packets toward clients, including those dropped at the queue
	// Malformed counts packets dropped because they did not parse: at the
	// link, or in gVisor's IP, TCP and UDP layers, or by a checksum.
	Malformed uint64
	// Unsupported counts well-formed packets the stack does not carry, such
	// as fragmented IPv6 echo requests.
	Unsupported   uint64
	QueueDrops    uint64 // packets toward clients dropped on a full queue
	InFlight      int    // TCP handshakes in flight, from SYN to relay or refusal
	InFlightDrops uint64 // SYNs dropped because MaxInFlight was reached
	// InFlightRefused counts SYNs refused because their client had its
	// share of handshakes in flight (HandshakeAdmitter).
	InFlightRefused uint64
	// HandshakeTimeouts counts handshakes dropped because the client did
	// not answer the SYN-ACK within HandshakeTimeout.
	HandshakeTimeouts uint64
	TCPRelays         int    // TCP connections being relayed
	Refused           uint64 // flows or datagrams refused by the handler
	ICMPErrorsSent    uint64
	// Retransmits counts TCP segments the stack sent to clients again;
	// Timeouts counts the retransmission timeouts among them.
	Retransmits, Timeouts uint64
}

// Stats returns a snapshot of the counters.
func (s *Stack) Stats() Stats {
	gs := s.stack.Stats()
	st := Stats{
		PacketsIn:   s.packetsIn.Load(),
		PacketsOut:  gs.IP.PacketsSent.Value(),
		Unsupported: s.unsupported.Load(),
		QueueDrops:  s.link.outDropped.Load() + s.link.outTooBig.Load(),
		Malformed: s.malformed.Load() + gs.IP.MalformedPacketsReceived.Value() +
			gs.IP.MalformedFragmentsReceived.Value() + gs.TCP.InvalidSegmentsReceived.Value() +
			gs.UDP.MalformedPacketsReceived.Value() + gs.UDP.ChecksumErrors.Value() + gs.TCP.ChecksumErrors.Value(),
	}
	s.tcp.stats(&st)
	st.Refused = s.refused.Load() + s.tcp.refused.Load()
	st.ICMPErrorsSent = s.icmpSent.Load()
	st.Retransmits = gs.TCP.Retransmits.Value()
	st.Timeouts = gs.TCP.Timeouts.Value()
	return st
}

func addrFrom(a tcpip.Address) netip.Addr {
	ip, _ := netip.AddrFromSlice(a.AsSlice())
	return ip
}

func addrPortFrom(a tcpip.Address, port uint16) netip.AddrPort {
	return netip.AddrPortFrom(addrFrom(a), port)
}
