package client

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"

	"golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// nicID is the stack's only interface: the tunnel.
const nicID tcpip.NICID = 1

// Packets the stack may queue for the WireGuard device before it drops
// them, as a full NIC queue would: a TCP window's worth at 1 MiB buffers.
const outboundQueueLen = 1024

// batchSize is how many packets the device is offered per read and write.
const batchSize = 64

// netStack is the client's own TCP/IP stack, a gVisor stack whose only
// interface is the tunnel. Its tun.Device face is what the WireGuard
// device reads the client's packets from and writes the peer's packets to.
//
// wireguard-go's tun/netstack would do the same, but it drops every packet
// with a loopback source address, so nothing a gateway reaches on its own
// loopback could answer; it hands over one packet per read through an
// unbuffered channel; and its errors are bare strings, so that a refused
// connection cannot be told from an unreachable host. This one accepts
// any source (the tunnel is the only interface, and WireGuard has
// authenticated every packet on it), batches, and maps gVisor's errors to
// the errno values the net package gives.
type netStack struct {
	stack  *stack.Stack
	link   *channel.Endpoint
	mtu    int
	addrs  []netip.Addr
	has4   bool
	has6   bool
	events chan tun.Event

	ctx       context.Context // done once Close starts; ends a blocked Read
	cancel    context.CancelFunc
	closeOnce sync.Once
}

var _ tun.Device = (*netStack)(nil)

// newNetStack builds a stack with the tunnel addresses addrs that routes
// the prefixes in routes into the tunnel.
func newNetStack(addrs []netip.Prefix, routes []netip.Prefix, mtu int) (*netStack, error) {
	s := &netStack{
		link:   channel.New(outboundQueueLen, uint32(mtu), ""),
		mtu:    mtu,
		events: make(chan tun.Event, 1),
	}
	// WireGuard has authenticated every packet the stack receives: a wrong
	// checksum could only be the peer's own doing, so checking it again
	// is wasted work.
	s.link.LinkEPCapabilities = stack.CapabilityRXChecksumOffload
	s.events <- tun.EventUp
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.stack = stack.New(stack.Options{
		NetworkProtocols: []stack.NetworkProtocolFactory{
			ipv4.NewProtocolWithOptions(ipv4.Options{AllowExternalLoopbackTraffic: true}),
			ipv6.NewProtocolWithOptions(ipv6.Options{AllowExternalLoopbackTraffic: true}),
		},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol},
		// Connections to the client's own tunnel addresses stay inside the
		// stack, as they would on a host.
		HandleLocal: true,
	})
	if err := s.configure(addrs, routes); err != nil {
		s.stack.Destroy()
		return nil, err
	}
	return s, nil
}

func (s *netStack) configure(addrs []netip.Prefix, routes []netip.Prefix) error {
	if err := s.stack.CreateNICWithOptions(nicID, s.link, stack.NICOptions{Name: "tunnel"}); err != nil {
		return fmt.Errorf("create NIC: %s", err)
	}
	for _, pfx := range addrs {
		a := pfx.Addr().Unmap()
		proto := ipv4.ProtocolNumber
		if a.Is6() {
			proto, s.has6 = ipv6.ProtocolNumber, true
		} else {
			s.has4 = true
		}
		pa := tcpip.ProtocolAddress{
			Protocol:          proto,
			AddressWithPrefix: tcpip.AddressWithPrefix{Address: tcpip.AddrFromSlice(a.AsSlice()), PrefixLen: pfx.Bits()},
		}
		if err := s.stack.AddProtocolAddress(nicID, pa, stack.AddressProperties{}); err != nil {
			return fmt.Errorf("add address %s: %s", a, err)
		}
		s.addrs = append(s.addrs, a)
	}
	var table []tcpip.Route
	for _, r := range routes {
		r = r.Masked()
		sub, err := tcpip.NewSubnet(tcpip.AddrFromSlice(r.Addr().AsSlice()), tcpip.MaskFromBytes(net.CIDRMask(r.Bits(), r.Addr().BitLen())))
		if err != nil {
			return fmt.Errorf("route %s: %v", r, err)
		}
		table = append(table, tcpip.Route{Destination: sub, NIC: nicID})
	}
	s.stack.SetRouteTable(table)
	for _, opt := range []tcpip.SettableTransportProtocolOption{
		ptr(tcpip.TCPSACKEnabled(true)),
		ptr(tcpip.TCPModerateReceiveBufferOption(true)),
		ptr(tcpip.CongestionControlOption("cubic")),
		&tcpip.TCPReceiveBufferSizeRangeOption{Min: 4 << 10, Default: 1 << 20, Max: 8 << 20},
		&tcpip.TCPSendBufferSizeRangeOption{Min: 4 << 10, Default: 1 << 20, Max: 8 << 20},
	} {
		if err := s.stack.SetTransportProtocolOption(tcp.ProtocolNumber, opt); err != nil {
			return fmt.Errorf("TCP option %T: %s", opt, err)
		}
	}
	return nil
}

func ptr[T any](v T) *T { return &v }

// Read implements tun.Device: the packets the client sends. It blocks for
// the first packet and takes whatever else is queued, up to len(bufs).
func (s *netStack) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	pkt := s.link.ReadContext(s.ctx)
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
		pkt = s.link.Read()
	}
	return n, nil
}

