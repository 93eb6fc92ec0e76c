package proxy

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// UDP ASSOCIATE limits: names resolved per association before the cache
// starts over, and how long one resolution may take.
const (
	maxCachedNames = 64
	resolveTimeout = 5 * time.Second
)

// association is one UDP ASSOCIATE: a relay socket on the proxy's address
// that the client sends datagrams with SOCKS headers to, and an
// unconnected socket of the Dialer's that carries them on. It lasts as
// long as its control connection, or until it is idle for UDPIdleTimeout.
type association struct {
	s        *SOCKS5Server
	control  net.Conn
	relay    *net.UDPConn   // the client's side
	out      net.PacketConn // the Dialer's side
	clientIP netip.Addr     // datagrams come from the control connection's host...
	fixPort  uint16         // ...and from this port, if the request named one

	client     atomic.Pointer[netip.AddrPort] // where replies go: the first sender
	lastActive atomic.Int64                   // unix nanoseconds
	names      map[string]netip.Addr          // resolved names; used by the client-side loop only
}

func (s *SOCKS5Server) associate(c net.Conn, req socksRequest) {
	local, _ := c.LocalAddr().(*net.TCPAddr)
	remote, _ := c.RemoteAddr().(*net.TCPAddr)
	if local == nil || remote == nil {
		writeReply(c, replyGeneralFailure, nil)
		return
	}
	// The relay listens where the client reached the proxy: on loopback
	// for a proxy on loopback.
	relayConn, err := net.ListenUDP("udp", &net.UDPAddr{IP: local.IP, Zone: local.Zone})
	if err != nil {
		s.log.Debug("UDP ASSOCIATE: no relay socket", zap.Error(err))
		writeReply(c, replyGeneralFailure, nil)
		return
	}
	out, err := s.packets.ListenPacket("udp", ":0")
	if err != nil {
		relayConn.Close()
		s.log.Debug("UDP ASSOCIATE: no outgoing socket", zap.Error(err))
		writeReply(c, replyCode(err), nil)
		return
	}
	a := &association{
		s:        s,
		control:  c,
		relay:    relayConn,
		out:      out,
		clientIP: remote.AddrPort().Addr().Unmap(),
		names:    make(map[string]netip.Addr),
	}
	if ip, err := netip.ParseAddr(req.host); err == nil && req.port != 0 && !ip.IsUnspecified() {
		a.fixPort = req.port
	}
	if !s.srv.track(relayConn) {
		relayConn.Close()
		out.Close()
		return
	}
	defer s.srv.untrack(relayConn)
	if !s.srv.track(out) {
		relayConn.Close()
		out.Close()
		return
	}
	defer s.srv.untrack(out)
	if err := writeReply(c, replySucceeded, relayConn.LocalAddr()); err != nil {
		relayConn.Close()
		out.Close()
		return
	}
	c.SetDeadline(time.Time{})
	a.run()
}

// run relays until the control connection ends or the association is
// idle too long, then closes all three sockets.
func (a *association) run() {
	a.touch()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		a.fromClient()
	}()
	go func() {
		defer wg.Done()
		a.toClient()
	}()
	// The client never sends on the control connection; a read returns
	// when it closes it.
	ended := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		io.Copy(io.Discard, a.control)
		close(ended)
	}()
	check := time.NewTicker(max(a.s.udpIdle/4, 10*time.Millisecond))
	defer check.Stop()
	for waiting := true; waiting; {
		select {
		case <-ended:
			waiting = false
		case <-check.C:
			if time.Since(time.Unix(0, a.lastActive.Load())) > a.s.udpIdle {
				a.s.log.Debug("UDP association idle; ending it", zap.Stringer("client", a.control.RemoteAddr()))
				waiting = false
			}
		}
	}
	a.control.Close()
	a.relay.Close()
	a.out.Close()
	wg.Wait()
}

func (a *association) touch() { a.lastActive.Store(time.Now().UnixNano()) }

// fromClient carries the client's datagrams out: it strips the SOCKS
// header and sends the payload to the destination it names.
func (a *association) fromClient() {
	buf := make([]byte, 65535)
	for {
		n, from, err := a.relay.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
		if from.Addr() != a.clientIP || a.fixPort != 0 && from.Port() != a.fixPort {
			continue // not the client's
		}
		if known := a.client.Load(); known == nil {
			a.client.Store(&from)
		} else if *known != from {
			continue
		}
		dst, payload, err := a.parse(buf[:n])
		if err != nil {
			continue
		}
		a.touch()
		a.out.WriteTo(payload, net.UDPAddrFromAddrPort(dst))
	}
}

// parse reads RSV FRAG ATYP DST.ADDR DST.PORT DATA and resolves a name.
// Fragments are dropped, as RFC 1928 allows.
func (a *association) parse(b []byte) (netip.AddrPort, []byte, error) {
	if len(b) < 4 || b[0] != 0 || b[1] != 0 {
		return netip.AddrPort{}, nil, errors.New("short or malformed header")
	}
	if b[2] != 0 {
		return netip.AddrPort{}, nil, errors.New("fragment")
	}
	r := bytes.NewReader(b[4:])
	host, port, err := readAddr(r, b[3])
	if err != nil {
		return netip.AddrPort{}, nil, err
	}
	payload := b[len(b)-r.Len():]
	if ip, err := netip.ParseAddr(host); err == nil {
		return netip.AddrPortFrom(ip, port), payload, nil
	}
	ip, ok := a.names[host]
	if !ok {
		ctx, cancel := context.WithTimeout(a.s.srv.ctx, resolveTimeout)
		addrs, err := a.s.packets.LookupNetIP(ctx, "ip", host)
		cancel()
		if err != nil || len(addrs) == 0 {
			return netip.AddrPort{}, nil, errors.New("cannot resolve " + host)
		}
		if len(a.names) >= maxCachedNames {
			clear(a.names)
		}
		ip = addrs[0].Unmap()
		a.names[host] = ip
	}
	return netip.AddrPortFrom(ip, port), payload, nil
}

// headerRoom is the longest header toClient puts in front of a payload:
// RSV FRAG ATYP, an IPv6 address and a port.
const headerRoom = 3 + 1 + 16 + 2

// toClient carries datagrams back to the client, each with a header that
// names its source.
func (a *association) toClient() {
	buf := make([]byte, headerRoom+65535)
	for {
		n, from, err := a.out.ReadFrom(buf[headerRoom:])
		if err != nil {
			return
		}
		ua, ok := from.(*net.UDPAddr)
		client := a.client.Load()
		if !ok || client == nil {
			continue
		}
		a.touch()
		hdr := appendAddr([]byte{0, 0, 0}, ua.AddrPort())
		start := headerRoom - len(hdr)
		copy(buf[start:], hdr)
		a.relay.WriteToUDPAddrPort(buf[start:headerRoom+n], *client)
	}
}
