package gateway

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/sluice-vpn/sluice/nat"
	"github.com/sluice-vpn/sluice/netstack"
)

// handler is the Server seen as the stack's netstack.Handler: the policy
// first, then a table entry, then the egress socket.
type handler Server

var (
	_ netstack.Handler           = (*handler)(nil)
	_ netstack.Batcher           = (*handler)(nil)
	_ netstack.HandshakeAdmitter = (*handler)(nil)
	_ netstack.TryReader         = (*tcpConn)(nil)
)

// Why flows are refused, as counted in Stats and metrics.
const (
	RefusedPolicy   = iota // the policy denies the destination
	RefusedLimit           // a peer's rate or flow limit, or the table's size
	RefusedPorts           // the egress slice has no free port
	RefusedDial            // the destination refused or did not answer
	RefusedDraining        // the gateway is shutting down
	RefusedFiles           // the open file limit is near: the rest is kept for the admin API
	numRefusals
)

// RefusalNames name the refusal reasons, by index.
var RefusalNames = [numRefusals]string{"policy", "limit", "port_exhaustion", "dial_error", "draining", "file_limit"}

var errDraining = errors.New("gateway: shutting down, no new flows")

// refuse counts a refused flow by its reason and turns the error into the
// refusal the client sees; limit is how a limit is refused for this
// protocol.
func (s *Server) refuse(err error, limit netstack.Refusal) error {
	switch {
	case errors.Is(err, nat.ErrDenied):
		s.refusals[RefusedPolicy].Add(1)
		return netstack.Refuse(netstack.RefuseProhibited, err)
	case errors.Is(err, nat.ErrTableFull), errors.Is(err, nat.ErrRateLimited), errors.Is(err, nat.ErrPeerFlowLimit),
		errors.Is(err, nat.ErrHandshakeLimit):
		s.refusals[RefusedLimit].Add(1)
		s.logLimit(err)
		return netstack.Refuse(limit, err)
	case errors.Is(err, nat.ErrPortsExhausted):
		s.refusals[RefusedPorts].Add(1)
		return netstack.Refuse(limit, err)
	case errors.Is(err, nat.ErrFileReserve):
		s.refusals[RefusedFiles].Add(1)
		s.logLimit(err)
		return netstack.Refuse(limit, err)
	case errors.Is(err, errDraining):
		s.refusals[RefusedDraining].Add(1)
		return netstack.Refuse(limit, err)
	case errors.Is(err, nat.ErrPingUnavailable):
		return netstack.Refuse(netstack.RefuseDrop, err)
	case errors.Is(err, nat.ErrPingGroup):
		s.refusals[RefusedPolicy].Add(1)
		return netstack.Refuse(netstack.RefuseDrop, err)
	}
	s.refusals[RefusedDial].Add(1)
	return err
}

// check applies the policy for a peer's new flow.
func (s *Server) check(peer string, proto nat.Proto, dst netip.AddrPort) error {
	return s.policy.Load().CheckPeer(peer, proto, dst)
}

func (h *handler) DialTCP(ctx context.Context, src, dst netip.AddrPort) (net.Conn, error) {
	s := (*Server)(h)
	peer := s.peerOf(src.Addr())
	// The gateway's own addresses serve DNS, relayed to an upstream
	// resolver, and the local listeners (ListenLocal), which stay open
	// while the gateway drains: agents keep their leases while the edge
	// finishes its requests.
	to := dst
	own := s.own[dst.Addr().Unmap()]
	var dnsUp bool
	if own {
		to, dnsUp = s.dns.tcpUpstream(dst)
		if !dnsUp {
			return s.dialLocal(peer, src, dst)
		}
	}
	if s.draining.Load() {
		return nil, s.refuse(errDraining, netstack.RefuseReset)
	}
	if !own {
		if err := s.check(peer, nat.TCP, dst); err != nil {
			h.log.Debug("flow denied", zap.Stringer("src", src), zap.Error(err))
			return nil, s.refuse(err, netstack.RefuseReset)
		}
	}
	release, err := s.limiter.Admit(s.limitKey(peer, src.Addr()))
	if err != nil {
		return nil, s.refuse(err, netstack.RefuseReset)
	}
	release = sync.OnceFunc(release)
	c := &tcpConn{release: release}
	flow, err := h.table.Insert(nat.Key{Proto: nat.TCP, Client: src, Dest: dst}, peer, c.evict)
	if err != nil {
		release()
		return nil, s.refuse(err, netstack.RefuseReset)
	}
	conn, err := h.egress.DialTCP(ctx, to)
	if err != nil {
		flow.End(nat.ReasonReset)
		release()
		h.log.Debug("dial failed", zap.Stringer("dst", dst), zap.Error(err))
		return nil, s.refuse(err, netstack.RefuseReset)
	}
	if local, ok := conn.LocalAddr().(*net.TCPAddr); ok {
		flow.SetEgress(local.AddrPort())
	}
	flow.SetState(nat.StateEstablished)
	c.TCPConn, c.flow = conn, flow
	c.ready.Store(true)
	if c.evicted.Load() {
		// The table ended the flow while the dial was in progress.
		conn.Close()
		release()
		return nil, netstack.Refuse(netstack.RefuseReset, errors.New("gateway: flow evicted during dial"))
	}
	return c, nil
}

