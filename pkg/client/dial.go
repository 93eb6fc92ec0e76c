package client

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"syscall"
	"time"
)

// fallbackDelay is how long a TCP dial to a name with addresses of both
// families waits for the first family before racing the other, as the
// net package does (RFC 8305).
const fallbackDelay = 300 * time.Millisecond

// errNoRoute is what a destination outside every peer's AllowedIPs gets:
// the tunnel has no route there.
type errNoRoute struct{ addr netip.Addr }

func (e *errNoRoute) Error() string {
	return fmt.Sprintf("network is unreachable: no peer's AllowedIPs include %s", e.addr)
}

func (e *errNoRoute) Unwrap() error { return syscall.ENETUNREACH }

// Dial is DialContext without a context.
func (c *Client) Dial(network, address string) (net.Conn, error) {
	return c.DialContext(context.Background(), network, address)
}

// DialContext connects to address on the named network through the
// tunnel, as (*net.Dialer).DialContext does on the host. The networks are
// "tcp", "tcp4", "tcp6", "udp", "udp4" and "udp6"; address is HOST:PORT,
// where HOST is an IP address or a name, which the DNS servers of the
// configuration resolve through the tunnel. A name with addresses of both
// families is dialled IPv4 first, IPv6 300 ms later if IPv4 has not
// connected yet. A destination outside every peer's AllowedIPs fails at
// once with an error that wraps syscall.ENETUNREACH; the errors of a
// refused or unreachable destination wrap ECONNREFUSED, EHOSTUNREACH and
// so on, as the host's would.
//
// TCP connections have CloseWrite and CloseRead, as a *net.TCPConn does.
func (c *Client) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	proto, family, err := splitNetwork(network)
	if err != nil {
		return nil, &net.OpError{Op: "dial", Net: network, Err: err}
	}
	if c.ctx.Err() != nil {
		return nil, &net.OpError{Op: "dial", Net: network, Err: ErrClosed}
	}
	host, port, err := c.splitHostPort(ctx, proto, address)
	if err != nil {
		return nil, &net.OpError{Op: "dial", Net: network, Err: err}
	}
	addrs, err := c.resolveForDial(ctx, family, host)
	if err != nil {
		return nil, &net.OpError{Op: "dial", Net: network, Err: err}
	}
	var routed []netip.Addr
	for _, a := range addrs {
		if c.routable(a) {
			routed = append(routed, a)
		}
	}
	if len(routed) == 0 {
		return nil, &net.OpError{Op: "dial", Net: network, Addr: sockaddr(proto, netip.AddrPortFrom(addrs[0], port)), Err: &errNoRoute{addrs[0]}}
	}
	if proto == "udp" {
		return c.dialSerial(ctx, network, proto, routed[:1], port)
	}
	var primaries, fallbacks []netip.Addr
	for _, a := range routed {
		if a.Is4() == routed[0].Is4() {
			primaries = append(primaries, a)
		} else {
			fallbacks = append(fallbacks, a)
		}
	}
	if len(fallbacks) == 0 {
		return c.dialSerial(ctx, network, proto, primaries, port)
	}
	return c.dialRace(ctx, network, primaries, fallbacks, port)
}

// dialRace dials primaries and, fallbackDelay later or as soon as they
// fail, fallbacks; the first connection wins and the other is closed.
func (c *Client) dialRace(ctx context.Context, network string, primaries, fallbacks []netip.Addr, port uint16) (net.Conn, error) {
	type result struct {
		conn    net.Conn
		err     error
		primary bool
	}
	results := make(chan result)
	returned := make(chan struct{})
	defer close(returned)
	race := func(ctx context.Context, addrs []netip.Addr, primary bool) {
		conn, err := c.dialSerial(ctx, network, "tcp", addrs, port)
		select {
		case results <- result{conn, err, primary}:
		case <-returned:
			if conn != nil {
				conn.Close()
			}
		}
	}
	primaryCtx, cancelPrimary := context.WithCancel(ctx)
	defer cancelPrimary()
	go race(primaryCtx, primaries, true)

	fallbackTimer := time.NewTimer(fallbackDelay)
	defer fallbackTimer.Stop()
	var primaryErr error
	pending := 1
	fallbackStarted := false
	startFallback := func() {
		fallbackStarted = true
		pending++
		fallbackCtx, cancelFallback := context.WithCancel(ctx)
		context.AfterFunc(primaryCtx, cancelFallback) // ends with the dial
		go race(fallbackCtx, fallbacks, false)
	}
	for {
		select {
		case <-fallbackTimer.C:
			if !fallbackStarted {
				startFallback()
			}
		case r := <-results:
			pending--
			if r.err == nil {
				return r.conn, nil
			}
			if r.primary {
				primaryErr = r.err
				if !fallbackStarted {
					startFallback()
				}
			} else if primaryErr == nil {
				primaryErr = r.err // reported only if the primaries fail too
			}
			if pending == 0 && fallbackStarted {
				return nil, primaryErr
			}
		}
	}
}

// dialSerial tries addrs in turn, each with a share of ctx's remaining
// time, and returns the first connection or the first error.
func (c *Client) dialSerial(ctx context.Context, network, proto string, addrs []netip.Addr, port uint16) (net.Conn, error) {
	var firstErr error
	for i, a := range addrs {
		dst := netip.AddrPortFrom(a, port)
		dialCtx := ctx
		if deadline, ok := ctx.Deadline(); ok && i < len(addrs)-1 {
			// Leave the later addresses some time, as the net package
			// does: an equal share, but at least 2 s.
			share := time.Until(deadline) / time.Duration(len(addrs)-i)
			if share < 2*time.Second {
				share = min(2*time.Second, time.Until(deadline))
			}
			var cancel context.CancelFunc
			dialCtx, cancel = context.WithTimeout(ctx, share)
			defer cancel()
		}
		conn, err := c.dialAddr(dialCtx, proto, dst)
		if err == nil {
			return conn, nil
		}
		if firstErr == nil {
			firstErr = &net.OpError{Op: "dial", Net: network, Addr: sockaddr(proto, dst), Err: err}
		}
		if ctx.Err() != nil {
			break
		}
	}
	return nil, firstErr
}

