package proxy_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/sluice-vpn/sluice/pkg/proxy"
)

// hostDialer is a PacketDialer on the host's own network that reaches
// loopback only, resolving names from its table: the proxies' tests need
// no tunnel. Anything else is refused before a packet leaves.
type hostDialer struct {
	mu    sync.Mutex
	names map[string][]netip.Addr
	// fail, when set, decides the fate of a dial to a name before it is
	// resolved.
	fail func(ctx context.Context, host string) error
}

func newHostDialer() *hostDialer { return &hostDialer{names: map[string][]netip.Addr{}} }

func (d *hostDialer) set(name string, addrs ...netip.Addr) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.names[name] = addrs
}

func (d *hostDialer) LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error) {
	if a, err := netip.ParseAddr(host); err == nil {
		return []netip.Addr{a}, nil
	}
	d.mu.Lock()
	addrs, ok := d.names[host]
	d.mu.Unlock()
	if !ok {
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	return addrs, nil
}

func (d *hostDialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	host, port, err := net.SplitHostPort(address)
	if err != nil {
		return nil, err
	}
	if d.fail != nil {
		if err := d.fail(ctx, host); err != nil {
			return nil, &net.OpError{Op: "dial", Net: network, Err: err}
		}
	}
	addrs, err := d.LookupNetIP(ctx, "ip", host)
	if err != nil {
		return nil, &net.OpError{Op: "dial", Net: network, Err: err}
	}
	a := addrs[0].Unmap()
	if !a.IsLoopback() {
		return nil, &net.OpError{Op: "dial", Net: network, Err: fmt.Errorf("%s: %w", a, proxy.ErrNotAllowed)}
	}
	var nd net.Dialer
	return nd.DialContext(ctx, network, net.JoinHostPort(a.String(), port))
}

func (d *hostDialer) ListenPacket(network, address string) (net.PacketConn, error) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	return loopbackOnly{pc}, nil
}

// loopbackOnly drops datagrams to anything but loopback.
type loopbackOnly struct{ net.PacketConn }

func (l loopbackOnly) WriteTo(b []byte, addr net.Addr) (int, error) {
	ua, ok := addr.(*net.UDPAddr)
	if !ok || !ua.AddrPort().Addr().Unmap().IsLoopback() {
		return 0, proxy.ErrNotAllowed
	}
	return l.PacketConn.WriteTo(b, &net.UDPAddr{IP: ua.IP.To4(), Port: ua.Port})
}

// tcpOnly hides the PacketDialer methods.
type tcpOnly struct{ d *hostDialer }

func (t tcpOnly) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	return t.d.DialContext(ctx, network, address)
}

// refusedPort returns a loopback address nothing listens on.
func refusedPort(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// startEcho starts a TCP echo server on loopback.
func startEcho(t testing.TB) *net.TCPAddr {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr)
}

// startUDPEcho starts a UDP echo server on loopback.
func startUDPEcho(t testing.TB) netip.AddrPort {
	t.Helper()
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { pc.Close(); <-done })
	go func() {
		defer close(done)
		buf := make([]byte, 65536)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(buf[:n], from)
		}
	}()
	return netip.MustParseAddrPort(pc.LocalAddr().String())
}

// socksClient speaks the client side of SOCKS5, byte by byte, so that the
// tests see every reply code.
type socksClient struct {
	conn net.Conn
}

func dialSOCKS(t testing.TB, proxyAddr string) *socksClient {
	t.Helper()
	c, err := net.Dial("tcp", proxyAddr)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	t.Cleanup(func() { c.Close() })
	return &socksClient{conn: c}
}

// greet offers methods and returns the one the server picked.
func (s *socksClient) greet(methods ...byte) (byte, error) {
	if _, err := s.conn.Write(append([]byte{5, byte(len(methods))}, methods...)); err != nil {
		return 0, err
	}
	var b [2]byte
	if _, err := io.ReadFull(s.conn, b[:]); err != nil {
		return 0, err
	}
	return b[1], nil
}

// login sends RFC 1929 credentials and returns the status.
func (s *socksClient) login(user, pass string) (byte, error) {
	msg := append([]byte{1, byte(len(user))}, user...)
	msg = append(append(msg, byte(len(pass))), pass...)
	if _, err := s.conn.Write(msg); err != nil {
		return 0, err
	}
	var b [2]byte
	if _, err := io.ReadFull(s.conn, b[:]); err != nil {
		return 0, err
	}
	return b[1], nil
}

// request sends a request for host:port with the address type that fits
// host, and returns the reply code and the bound address.
func (s *socksClient) request(cmd byte, host string, port uint16) (byte, netip.AddrPort, error) {
	msg := appendSOCKSAddr([]byte{5, cmd, 0}, host, port)
	if _, err := s.conn.Write(msg); err != nil {
		return 0, netip.AddrPort{}, err
	}
	return readReply(s.conn)
}

func appendSOCKSAddr(b []byte, host string, port uint16) []byte {
	if a, err := netip.ParseAddr(host); err == nil && a.Is4() {
		b = append(append(b, 1), a.AsSlice()...)
	} else if err == nil {
		b = append(append(b, 4), a.AsSlice()...)
	} else {
		b = append(append(b, 3, byte(len(host))), host...)
	}
	return binary.BigEndian.AppendUint16(b, port)
}

func readReply(r io.Reader) (byte, netip.AddrPort, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, netip.AddrPort{}, err
	}
	var a netip.Addr
	switch hdr[3] {
	case 1:
		var b [4]byte
		if _, err := io.ReadFull(r, b[:]); err != nil {
			return 0, netip.AddrPort{}, err
		}
		a = netip.AddrFrom4(b)
	case 4:
		var b [16]byte
		if _, err := io.ReadFull(r, b[:]); err != nil {
			return 0, netip.AddrPort{}, err
		}
		a = netip.AddrFrom16(b)
	default:
		return 0, netip.AddrPort{}, errors.New("reply with address type " + strconv.Itoa(int(hdr[3])))
	}
	var p [2]byte
	if _, err := io.ReadFull(r, p[:]); err != nil {
		return 0, netip.AddrPort{}, err
	}
	return hdr[1], netip.AddrPortFrom(a, binary.BigEndian.Uint16(p[:])), nil
}

// connect does greet and CONNECT without authentication.
func (s *socksClient) connect(host string, port uint16) (byte, error) {
	if m, err := s.greet(0); err != nil || m != 0 {
		return 0, fmt.Errorf("greeting: method %d, %v", m, err)
	}
	code, _, err := s.request(1, host, port)
	return code, err
}
