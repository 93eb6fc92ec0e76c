package netstack

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// ClientOptions configures a Client. Addrs is required; the zero value of
// every other field means a sensible default.
type ClientOptions struct {
	// Addrs are the client's own addresses inside the tunnel, with the
	// prefix length of an interface address (wg-quick's Address lines).
	// Required.
	Addrs []netip.Prefix

	// Routes are the destinations the stack sends into the tunnel; nil
	// means every destination, a default route for each family.
	Routes []netip.Prefix

	// MTU of the tunnel, in bytes [1420, WireGuard's for a 1500-byte
	// path]. IPv6 needs at least 1280.
	MTU int

	// QueueLen is how many packets the stack may queue for the tunnel
	// before it drops them, as a full NIC queue does [1024, a TCP
	// window's worth at 1 MiB buffers].
	QueueLen int

	// BatchSize is how many packets Read and Write are offered at a time
	// [64].
	BatchSize int

	// TrustChecksums skips the checksum checks of packets written into
	// the stack. Set it when the tunnel has authenticated every packet,
	// as WireGuard does: a wrong checksum could then only be the peer's
	// own doing.
	TrustChecksums bool

	// CongestionControl is the congestion control of the client's TCP:
	// CongestionBBR, CongestionCubic or CongestionReno
	// [DefaultCongestionControl].
	CongestionControl string

	// Logger receives the stack's logs, at Debug; nil means none.
	Logger *zap.Logger
}

// Client defaults.
const (
	defaultClientMTU       = 1420
	defaultClientQueueLen  = 1024
	defaultClientBatchSize = 64
	// minIPv4MTU is the smallest MTU IPv4 allows (RFC 791).
	minIPv4MTU = 68
	// listenBacklog is what the kernel allows by default (somaxconn).
	listenBacklog = 4096
)

func (o *ClientOptions) setDefaults() error {
	if len(o.Addrs) == 0 {
		return errors.New("netstack: ClientOptions.Addrs: the stack needs an address of its own")
	}
	has6 := false
	for _, p := range o.Addrs {
		if !p.IsValid() {
			return fmt.Errorf("netstack: ClientOptions.Addrs: %v is not a valid prefix", p)
		}
		if p.Addr().IsUnspecified() {
			return fmt.Errorf("netstack: ClientOptions.Addrs: %v is unspecified", p)
		}
		if p.Addr().Is4In6() && p.Bits() < 96 {
			return fmt.Errorf("netstack: ClientOptions.Addrs: %v is an IPv4-mapped prefix shorter than /96", p)
		}
		has6 = has6 || p.Addr().Unmap().Is6()
	}
	for _, r := range o.Routes {
		if !r.IsValid() {
			return fmt.Errorf("netstack: ClientOptions.Routes: %v is not a valid prefix", r)
		}
	}
	if o.MTU == 0 {
		o.MTU = defaultClientMTU
	}
	if o.MTU < minIPv4MTU || o.MTU > 65535 {
		return fmt.Errorf("netstack: ClientOptions.MTU: %d is outside %d-65535", o.MTU, minIPv4MTU)
	}
	if has6 && o.MTU < header.IPv6MinimumMTU {
		return fmt.Errorf("netstack: ClientOptions.MTU: %d is below IPv6's minimum of %d", o.MTU, header.IPv6MinimumMTU)
	}
	if err := checkCongestionControl("ClientOptions.CongestionControl", &o.CongestionControl); err != nil {
		return err
	}
	if o.QueueLen == 0 {
		o.QueueLen = defaultClientQueueLen
	}
	if o.QueueLen < 0 {
		return fmt.Errorf("netstack: ClientOptions.QueueLen: %d is negative", o.QueueLen)
	}
	if o.BatchSize == 0 {
		o.BatchSize = defaultClientBatchSize
	}
	if o.BatchSize < 0 {
		return fmt.Errorf("netstack: ClientOptions.BatchSize: %d is negative", o.BatchSize)
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	return nil
}

// Client is a TCP/IP stack for the client end of a tunnel: a host whose
// only interface is the tunnel, with the tunnel addresses of its own, that
// opens connections and listens as a program on a host does. Its
// tun.Device face is what a tunnel (a WireGuard device) reads the client's
// packets from and writes the peers' packets to; DialTCP, DialUDP,
// ListenTCP and ListenUDP give the net package's types.
//
// Unlike wireguard-go's tun/netstack, it accepts packets from and to any
// address, loopback ones included, so that a gateway can answer from a
// server on its own loopback (the tunnel is the only interface, and the
// tunnel decides what enters); it hands over packets in batches; and its
// errors wrap the errno values the kernel gives in the same situation
// (syscall.ECONNREFUSED, EHOSTUNREACH, ...), so that a refused connection
// can be told from an unreachable host with errors.Is.
//
// Its methods are safe for concurrent use.
type Client struct {
	opts   ClientOptions
	log    *zap.Logger
	stack  *stack.Stack
	link   *channel.Endpoint
	addrs  []netip.Addr
	events chan tun.Event

	nonIP atomic.Uint64 // packets written that were not IP

	ctx       context.Context // done once Close starts; ends a blocked Read
	cancel    context.CancelFunc
	closeOnce sync.Once
}

var _ tun.Device = (*Client)(nil)

// NewClient builds a client stack. It takes packets as soon as it returns.
func NewClient(opts ClientOptions) (*Client, error) {
	if err := opts.setDefaults(); err != nil {
		return nil, err
	}
	c := &Client{
		opts:   opts,
		log:    opts.Logger,
		link:   channel.New(opts.QueueLen, uint32(opts.MTU), ""),
		events: make(chan tun.Event, 1),
	}
	if opts.TrustChecksums {
		c.link.LinkEPCapabilities = stack.CapabilityRXChecksumOffload
	}
	c.events <- tun.EventUp
	c.ctx, c.cancel = context.WithCancel(context.Background())
	c.stack = stack.New(stack.Options{
		NetworkProtocols: []stack.NetworkProtocolFactory{
			ipv4.NewProtocolWithOptions(ipv4.Options{AllowExternalLoopbackTraffic: true}),
			ipv6.NewProtocolWithOptions(ipv6.Options{AllowExternalLoopbackTraffic: true}),
		},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol},
		// Connections to the client's own addresses stay inside the
		// stack, as they would on a host.
		HandleLocal: true,
	})
	if err := c.configure(); err != nil {
		c.cancel()
		c.stack.Destroy()
		return nil, err
	}
	c.log.Debug("client stack up", zap.Stringers("addresses", c.addrs), zap.Int("mtu", opts.MTU))
	return c, nil
}

