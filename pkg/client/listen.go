package client

import (
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"

	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
)

// Listen listens for TCP connections on the client's tunnel address, as
// net.Listen does on the host: network is "tcp", "tcp4" or "tcp6" and
// address is HOST:PORT, where an empty HOST (":8080") means every tunnel
// address and PORT 0 any free port. What can connect is what the peers
// let through: a sluice gateway does not route between its peers, so
// connections come from the client itself or through a peer that does.
func (c *Client) Listen(network, address string) (net.Listener, error) {
	proto, family, err := splitNetwork(network)
	if err == nil && proto != "tcp" {
		err = net.UnknownNetworkError(network)
	}
	if err != nil {
		return nil, &net.OpError{Op: "listen", Net: network, Err: err}
	}
	ap, dual, err := c.localAddr(proto, family, address)
	if err != nil {
		return nil, &net.OpError{Op: "listen", Net: network, Err: err}
	}
	ln, err := c.ns.listenTCP(ap, dual)
	if err != nil {
		return nil, &net.OpError{Op: "listen", Net: network, Addr: net.TCPAddrFromAddrPort(ap), Err: err}
	}
	return &listener{ln: ln, network: network, bound: ap.Addr()}, nil
}

// ListenPacket opens a UDP socket on the client's tunnel address, as
// net.ListenPacket does on the host: network is "udp", "udp4" or "udp6",
// address as for Listen. Its WriteTo takes a *net.UDPAddr; a "udp" socket
// of a tunnel with both families reaches both.
func (c *Client) ListenPacket(network, address string) (net.PacketConn, error) {
	proto, family, err := splitNetwork(network)
	if err == nil && proto != "udp" {
		err = net.UnknownNetworkError(network)
	}
	if err != nil {
		return nil, &net.OpError{Op: "listen", Net: network, Err: err}
	}
	ap, dual, err := c.localAddr(proto, family, address)
	if err != nil {
		return nil, &net.OpError{Op: "listen", Net: network, Err: err}
	}
	pc, err := c.ns.listenUDP(ap, dual)
	if err != nil {
		return nil, &net.OpError{Op: "listen", Net: network, Addr: net.UDPAddrFromAddrPort(ap), Err: err}
	}
	return &packetConn{UDPConn: pc, c: c, v6: ap.Addr().Is6(), network: network, bound: ap.Addr()}, nil
}

// localAddr parses a listening address: HOST must be empty, unspecified or
// one of the client's addresses. dual reports an IPv6 socket that takes
// IPv4 too.
func (c *Client) localAddr(proto string, family int, address string) (ap netip.AddrPort, dual bool, err error) {
	host, port, err := c.splitHostPort(c.ctx, proto, address)
	if err != nil {
		return netip.AddrPort{}, false, err
	}
	if c.ctx.Err() != nil {
		return netip.AddrPort{}, false, ErrClosed
	}
	var a netip.Addr
	if host != "" {
		if a, err = netip.ParseAddr(host); err != nil {
			return netip.AddrPort{}, false, &net.AddrError{Err: "not an IP address (a listener takes one of the tunnel's)", Addr: host}
		}
		a = a.Unmap()
		if family == 4 && !a.Is4() || family == 6 && !a.Is6() {
			return netip.AddrPort{}, false, &net.AddrError{Err: "address of the wrong family for the network", Addr: host}
		}
		if !a.IsUnspecified() && !c.ns.isLocal(a) {
			return netip.AddrPort{}, false, fmt.Errorf("%s is not one of the tunnel's addresses %v: %w", a, c.ns.addrs, syscall.EADDRNOTAVAIL)
		}
	}
	switch {
	case a.IsValid() && !c.ns.hasFamily(a):
		return netip.AddrPort{}, false, &net.AddrError{Err: "the tunnel has no address of this family", Addr: host}
	case a.IsValid():
		// A specific address, or the unspecified address of one family.
	case family == 4 || family == 0 && !c.ns.has6:
		if !c.ns.has4 {
			return netip.AddrPort{}, false, &net.AddrError{Err: "the tunnel has no IPv4 address", Addr: address}
		}
		a = netip.IPv4Unspecified()
	default:
		if !c.ns.has6 {
			return netip.AddrPort{}, false, &net.AddrError{Err: "the tunnel has no IPv6 address", Addr: address}
		}
		a = netip.IPv6Unspecified()
		dual = family == 0 && c.ns.has4
	}
	return netip.AddrPortFrom(a, port), dual, nil
}

