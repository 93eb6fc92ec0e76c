package gateway

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/sluice-vpn/sluice/netstack"
)

// Services of the gateway's own, inside the tunnel: peers reach them on
// the gateway's tunnel addresses, and the gateway reaches peers' services
// the other way, with DialPeer. That is how a published service (pkg/edge,
// pkg/expose) registers and is reached, with no port open on any host.

// localBacklog is how many connections to a local listener may wait for
// Accept; more are reset, as a full kernel backlog would drop them.
const localBacklog = 128

var errNoListener = errors.New("gateway: nothing listens there")

// ListenLocal listens on port of the gateway's own tunnel addresses (the
// DNS port excepted). Each connection that a peer opens there is
// accepted as a net.Conn whose RemoteAddr is the peer's tunnel address,
// which WireGuard has authenticated: PeerByAddr names the caller. Such
// connections count against the peer's flow limits but are not NAT
// flows, so the connection table does not list them.
func (s *Server) ListenLocal(port uint16) (net.Listener, error) {
	if port == 0 || port == dnsPort {
		return nil, fmt.Errorf("gateway: listen on own port %d: reserved", port)
	}
	if len(s.opts.Addrs) == 0 {
		return nil, errors.New("gateway: listen on own addresses: Options.Addrs is empty")
	}
	ln := &localListener{
		s:     s,
		port:  port,
		addr:  net.TCPAddrFromAddrPort(netip.AddrPortFrom(s.opts.Addrs[0], port)),
		conns: make(chan net.Conn, localBacklog),
		done:  make(chan struct{}),
	}
	if _, taken := s.local.LoadOrStore(port, ln); taken {
		return nil, fmt.Errorf("gateway: listen on own port %d: %w", port, unix.EADDRINUSE)
	}
	return ln, nil
}

// dialLocal connects a peer's flow to the local listener on its port,
// through a socket pair, so that the stack relays it as any other flow
// (half-close included) and the listener's user sees a plain net.Conn.
func (s *Server) dialLocal(peer string, src, dst netip.AddrPort) (net.Conn, error) {
	v, ok := s.local.Load(dst.Port())
	if !ok {
		return nil, netstack.Refuse(netstack.RefuseReset, errNoListener)
	}
	ln := v.(*localListener)
	release, err := s.limiter.Admit(s.limitKey(peer, src.Addr()))
	if err != nil {
		return nil, s.refuse(err, netstack.RefuseReset)
	}
	release = sync.OnceFunc(release)
	ours, theirs, err := socketPair()
	if err != nil {
		release()
		return nil, fmt.Errorf("gateway: local connection: %w", err)
	}
	accepted := &localConn{UnixConn: theirs,
		local: net.TCPAddrFromAddrPort(dst), remote: net.TCPAddrFromAddrPort(src)}
	if !ln.offer(accepted) {
		ours.Close()
		theirs.Close()
		release()
		return nil, netstack.Refuse(netstack.RefuseReset, errors.New("gateway: local listener's backlog is full"))
	}
	return &relayEnd{UnixConn: ours, release: release}, nil
}

func socketPair() (a, b *net.UnixConn, err error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return nil, nil, os.NewSyscallError("socketpair", err)
	}
	conns := make([]*net.UnixConn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "local")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			for _, c := range conns[:i] {
				c.Close()
			}
			for _, fd := range fds[i+1:] {
				unix.Close(fd)
			}
			return nil, nil, err
		}
		conns[i] = c.(*net.UnixConn)
	}
	return conns[0], conns[1], nil
}

// localListener hands the connections of one local port to Accept.
type localListener struct {
	s     *Server
	port  uint16
	addr  net.Addr
	conns chan net.Conn
	mu    sync.Mutex // orders offer against Close
	done  chan struct{}
	once  sync.Once
}

func (l *localListener) offer(c net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	select {
	case <-l.done:
		return false
	default:
	}
	select {
	case l.conns <- c:
		return true
	default:
		return false
	}
}

func (l *localListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, &net.OpError{Op: "accept", Net: "tcp", Addr: l.addr, Err: net.ErrClosed}
	}
}

// Close stops the listener and resets the connections still waiting.
func (l *localListener) Close() error {
	l.once.Do(func() {
		l.mu.Lock()
		close(l.done)
		l.mu.Unlock()
		l.s.local.CompareAndDelete(l.port, l)
		for {
			select {
			case c := <-l.conns:
				c.Close()
			default:
				return
			}
		}
	})
	return nil
}

func (l *localListener) Addr() net.Addr { return l.addr }

// localConn is the accepted end of a local connection, addressed as the
// TCP connection it stands for.
type localConn struct {
	*net.UnixConn
	local, remote net.Addr
}

func (c *localConn) LocalAddr() net.Addr  { return c.local }
func (c *localConn) RemoteAddr() net.Addr { return c.remote }

// relayEnd is the stack's end of a local connection; closing it gives
// the flow's place in the peer's limit back.
type relayEnd struct {
	*net.UnixConn
	release func()
}

func (c *relayEnd) Close() error {
	c.release()
	return c.UnixConn.Close()
}

// DialPeer opens a TCP connection through the tunnel to dst, a peer's
// tunnel address, from the gateway's own address of the same family.
// ctx bounds the handshake; a peer that is not connected does not answer,
// so give it a deadline.
func (s *Server) DialPeer(ctx context.Context, dst netip.AddrPort) (net.Conn, error) {
	if s.wg == nil {
		return nil, errNoWireGuard
	}
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	if s.peerOf(dst.Addr()) == "" {
		return nil, fmt.Errorf("gateway: dial %s: no peer has that address", dst)
	}
	var src netip.Addr
	for _, a := range s.opts.Addrs {
		if a.Unmap().Is4() == dst.Addr().Is4() {
			src = a.Unmap()
			break
		}
	}
	if !src.IsValid() {
		return nil, fmt.Errorf("gateway: dial %s: the gateway has no tunnel address of that family", dst)
	}
	c, err := s.stack.DialTCP(ctx, src, dst)
	if err != nil {
		return nil, fmt.Errorf("gateway: dial peer %s: %w", dst, err)
	}
	return c, nil
}

// PeerByAddr returns the peer that owns a tunnel address.
func (s *Server) PeerByAddr(a netip.Addr) (Peer, bool) {
	name := s.peerOf(a)
	if name == "" {
		return Peer{}, false
	}
	s.peerMu.Lock()
	defer s.peerMu.Unlock()
	p, ok := s.peers[name]
	return p, ok
}