func (c *Client) configure() error {
	if err := c.stack.CreateNICWithOptions(nicID, c.link, stack.NICOptions{Name: "tunnel"}); err != nil {
		return fmt.Errorf("netstack: create NIC: %s", err)
	}
	for _, pfx := range c.opts.Addrs {
		a, bits := pfx.Addr().Unmap(), pfx.Bits()
		if pfx.Addr().Is4In6() {
			bits -= 96
		}
		proto := ipv4.ProtocolNumber
		if a.Is6() {
			proto = ipv6.ProtocolNumber
		}
		pa := tcpip.ProtocolAddress{
			Protocol:          proto,
			AddressWithPrefix: tcpip.AddressWithPrefix{Address: tcpip.AddrFromSlice(a.AsSlice()), PrefixLen: bits},
		}
		if err := c.stack.AddProtocolAddress(nicID, pa, stack.AddressProperties{}); err != nil {
			return fmt.Errorf("netstack: add address %s: %s", a, err)
		}
		c.addrs = append(c.addrs, a)
	}
	table := []tcpip.Route{
		{Destination: header.IPv4EmptySubnet, NIC: nicID},
		{Destination: header.IPv6EmptySubnet, NIC: nicID},
	}
	if c.opts.Routes != nil {
		table = nil
		for _, r := range c.opts.Routes {
			r = r.Masked()
			sub, err := tcpip.NewSubnet(tcpip.AddrFromSlice(r.Addr().AsSlice()), tcpip.MaskFromBytes(net.CIDRMask(r.Bits(), r.Addr().BitLen())))
			if err != nil {
				return fmt.Errorf("netstack: route %s: %v", r, err)
			}
			table = append(table, tcpip.Route{Destination: sub, NIC: nicID})
		}
	}
	c.stack.SetRouteTable(table)
	if err := tuneTCP(c.stack, c.opts.CongestionControl); err != nil {
		return err
	}
	return nil
}

// Addrs returns the client's own addresses, IPv4 ones unmapped.
func (c *Client) Addrs() []netip.Addr { return append([]netip.Addr(nil), c.addrs...) }