// AdmitHandshake implements netstack.HandshakeAdmitter: each peer (each
// client address in TUN mode) has its own share of the handshakes in
// flight, so that half-open handshakes from one cannot take the slots all
// share. Over its share, a SYN is answered with a RST.
func (h *handler) AdmitHandshake(src netip.AddrPort) (func(), error) {
	s := (*Server)(h)
	release, err := s.limiter.AdmitHandshake(s.limitKey(s.peerOf(src.Addr()), src.Addr()))
	if err != nil {
		return nil, s.refuse(err, netstack.RefuseReset)
	}
	return release, nil
}

func (h *handler) HandleUDP(src, dst netip.AddrPort, payload []byte) error {
	return h.HandleUDPTTL(src, dst, 0, payload)
}

// HandleUDPTTL implements netstack.TTLHandler: the datagram leaves with
// the TTL it came with less the gateway's hop, when that is lower than
// the kernel's default (traceroute's probes); ttl 0 is unknown.
func (h *handler) HandleUDPTTL(src, dst netip.AddrPort, ttl uint8, payload []byte) error {
	s := (*Server)(h)
	if s.own[dst.Addr().Unmap()] {
		return s.dns.query(src, dst, payload)
	}
	peer := s.peerOf(src.Addr())
	if err := s.check(peer, nat.UDP, dst); err != nil {
		return s.refuse(err, netstack.RefuseHostUnreachable)
	}
	if s.draining.Load() && h.table.Lookup(nat.Key{Proto: nat.UDP, Client: src, Dest: dst}) == nil {
		return s.refuse(errDraining, netstack.RefuseHostUnreachable)
	}
	// Datagrams wait for the end of the tunnel's batch (FlushBatch), so
	// that a run of them to one destination leaves in one UDP GSO send.
	if ttl > 0 {
		ttl-- // the gateway's hop
	}
	if err := h.udp.SendTTL(peer, src, dst, payload, ttl); err != nil {
		return s.refuse(err, netstack.RefuseHostUnreachable)
	}
	return nil
}

// FlushBatch implements netstack.Batcher.
func (h *handler) FlushBatch() { h.udp.Flush() }

func (h *handler) HandleEcho(src, dst netip.Addr, id, seq uint16, payload []byte) error {
	return h.HandleEchoTTL(src, dst, 0, id, seq, payload)
}

// HandleEchoTTL implements netstack.TTLHandler: as HandleUDPTTL, for
// traceroute by ping.
func (h *handler) HandleEchoTTL(src, dst netip.Addr, ttl uint8, id, seq uint16, payload []byte) error {
	s := (*Server)(h)
	if s.own[dst.Unmap()] {
		// The gateway is the destination here: it answers for itself.
		return s.stack.WriteEchoReply(dst, src, id, seq, payload)
	}
	peer := s.peerOf(src)
	if err := s.check(peer, nat.ICMP, netip.AddrPortFrom(dst, 0)); err != nil {
		return s.refuse(err, netstack.RefuseDrop)
	}
	if ttl > 0 {
		ttl-- // the gateway's hop
	}
	if err := h.pinger.EchoTTL(peer, src, dst, id, seq, payload, ttl); err != nil {
		return s.refuse(err, netstack.RefuseDrop)
	}
	return nil
}

