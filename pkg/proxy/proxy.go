// Package proxy serves SOCKS5 (RFC 1928, with RFC 1929's username and
// password) and HTTP proxies that open their connections through a Dialer
// of the caller's choosing, so that programs that are not written in Go
// can use a tunnel that lives in this process. The proxies know nothing of
// the tunnel: any Dialer will do, a *client.Client from pkg/client in
// sluice's case.
//
// The canonical use is
//
//	srv, err := proxy.NewSOCKS5(proxy.SOCKS5Options{Dialer: c})
//	...
//	ln, err := net.Listen("tcp", "127.0.0.1:1080")
//	...
//	go srv.Serve(ln)
//	...
//	srv.Close()
//
// Both servers bound what clients can make them hold: at most MaxConns
// client connections are served at once, and the next is refused the
// protocol's way (SOCKS reply 1, HTTP 503) rather than left waiting.
package proxy

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"
)

// Defaults for the servers' options.
const (
	// DefaultMaxConns bounds the client connections served at once.
	DefaultMaxConns = 1024
	// DefaultDialTimeout bounds opening a proxied connection.
	DefaultDialTimeout = 30 * time.Second
	// DefaultHandshakeTimeout bounds the time a client has to say what it
	// wants once connected: the SOCKS greeting and request, or an HTTP
	// request's header.
	DefaultHandshakeTimeout = 10 * time.Second
	// DefaultUDPIdleTimeout ends a UDP association with no datagram either
	// way for this long.
	DefaultUDPIdleTimeout = 2 * time.Minute
)

// Dialer opens the connections the proxies relay to. DialContext has the
// net package's contract: network is "tcp" (or "udp" for a Dialer that is
// also a PacketDialer), address is HOST:PORT where HOST may be a name,
// which the Dialer resolves.
//
// The proxies map its errors to their replies with errors.Is: to
// ErrNotAllowed, and to syscall.ECONNREFUSED, ENETUNREACH, EHOSTUNREACH
// and ETIMEDOUT; a *net.DNSError means the name did not resolve.
type Dialer interface {
	DialContext(ctx context.Context, network, address string) (net.Conn, error)
}

// PacketDialer is a Dialer that can also carry UDP, which SOCKS5's UDP
// ASSOCIATE needs: one unconnected socket per association, and names
// resolved the Dialer's way. A SOCKS5 server whose Dialer is not a
// PacketDialer refuses UDP ASSOCIATE as an unsupported command.
type PacketDialer interface {
	Dialer
	// ListenPacket opens an unconnected UDP socket, as net.ListenPacket
	// does; the proxy asks for ("udp", ":0"). Its WriteTo takes a
	// *net.UDPAddr.
	ListenPacket(network, address string) (net.PacketConn, error)
	// LookupNetIP resolves a name as (*net.Resolver).LookupNetIP does.
	LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
}

// ErrNotAllowed is for Dialers to wrap when a destination is refused by
// rule rather than by the network: SOCKS5 clients get reply 2
// ("connection not allowed by ruleset"), HTTP clients 403.
var ErrNotAllowed = errors.New("proxy: destination not allowed")

// ErrServerClosed is returned by Serve after Close.
var ErrServerClosed = errors.New("proxy: server closed")

// Credentials are a username and password that clients must give: SOCKS5
// clients with RFC 1929, HTTP clients in a Basic Proxy-Authorization
// header.
type Credentials struct {
	// Username is required, at most 255 bytes and without ':'.
	Username string
	// Password is at most 255 bytes; it may be empty.
	Password string
}

// check validates c for both protocols; field names the option.
func (c *Credentials) check(field string) error {
	if c == nil {
		return nil
	}
	switch {
	case c.Username == "":
		return fmt.Errorf("proxy: %s.Username is empty", field)
	case len(c.Username) > 255 || len(c.Password) > 255:
		return fmt.Errorf("proxy: %s: username and password are at most 255 bytes each (RFC 1929)", field)
	case strings.Contains(c.Username, ":"):
		return fmt.Errorf("proxy: %s.Username contains ':', which Basic authentication cannot carry", field)
	}
	return nil
}

// match reports whether user and pass are c's, in time that does not
// depend on where they differ.
func (c *Credentials) match(user, pass string) bool {
	u := subtle.ConstantTimeCompare([]byte(user), []byte(c.Username))
	p := subtle.ConstantTimeCompare([]byte(pass), []byte(c.Password))
	return u&p == 1
}

// common holds the options both servers share, defaults filled in.
type common struct {
	maxConns         int
	dialTimeout      time.Duration
	handshakeTimeout time.Duration
}

func newCommon(prefix string, maxConns int, dial, handshake time.Duration) (common, error) {
	if maxConns < 0 {
		return common{}, fmt.Errorf("proxy: %s.MaxConns %d is negative", prefix, maxConns)
	}
	if dial < 0 {
		return common{}, fmt.Errorf("proxy: %s.DialTimeout %s is negative", prefix, dial)
	}
	if handshake < 0 {
		return common{}, fmt.Errorf("proxy: %s.HandshakeTimeout %s is negative", prefix, handshake)
	}
	c := common{maxConns: maxConns, dialTimeout: dial, handshakeTimeout: handshake}
	if c.maxConns == 0 {
		c.maxConns = DefaultMaxConns
	}
	if c.dialTimeout == 0 {
		c.dialTimeout = DefaultDialTimeout
	}
	if c.handshakeTimeout == 0 {
		c.handshakeTimeout = DefaultHandshakeTimeout
	}
	return c, nil
}