// Read implements tun.Device: the packets the client sends. It blocks for
// the first packet and takes whatever else is queued, up to len(bufs).
// After Close it returns os.ErrClosed.
func (c *Client) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	pkt := c.link.ReadContext(c.ctx)
	if pkt == nil {
		return 0, os.ErrClosed
	}
	n := 0
	for pkt != nil {
		view := pkt.ToView()
		pkt.DecRef()
		sizes[n] = copy(bufs[n][offset:], view.AsSlice())
		view.Release()
		n++
		if n == len(bufs) {
			break
		}
		pkt = c.link.Read()
	}
	return n, nil
}

// Write implements tun.Device: the packets the peers send to the client,
// one IP packet each. What is not IP is dropped.
func (c *Client) Write(bufs [][]byte, offset int) (int, error) {
	if c.ctx.Err() != nil {
		return 0, os.ErrClosed
	}
	for _, b := range bufs {
		b = b[offset:]
		if len(b) == 0 {
			continue
		}
		var proto tcpip.NetworkProtocolNumber
		switch b[0] >> 4 {
		case 4:
			proto = ipv4.ProtocolNumber
		case 6:
			proto = ipv6.ProtocolNumber
		default:
			c.nonIP.Add(1)
			continue
		}
		pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(b)})
		c.link.InjectInbound(proto, pkt)
		pkt.DecRef()
	}
	return len(bufs), nil
}

// MTU implements tun.Device.
func (c *Client) MTU() (int, error) { return c.opts.MTU, nil }

// Name implements tun.Device.
func (c *Client) Name() (string, error) { return "sluice-client", nil }

// File implements tun.Device; there is no file.
func (c *Client) File() *os.File { return nil }

// Events implements tun.Device: EventUp once, closed by Close.
func (c *Client) Events() <-chan tun.Event { return c.events }

// BatchSize implements tun.Device.
func (c *Client) BatchSize() int { return c.opts.BatchSize }

// Close implements tun.Device: it aborts every connection, ends a blocked
// Read and waits for the stack's goroutines. It is idempotent.
func (c *Client) Close() error {
	c.closeOnce.Do(func() {
		c.cancel()
		c.stack.Close()
		c.link.Close()
		c.stack.Wait()
		close(c.events)
		st := c.stack.Stats()
		c.log.Debug("client stack closed",
			zap.Uint64("packets_in", st.IP.PacketsReceived.Value()),
			zap.Uint64("packets_out", st.IP.PacketsSent.Value()),
			zap.Uint64("not_ip", c.nonIP.Load()),
			zap.Uint64("tcp_retransmits", st.TCP.Retransmits.Value()))
	})
	return nil
}

// fullAddr converts ap for gVisor; an unspecified address stays empty, as
// gVisor's bind to every address wants it.
func fullAddr(ap netip.AddrPort) (tcpip.FullAddress, tcpip.NetworkProtocolNumber) {
	a := ap.Addr().Unmap()
	proto := ipv4.ProtocolNumber
	if a.Is6() {
		proto = ipv6.ProtocolNumber
	}
	var addr tcpip.Address
	if !a.IsUnspecified() {
		addr = tcpip.AddrFromSlice(a.AsSlice())
	}
	return tcpip.FullAddress{Addr: addr, Port: ap.Port()}, proto
}

// DialTCP connects to dst from the client's address of dst's family. ctx
// bounds the handshake only; if it ends first, DialTCP returns ctx.Err().
// A failed handshake returns an *os.SyscallError for "connect" that wraps
// the errno (ECONNREFUSED for a reset, EHOSTUNREACH for an ICMP host
// unreachable, ...). The connection has CloseRead and CloseWrite, as a
// *net.TCPConn does; Close aborts it.
func (c *Client) DialTCP(ctx context.Context, dst netip.AddrPort) (net.Conn, error) {
	if c.ctx.Err() != nil {
		return nil, net.ErrClosed
	}
	return dialTCP(ctx, c.stack, nil, dst, nil)
}

// DialUDP opens a UDP socket on a free port of the client's address of
// dst's family, connected to dst. Errors are as DialTCP's.
func (c *Client) DialUDP(dst netip.AddrPort) (net.Conn, error) {
	if c.ctx.Err() != nil {
		return nil, net.ErrClosed
	}
	fa, proto := fullAddr(dst)
	fa.NIC = nicID
	var wq waiter.Queue
	ep, terr := c.stack.NewEndpoint(udp.ProtocolNumber, proto, &wq)
	if terr != nil {
		return nil, errnoOf(terr)
	}
	if terr := ep.Connect(fa); terr != nil {
		ep.Close()
		return nil, os.NewSyscallError("connect", errnoOf(terr))
	}
	return gonet.NewUDPConn(&wq, ep), nil
}

