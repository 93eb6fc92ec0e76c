package gateway

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"
)

// A peer's connection to a local listener arrives with the peer's tunnel
// address as RemoteAddr, carries bytes both ways and passes half-close on.
func TestListenLocal(t *testing.T) {
	srv := startWireGuard(t)
	c := newWGClient(t, srv, 2)
	addPeer(t, srv, "agent", c, 2)

	ln, err := srv.ListenLocal(7460)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if _, err := srv.ListenLocal(7460); !errors.Is(err, syscall.EADDRINUSE) {
		t.Fatalf("second ListenLocal on the port: %v, want EADDRINUSE", err)
	}
	if _, err := srv.ListenLocal(53); err == nil {
		t.Fatal("ListenLocal(53) succeeded; the DNS port is the forwarder's")
	}

	type accepted struct {
		remote net.Addr
		got    string
		err    error
	}
	done := make(chan accepted, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			done <- accepted{err: err}
			return
		}
		defer conn.Close()
		b, err := io.ReadAll(conn) // until the peer's FIN
		if err == nil {
			_, err = conn.Write([]byte("reply after EOF"))
		}
		done <- accepted{remote: conn.RemoteAddr(), got: string(b), err: err}
	}()

	for _, gw := range []netip.Addr{gatewayV4, gatewayV6} {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		conn, err := c.DialContext(ctx, "tcp", netip.AddrPortFrom(gw, 7460).String())
		cancel()
		if err != nil {
			t.Fatalf("dial %s: %v", gw, err)
		}
		if gw == gatewayV6 {
			// Only the first is accepted; this one must still connect.
			conn.Close()
			continue
		}
		conn.Write([]byte("hello"))
		conn.(interface{ CloseWrite() error }).CloseWrite()
		conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		reply, err := io.ReadAll(conn)
		conn.Close()
		if err != nil || string(reply) != "reply after EOF" {
			t.Fatalf("reply %q, %v", reply, err)
		}
		a := <-done
		if a.err != nil {
			t.Fatal(a.err)
		}
		if a.got != "hello" {
			t.Fatalf("listener read %q", a.got)
		}
		want := netip.AddrPortFrom(peerAddrs(2)[0], 0).Addr()
		if ra, ok := a.remote.(*net.TCPAddr); !ok || ra.AddrPort().Addr() != want {
			t.Fatalf("RemoteAddr %v, want the peer's tunnel address %s", a.remote, want)
		}
		p, ok := srv.PeerByAddr(a.remote.(*net.TCPAddr).AddrPort().Addr())
		if !ok || p.Name != "agent" {
			t.Fatalf("PeerByAddr: %+v, %v", p, ok)
		}
	}

	// A port nobody listens on is reset.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.DialContext(ctx, "tcp", netip.AddrPortFrom(gatewayV4, 7461).String()); err == nil {
		t.Fatal("dial to an own port nobody listens on succeeded")
	}
	// After Close, neither.
	ln.Close()
	if _, err := ln.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept after Close: %v", err)
	}
	if _, err := c.DialContext(ctx, "tcp", netip.AddrPortFrom(gatewayV4, 7460).String()); err == nil {
		t.Fatal("dial to a closed local listener succeeded")
	}
}

// The gateway reaches a service that a peer listens on inside the tunnel,
// from its own tunnel address, over IPv4 and IPv6.
func TestDialPeer(t *testing.T) {
	srv := startWireGuard(t)
	c := newWGClient(t, srv, 3)
	addPeer(t, srv, "origin", c, 3)
	// The gateway learns a peer's endpoint from its first handshake: an
	// agent's registration in real life, a ping here.
	pctx, pcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer pcancel()
	if _, err := c.Ping(pctx, gatewayV4, 1, []byte("hi")); err != nil {
		t.Fatal(err)
	}

	for i, peerAddr := range peerAddrs(3) {
		ln, err := c.ListenTCP(netip.AddrPortFrom(peerAddr, 8080))
		if err != nil {
			t.Fatal(err)
		}
		go func() {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			defer conn.Close()
			line, _ := bufio.NewReader(conn).ReadString('\n')
			io.WriteString(conn, conn.RemoteAddr().String()+" "+line)
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		conn, err := srv.DialPeer(ctx, netip.AddrPortFrom(peerAddr, 8080))
		cancel()
		if err != nil {
			t.Fatalf("DialPeer %s: %v", peerAddr, err)
		}
		io.WriteString(conn, "ping\n")
		conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		got, err := bufio.NewReader(conn).ReadString('\n')
		conn.Close()
		ln.Close()
		if err != nil {
			t.Fatal(err)
		}
		from := []netip.Addr{gatewayV4, gatewayV6}[i]
		ap, perr := netip.ParseAddrPort(got[:len(got)-len(" ping\n")])
		if perr != nil || ap.Addr() != from {
			t.Fatalf("the peer saw %q, want a connection from %s", got, from)
		}
	}

	// Only peers' addresses are dialled.
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if _, err := srv.DialPeer(ctx, netip.MustParseAddrPort("127.0.0.1:80")); err == nil {
		t.Fatal("DialPeer to a non-peer address succeeded")
	}
	// A peer's port nobody listens on is refused.
	ctx2, cancel2 := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel2()
	if _, err := srv.DialPeer(ctx2, netip.AddrPortFrom(peerAddrs(3)[0], 8081)); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("DialPeer to a closed port: %v, want ECONNREFUSED", err)
	}
}
