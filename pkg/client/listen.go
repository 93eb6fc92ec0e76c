package client

import (
	"fmt"
	"net"
	"net/netip"
	"sync/atomic"
	"syscall"
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
	ln, err := c.ns.ListenTCP(ap, dual)
	if err != nil {
		return nil, &net.OpError{Op: "listen", Net: network, Addr: net.TCPAddrFromAddrPort(ap), Err: err}
	}
	return &listener{Listener: ln, network: network}, nil
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
	pc, err := c.ns.ListenUDP(ap, dual)
	if err != nil {
		return nil, &net.OpError{Op: "listen", Net: network, Addr: net.UDPAddrFromAddrPort(ap), Err: err}
	}
	return &packetConn{PacketConn: pc, c: c, v6: ap.Addr().Is6(), network: network}, nil
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
		if !a.IsUnspecified() && !c.isLocal(a) {
			return netip.AddrPort{}, false, fmt.Errorf("%s is not one of the tunnel's addresses %v: %w", a, c.addrs, syscall.EADDRNOTAVAIL)
		}
	}
	switch {
	case a.IsValid() && !c.hasFamily(a):
		return netip.AddrPort{}, false, &net.AddrError{Err: "the tunnel has no address of this family", Addr: host}
	case a.IsValid():
		// A specific address, or the unspecified address of one family.
	case family == 4 || family == 0 && !c.has6:
		if !c.has4 {
			return netip.AddrPort{}, false, &net.AddrError{Err: "the tunnel has no IPv4 address", Addr: address}
		}
		a = netip.IPv4Unspecified()
	default:
		if !c.has6 {
			return netip.AddrPort{}, false, &net.AddrError{Err: "the tunnel has no IPv6 address", Addr: address}
		}
		a = netip.IPv6Unspecified()
		dual = family == 0 && c.has4
	}
	return netip.AddrPortFrom(a, port), dual, nil
}

// listener is the stack's listener with errors that name the network
// Listen was given, as the net package's do.
type listener struct {
	net.Listener
	network string
	closed  atomic.Bool
}

// Accept implements net.Listener.
func (l *listener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
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
	l.closed.Store(true)
	return l.Listener.Close()
}

// packetConn is the stack's UDP socket that refuses destinations outside
// the tunnel's routes, with errors that name the network ListenPacket was
// given.
type packetConn struct {
	net.PacketConn
	c       *Client
	v6      bool
	network string
}

// WriteTo implements net.PacketConn.
func (p *packetConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	ua, ok := addr.(*net.UDPAddr)
	if !ok {
		return 0, &net.OpError{Op: "write", Net: p.network, Addr: addr, Err: syscall.EINVAL}
	}
	a := ua.AddrPort().Addr().Unmap()
	switch {
	case !p.c.routable(a):
		return 0, &net.OpError{Op: "write", Net: p.network, Addr: addr, Err: &errNoRoute{a}}
	case a.Is6() && !p.v6:
		return 0, &net.OpError{Op: "write", Net: p.network, Addr: addr, Err: syscall.EAFNOSUPPORT}
	}
	// The stack's socket takes IPv4 destinations in either form.
	return p.PacketConn.WriteTo(b, addr)
}