func (s *Server) deliverUDP(src, dst netip.AddrPort, payload []byte) {
	s.stack.WriteUDP(src, dst, payload)
}

func (s *Server) deliverEcho(src, dst netip.Addr, id, seq uint16, payload []byte) {
	s.stack.WriteEchoReply(src, dst, id, seq, payload)
}

// tcpConn is an egress connection that accounts for itself in its flow.
// The stack relays through it; the table can evict it.
type tcpConn struct {
	*net.TCPConn
	flow    *nat.Flow
	release func()      // the flow's place in its peer's limit
	ready   atomic.Bool // TCPConn and flow are set
	evicted atomic.Bool
}

var _ netstack.SegmentCounter = (*tcpConn)(nil)

func (c *tcpConn) Read(p []byte) (int, error) {
	n, err := c.TCPConn.Read(p)
	if n > 0 {
		c.flow.CountReply(n, 0)
	}
	if errors.Is(err, io.EOF) {
		c.flow.SetState(nat.StateClosing)
	}
	return n, err
}

// TryRead implements netstack.TryReader with one non-blocking read of the
// socket, counted as Read counts.
func (c *tcpConn) TryRead(p []byte) (int, bool, error) {
	rc, err := c.TCPConn.SyscallConn()
	if err != nil {
		return 0, true, err
	}
	var n int
	var rerr error
	if err := rc.Read(func(fd uintptr) bool {
		n, rerr = unix.Read(int(fd), p)
		return true // never wait: the relay waits without a buffer
	}); err != nil {
		return 0, true, err
	}
	switch {
	case rerr == unix.EAGAIN || rerr == unix.EINTR:
		return 0, false, nil
	case rerr != nil:
		return 0, true, os.NewSyscallError("read", rerr)
	case n == 0 && len(p) > 0:
		c.flow.SetState(nat.StateClosing)
		return 0, true, io.EOF
	}
	c.flow.CountReply(n, 0)
	return n, true, nil
}

func (c *tcpConn) Write(p []byte) (int, error) {
	n, err := c.TCPConn.Write(p)
	if n > 0 {
		c.flow.CountOrig(n, 0)
	}
	return n, err
}

func (c *tcpConn) CloseWrite() error {
	c.flow.SetState(nat.StateClosing)
	return c.TCPConn.CloseWrite()
}

func (c *tcpConn) CountSegments(fromClient, toClient uint64) {
	c.flow.CountOrig(0, int(fromClient))
	c.flow.CountReply(0, int(toClient))
}

func (c *tcpConn) Close() error {
	reason := nat.ReasonClosed
	if c.evicted.Load() {
		reason = nat.ReasonEvicted
	}
	c.flow.End(reason)
	c.release()
	return c.TCPConn.Close()
}

// evict is the flow's closer: the table ends the flow (idle timeout, an
// operator's request, shutdown). Resetting the egress socket makes the
// relay fail, which resets the client too.
func (c *tcpConn) evict(nat.Reason) {
	c.evicted.Store(true)
	if c.ready.Load() {
		c.SetLinger(0)
		c.TCPConn.Close()
	}
}

// limitKey names what the per-peer limits count a new flow against: the
// WireGuard peer, or in TUN mode, where every client is the unnamed peer,
// the client's IPv4 address or IPv6 /64, so that one host behind the TUN
// device cannot use up what all of them share (a /64 because one IPv6
// host may take any number of addresses in its own). The limiter forgets
// an idle one.
func (s *Server) limitKey(peer string, client netip.Addr) string {
	if s.opts.WireGuard != nil {
		return peer
	}
	client = client.Unmap()
	if client.Is6() {
		p, _ := client.Prefix(64)
		return p.String()
	}
	return client.String()
}

// admitUDP is the UDP mapper's Admit: the limits as for TCP.
func (s *Server) admitUDP(peer string, client netip.AddrPort) (func(), error) {
	return s.limiter.Admit(s.limitKey(peer, client.Addr()))
}