// ListenTCP listens on addr, one of the client's addresses or an
// unspecified one (every address of its family), port 0 meaning a free
// port. An unspecified IPv6 address with dualStack accepts IPv4
// connections too; without it the socket is IPv6 only. Failures return
// an *os.SyscallError for "bind" or "listen" that wraps the errno
// (EADDRINUSE, EADDRNOTAVAIL, ...).
//
// The listener behaves as the net package's: Close wakes a blocked
// Accept, which then returns an error wrapping net.ErrClosed, and Addr
// names an unspecified address ("[::]:8080") rather than leaving it out.
func (c *Client) ListenTCP(addr netip.AddrPort, dualStack bool) (net.Listener, error) {
	ep, wq, err := c.bind(tcp.ProtocolNumber, addr, dualStack)
	if err != nil {
		return nil, err
	}
	if terr := ep.Listen(listenBacklog); terr != nil {
		ep.Close()
		return nil, os.NewSyscallError("listen", errnoOf(terr))
	}
	return &tcpListener{ep: ep, wq: wq, bound: addr.Addr().Unmap(), done: make(chan struct{})}, nil
}

// ListenUDP opens an unconnected UDP socket on addr; addr and dualStack
// are as for ListenTCP, and so are the errors.
//
// The socket takes the addresses the net package gives: WriteTo wants a
// *net.UDPAddr, takes IPv4 destinations in either form (4 or 16 bytes)
// and refuses IPv6 ones on an IPv4 socket with EAFNOSUPPORT. ReadFrom
// reports IPv4 senders in 4-byte form, also on a dual-stack socket.
// LocalAddr names an unspecified address, as Listener.Addr does.
func (c *Client) ListenUDP(addr netip.AddrPort, dualStack bool) (net.PacketConn, error) {
	ep, wq, err := c.bind(udp.ProtocolNumber, addr, dualStack)
	if err != nil {
		return nil, err
	}
	bound := addr.Addr().Unmap()
	return &udpPacketConn{UDPConn: gonet.NewUDPConn(wq, ep), v6: bound.Is6(), bound: bound}, nil
}

// bind opens an endpoint of the transport protocol bound to addr, IPv6
// only unless dualStack.
func (c *Client) bind(transport tcpip.TransportProtocolNumber, addr netip.AddrPort, dualStack bool) (tcpip.Endpoint, *waiter.Queue, error) {
	if c.ctx.Err() != nil {
		return nil, nil, net.ErrClosed
	}
	fa, proto := fullAddr(addr)
	wq := new(waiter.Queue)
	ep, terr := c.stack.NewEndpoint(transport, proto, wq)
	if terr != nil {
		return nil, nil, errnoOf(terr)
	}
	if proto == ipv6.ProtocolNumber {
		ep.SocketOptions().SetV6Only(!dualStack)
	}
	if terr := ep.Bind(fa); terr != nil {
		ep.Close()
		return nil, nil, os.NewSyscallError("bind", errnoOf(terr))
	}
	return ep, wq, nil
}

// tcpListener accepts the connections of a listening endpoint. Accept
// reports net.ErrClosed after Close, as a net.Listener's does, so that
// servers (net/http's) stop cleanly. Each accepted connection probes an
// idle peer with keepalives: a peer that vanished (a gateway that crashed,
// a network that went away) sends no FIN, and what is served on the
// connection would otherwise hold it for ever.
type tcpListener struct {
	ep    tcpip.Endpoint
	wq    *waiter.Queue
	bound netip.Addr // as asked for, maybe unspecified
	done  chan struct{}
	once  sync.Once
}

// Keepalives of accepted connections: a dead peer is found within a
// minute of silence, at the cost of a probe every half minute on a
// connection that idles.
const (
	acceptKeepaliveIdle     = 30 * time.Second
	acceptKeepaliveInterval = 10 * time.Second
	acceptKeepaliveCount    = 3
)

// Accept implements net.Listener.
func (l *tcpListener) Accept() (net.Conn, error) {
	entry, ready := waiter.NewChannelEntry(waiter.ReadableEvents)
	l.wq.EventRegister(&entry)
	defer l.wq.EventUnregister(&entry)
	for {
		select {
		case <-l.done:
			return nil, &net.OpError{Op: "accept", Net: "tcp", Addr: l.Addr(), Err: net.ErrClosed}
		default:
		}
		n, wq, terr := l.ep.Accept(nil)
		switch terr.(type) {
		case nil:
			setKeepalive(n, acceptKeepaliveIdle, acceptKeepaliveInterval, acceptKeepaliveCount)
			return gonet.NewTCPConn(wq, n), nil
		case *tcpip.ErrWouldBlock:
		default:
			return nil, &net.OpError{Op: "accept", Net: "tcp", Addr: l.Addr(), Err: errnoOf(terr)}
		}
		select {
		case <-ready:
		case <-l.done:
		}
	}
}