// listener is a gonet listener whose Accept reports net.ErrClosed after
// Close, as a net.Listener's does, so that servers stop cleanly.
type listener struct {
	ln      *gonet.TCPListener
	network string
	bound   netip.Addr // as asked for, maybe unspecified

	once   sync.Once
	closed atomic.Bool
}

// Accept implements net.Listener.
func (l *listener) Accept() (net.Conn, error) {
	c, err := l.ln.Accept()
	if err != nil {
		if l.closed.Load() {
			return nil, &net.OpError{Op: "accept", Net: l.network, Addr: l.Addr(), Err: net.ErrClosed}
		}
		return nil, err
	}
	return c, nil
}

// Close implements net.Listener.
func (l *listener) Close() error {
	l.once.Do(func() {
		l.closed.Store(true)
		// Shutdown wakes an Accept that is waiting; Close frees the port.
		l.ln.Shutdown()
		l.ln.Close()
	})
	return nil
}

// Addr implements net.Listener. An unspecified address is named, as the
// net package names it ("[::]:8080"), rather than left out.
func (l *listener) Addr() net.Addr {
	a, _ := l.ln.Addr().(*net.TCPAddr)
	if a == nil {
		return &net.TCPAddr{IP: l.bound.AsSlice()}
	}
	if len(a.IP) == 0 {
		return &net.TCPAddr{IP: l.bound.AsSlice(), Port: a.Port}
	}
	return a
}

// packetConn is a gonet UDP socket that takes the addresses the net
// package gives (IPv4 in 16 bytes included), refuses destinations outside
// the tunnel's routes, and reports IPv4 senders as IPv4 on a dual-stack
// socket.
type packetConn struct {
	*gonet.UDPConn
	c       *Client
	v6      bool
	network string
	bound   netip.Addr // as asked for, maybe unspecified
}

// LocalAddr implements net.PacketConn, naming an unspecified address as
// Listener.Addr does.
func (p *packetConn) LocalAddr() net.Addr {
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
func (p *packetConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	ua, ok := addr.(*net.UDPAddr)
	if !ok {
		return 0, &net.OpError{Op: "write", Net: p.network, Addr: addr, Err: syscall.EINVAL}
	}
	dst := ua.AddrPort()
	a := dst.Addr().Unmap()
	switch {
	case !p.c.routable(a):
		return 0, &net.OpError{Op: "write", Net: p.network, Addr: addr, Err: &errNoRoute{a}}
	case a.Is6() && !p.v6:
		return 0, &net.OpError{Op: "write", Net: p.network, Addr: addr, Err: syscall.EAFNOSUPPORT}
	case a.Is4() && p.v6:
		// A dual-stack socket takes IPv4 destinations in mapped form.
		a = netip.AddrFrom16(a.As16())
	}
	return p.UDPConn.WriteTo(b, &net.UDPAddr{IP: a.AsSlice(), Port: int(dst.Port())})
}

// ReadFrom implements net.PacketConn.
func (p *packetConn) ReadFrom(b []byte) (int, net.Addr, error) {
	n, addr, err := p.UDPConn.ReadFrom(b)
	if ua, ok := addr.(*net.UDPAddr); ok {
		if ip4 := ua.IP.To4(); ip4 != nil {
			addr = &net.UDPAddr{IP: ip4, Port: ua.Port}
		}
	}
	return n, addr, err
}