// dialAddr connects to one address.
func (c *Client) dialAddr(ctx context.Context, proto string, dst netip.AddrPort) (net.Conn, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if proto == "udp" {
		return c.ns.DialUDP(dst)
	}
	return c.ns.DialTCP(ctx, dst)
}

// dialRouted connects to an address literal, as the resolver needs.
func (c *Client) dialRouted(ctx context.Context, proto string, dst netip.AddrPort) (net.Conn, error) {
	if !c.routable(dst.Addr()) {
		return nil, &errNoRoute{dst.Addr()}
	}
	if !c.hasFamily(dst.Addr()) {
		return nil, fmt.Errorf("the tunnel has no address of %s's family", dst.Addr())
	}
	return c.dialAddr(ctx, proto, dst)
}

// hasFamily reports whether the tunnel has an address of a's family.
func (c *Client) hasFamily(a netip.Addr) bool {
	if a.Is4() {
		return c.has4
	}
	return c.has6
}

// isLocal reports whether a is one of the client's tunnel addresses.
func (c *Client) isLocal(a netip.Addr) bool {
	return slices.Contains(c.addrs, a)
}

// routable reports whether packets to a go into the tunnel: to one of the
// client's own addresses, or to a peer that allows it.
func (c *Client) routable(a netip.Addr) bool {
	if c.isLocal(a) {
		return true
	}
	for _, r := range c.routes {
		if r.Contains(a) {
			return true
		}
	}
	return false
}

// LookupNetIP looks host up with the DNS servers of the configuration,
// through the tunnel, as (*net.Resolver).LookupNetIP does on the host:
// network is "ip", "ip4" or "ip6". IPv4 addresses come first. An IP
// address is returned as it is. Errors are *net.DNSError.
func (c *Client) LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error) {
	var want4, want6 bool
	switch network {
	case "ip":
		want4, want6 = true, true
	case "ip4":
		want4 = true
	case "ip6":
		want6 = true
	default:
		return nil, net.UnknownNetworkError(network)
	}
	if a, err := netip.ParseAddr(host); err == nil {
		a = a.Unmap()
		if a.Is4() && !want4 || a.Is6() && !want6 {
			return nil, &net.AddrError{Err: "no suitable address", Addr: host}
		}
		return []netip.Addr{a}, nil
	}
	return c.dns.lookup(ctx, host, want4, want6)
}

// LookupHost is LookupNetIP for "ip" with the addresses as strings, as
// (*net.Resolver).LookupHost returns them.
func (c *Client) LookupHost(ctx context.Context, host string) ([]string, error) {
	addrs, err := c.LookupNetIP(ctx, "ip", host)
	if err != nil {
		return nil, err
	}
	out := make([]string, len(addrs))
	for i, a := range addrs {
		out[i] = a.String()
	}
	return out, nil
}

// resolveForDial returns the addresses of host the tunnel can carry for
// family (0 for both).
func (c *Client) resolveForDial(ctx context.Context, family int, host string) ([]netip.Addr, error) {
	if host == "" {
		return nil, errors.New("missing address")
	}
	if a, err := netip.ParseAddr(host); err == nil {
		if a.Zone() != "" {
			return nil, &net.AddrError{Err: "zones mean nothing inside the tunnel", Addr: host}
		}
		a = a.Unmap()
		if family == 4 && !a.Is4() || family == 6 && !a.Is6() {
			return nil, &net.AddrError{Err: "address of the wrong family for the network", Addr: host}
		}
		if !c.hasFamily(a) {
			return nil, &net.AddrError{Err: "the tunnel has no address of this family", Addr: host}
		}
		return []netip.Addr{a}, nil
	}
	want4 := family != 6 && c.has4
	want6 := family != 4 && c.has6
	if !want4 && !want6 {
		return nil, &net.AddrError{Err: fmt.Sprintf("the tunnel has no IPv%d address", family), Addr: host}
	}
	return c.dns.lookup(ctx, host, want4, want6)
}

// splitNetwork parses "tcp", "udp6" and the like.
func splitNetwork(network string) (proto string, family int, err error) {
	switch network {
	case "tcp", "udp":
		return network, 0, nil
	case "tcp4", "udp4":
		return network[:3], 4, nil
	case "tcp6", "udp6":
		return network[:3], 6, nil
	}
	return "", 0, net.UnknownNetworkError(network)
}

// splitHostPort splits HOST:PORT; PORT may be a service name from the
// host's services database.
func (c *Client) splitHostPort(ctx context.Context, proto, address string) (string, uint16, error) {
	host, portStr, err := net.SplitHostPort(address)
	if err != nil {
		return "", 0, err
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil {
		p, lerr := net.DefaultResolver.LookupPort(ctx, proto, portStr)
		if lerr != nil {
			return "", 0, &net.AddrError{Err: "unknown port", Addr: address}
		}
		port = uint64(p)
	}
	return host, uint16(port), nil
}

// sockaddr is dst as the net.Addr of proto.
func sockaddr(proto string, dst netip.AddrPort) net.Addr {
	if proto == "udp" {
		return net.UDPAddrFromAddrPort(dst)
	}
	return net.TCPAddrFromAddrPort(dst)
}