// Close implements net.Listener.
func (l *tcpListener) Close() error {
	l.once.Do(func() {
		close(l.done) // wakes an Accept that waits
		l.ep.Close()
	})
	return nil
}

// Addr implements net.Listener.
func (l *tcpListener) Addr() net.Addr {
	fa, err := l.ep.GetLocalAddress()
	if err != nil {
		return &net.TCPAddr{IP: l.bound.AsSlice()}
	}
	a := &net.TCPAddr{IP: l.bound.AsSlice(), Port: int(fa.Port)}
	if fa.Addr.Len() > 0 {
		a.IP = net.IP(fa.Addr.AsSlice())
	}
	return a
}

// udpPacketConn is a gonet UDP socket that takes destinations as the net
// package's sockets do: an IPv6 destination on an IPv4 socket is refused,
// where gVisor would send it from an IPv4 socket bound to 0.0.0.0.
type udpPacketConn struct {
	*gonet.UDPConn
	v6    bool       // an IPv6 socket, maybe dual-stack
	bound netip.Addr // as asked for, maybe unspecified
}

// LocalAddr implements net.PacketConn.
func (p *udpPacketConn) LocalAddr() net.Addr {
	a, _ := p.UDPConn.LocalAddr().(*net.UDPAddr)
	if a == nil {
		return &net.UDPAddr{IP: p.bound.AsSlice()}
	}
	if len(a.IP) == 0 {
		return &net.UDPAddr{IP: p.bound.AsSlice(), Port: a.Port}
	}
	return a
}

// WriteTo implements net.PacketConn.
func (p *udpPacketConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	ua, ok := addr.(*net.UDPAddr)
	if !ok {
		return 0, &net.OpError{Op: "write", Net: "udp", Addr: addr, Err: syscall.EINVAL}
	}
	dst := ua.AddrPort()
	a := dst.Addr().Unmap()
	if a.Is6() && !p.v6 {
		return 0, &net.OpError{Op: "write", Net: "udp", Addr: addr, Err: syscall.EAFNOSUPPORT}
	}
	return p.UDPConn.WriteTo(b, &net.UDPAddr{IP: a.AsSlice(), Port: int(dst.Port())})
}

// errnoOf maps a gVisor error to the errno the kernel reports in the same
// situation, so that callers can test errors with errors.Is as they do
// for the net package's; errors without an equivalent keep gVisor's text.
func errnoOf(e tcpip.Error) error {
	switch e.(type) {
	case *tcpip.ErrConnectionRefused:
		return syscall.ECONNREFUSED
	case *tcpip.ErrHostUnreachable:
		return syscall.EHOSTUNREACH
	case *tcpip.ErrHostDown:
		return syscall.EHOSTDOWN
	case *tcpip.ErrNetworkUnreachable, *tcpip.ErrNoNet:
		return syscall.ENETUNREACH
	case *tcpip.ErrTimeout:
		return syscall.ETIMEDOUT
	case *tcpip.ErrConnectionReset:
		return syscall.ECONNRESET
	case *tcpip.ErrConnectionAborted, *tcpip.ErrAborted:
		return syscall.ECONNABORTED
	case *tcpip.ErrPortInUse, *tcpip.ErrDuplicateAddress:
		return syscall.EADDRINUSE
	case *tcpip.ErrBadLocalAddress:
		return syscall.EADDRNOTAVAIL
	case *tcpip.ErrAddressFamilyNotSupported:
		return syscall.EAFNOSUPPORT
	case *tcpip.ErrNoBufferSpace:
		return syscall.ENOBUFS
	case *tcpip.ErrNoPortAvailable:
		return syscall.EAGAIN
	case *tcpip.ErrNotPermitted:
		return syscall.EPERM
	case *tcpip.ErrMessageTooLong:
		return syscall.EMSGSIZE
	case *tcpip.ErrInvalidEndpointState, *tcpip.ErrClosedForSend, *tcpip.ErrClosedForReceive:
		return net.ErrClosed
	}
	return errors.New(e.String())
}
