package netstack

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// DialTCP opens a TCP connection from src, one of the gateway's own
// tunnel addresses, to dst on the client side of the tunnel: the gateway
// reaching into the tunnel (to a peer that published a service), where
// every other flow goes the other way. The stack spoofs, so src needs no
// configuration; the answers find the connection before the forwarder.
// Errors are as Client.DialTCP's.
func (s *Stack) DialTCP(ctx context.Context, src netip.Addr, dst netip.AddrPort) (net.Conn, error) {
	if s.ctx.Err() != nil {
		return nil, net.ErrClosed
	}
	if src.Unmap().Is4() != dst.Addr().Unmap().Is4() {
		return nil, fmt.Errorf("netstack: dial %s from %s: address families differ", dst, src)
	}
	from, _ := fullAddr(netip.AddrPortFrom(src, 0))
	return dialTCP(ctx, s.stack, &from, dst, peerLiveness)
}

// Liveness settings of the gateway's connections into the tunnel. A peer
// that goes away (its process killed, its laptop closed) sends no FIN or
// RST: keepalives find out for an idle connection. There is no TCP user
// timeout: gVisor enforces it even while zero-window probes are answered,
// so an origin that reads slowly for a while would lose its upload.
// Whoever dials (the edge) closes the connections of a peer it knows to be
// gone.
const (
	peerKeepaliveIdle     = 10 * time.Second
	peerKeepaliveInterval = 5 * time.Second
	peerKeepaliveCount    = 2
)

// peerLiveness arms keepalives on ep.
func peerLiveness(ep tcpip.Endpoint) {
	setKeepalive(ep, peerKeepaliveIdle, peerKeepaliveInterval, peerKeepaliveCount)
}

// setKeepalive turns TCP keepalives on for ep: after idle without
// traffic, a probe every interval, and the connection ends after count
// unanswered ones.
func setKeepalive(ep tcpip.Endpoint, idle, interval time.Duration, count int) {
	ep.SocketOptions().SetKeepAlive(true)
	i, iv := tcpip.KeepaliveIdleOption(idle), tcpip.KeepaliveIntervalOption(interval)
	ep.SetSockOpt(&i)
	ep.SetSockOpt(&iv)
	ep.SetSockOptInt(tcpip.KeepaliveCountOption, count)
}

// dialTCP connects an endpoint of st to dst, bound to from if it is not
// nil, with the options that setup, if not nil, sets. ctx bounds the
// handshake only.
func dialTCP(ctx context.Context, st *stack.Stack, from *tcpip.FullAddress, dst netip.AddrPort, setup func(tcpip.Endpoint)) (net.Conn, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	fa, proto := fullAddr(dst)
	fa.NIC = nicID
	var wq waiter.Queue
	ep, terr := st.NewEndpoint(tcp.ProtocolNumber, proto, &wq)
	if terr != nil {
		return nil, errnoOf(terr)
	}
	if setup != nil {
		setup(ep)
	}
	if from != nil {
		from.NIC = nicID
		if terr := ep.Bind(*from); terr != nil {
			ep.Close()
			return nil, os.NewSyscallError("bind", errnoOf(terr))
		}
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