// Write implements tun.Device: the packets the peers send to the client.
func (s *netStack) Write(bufs [][]byte, offset int) (int, error) {
	if s.ctx.Err() != nil {
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
			continue // not IP: WireGuard only passes what the peer sent
		}
		pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(b)})
		s.link.InjectInbound(proto, pkt)
		pkt.DecRef()
	}
	return len(bufs), nil
}

// MTU implements tun.Device.
func (s *netStack) MTU() (int, error) { return s.mtu, nil }

// Name implements tun.Device.
func (s *netStack) Name() (string, error) { return "sluice-client", nil }

// File implements tun.Device; there is no file.
func (s *netStack) File() *os.File { return nil }

// Events implements tun.Device.
func (s *netStack) Events() <-chan tun.Event { return s.events }

// BatchSize implements tun.Device.
func (s *netStack) BatchSize() int { return batchSize }

// Close implements tun.Device: it aborts every connection and waits for
// the stack's goroutines.
func (s *netStack) Close() error {
	s.closeOnce.Do(func() {
		s.cancel()
		s.stack.Close()
		s.link.Close()
		s.stack.Wait()
		close(s.events)
	})
	return nil
}

// hasFamily reports whether the stack has an address of a's family.
func (s *netStack) hasFamily(a netip.Addr) bool {
	if a.Is4() {
		return s.has4
	}
	return s.has6
}

// isLocal reports whether a is one of the client's tunnel addresses.
func (s *netStack) isLocal(a netip.Addr) bool {
	for _, l := range s.addrs {
		if l == a {
			return true
		}
	}
	return false
}

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

// dialTCP connects to dst. ctx bounds the handshake only.
func (s *netStack) dialTCP(ctx context.Context, dst netip.AddrPort) (net.Conn, error) {
	fa, proto := fullAddr(dst)
	fa.NIC = nicID
	var wq waiter.Queue
	ep, terr := s.stack.NewEndpoint(tcp.ProtocolNumber, proto, &wq)
	if terr != nil {
		return nil, errnoOf(terr)
	}
	entry, ready := waiter.NewChannelEntry(waiter.WritableEvents)
	wq.EventRegister(&entry)
	defer wq.EventUnregister(&entry)
	terr = ep.Connect(fa)
	if _, started := terr.(*tcpip.ErrConnectStarted); started {
		select {
		case <-ctx.Done():
			ep.Close()
			return nil, ctx.Err()
		case <-ready:
		}
		terr = ep.LastError()
	}
	if terr != nil {
		ep.Close()
		return nil, os.NewSyscallError("connect", errnoOf(terr))
	}
	return gonet.NewTCPConn(&wq, ep), nil
}

// dialUDP opens a UDP socket connected to dst.
func (s *netStack) dialUDP(dst netip.AddrPort) (net.Conn, error) {
	fa, proto := fullAddr(dst)
	fa.NIC = nicID
	var wq waiter.Queue
	ep, terr := s.stack.NewEndpoint(udp.ProtocolNumber, proto, &wq)
	if terr != nil {
		return nil, errnoOf(terr)
	}
	if terr := ep.Connect(fa); terr != nil {
		ep.Close()
		return nil, os.NewSyscallError("connect", errnoOf(terr))
	}
	return gonet.NewUDPConn(&wq, ep), nil
}

// listenTCP listens on addr; an unspecified IPv6 address with dualStack
// accepts IPv4 connections too.
func (s *netStack) listenTCP(addr netip.AddrPort, dualStack bool) (*gonet.TCPListener, error) {
	fa, proto := fullAddr(addr)
	var wq waiter.Queue
	ep, terr := s.stack.NewEndpoint(tcp.ProtocolNumber, proto, &wq)
	if terr != nil {
		return nil, errnoOf(terr)
	}
	if proto == ipv6.ProtocolNumber {
		ep.SocketOptions().SetV6Only(!dualStack)
	}
	if terr := ep.Bind(fa); terr != nil {
		ep.Close()
		return nil, os.NewSyscallError("bind", errnoOf(terr))
	}
	// The backlog the kernel would allow by default (somaxconn).
	if terr := ep.Listen(4096); terr != nil {
		ep.Close()
		return nil, os.NewSyscallError("listen", errnoOf(terr))
	}
	return gonet.NewTCPListener(s.stack, &wq, ep), nil
}

// listenUDP opens an unconnected UDP socket on addr; see listenTCP for
// dualStack.
func (s *netStack) listenUDP(addr netip.AddrPort, dualStack bool) (*gonet.UDPConn, error) {
	fa, proto := fullAddr(addr)
	var wq waiter.Queue
	ep, terr := s.stack.NewEndpoint(udp.ProtocolNumber, proto, &wq)
	if terr != nil {
		return nil, errnoOf(terr)
	}
	if proto == ipv6.ProtocolNumber {
		ep.SocketOptions().SetV6Only(!dualStack)
	}
	if terr := ep.Bind(fa); terr != nil {
		ep.Close()
		return nil, os.NewSyscallError("bind", errnoOf(terr))
	}
	return gonet.NewUDPConn(&wq, ep), nil
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
