package gateway

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/sluice-vpn/sluice/nat"
	"github.com/sluice-vpn/sluice/netstack/netstacktest"
	"github.com/sluice-vpn/sluice/tunnel/wireguard"
)

var (
	gatewayV4 = netip.MustParseAddr("100.96.0.1")
	gatewayV6 = netip.MustParseAddr("fd5c:1ce::1")
	dnsName   = "sluice.test."
	dnsAnswer = netip.MustParseAddr("192.0.2.99")
)

// startWireGuard starts a WireGuard gateway on a free loopback port, with
// a DNS upstream of its own on loopback.
func startWireGuard(t *testing.T) *Server { return startWireGuardB(t) }

func startWireGuardB(t testing.TB) *Server {
	t.Helper()
	key, err := wireguard.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	srv, err := New(Options{
		WireGuard:    &WireGuardOptions{PrivateKey: key},
		Addrs:        []netip.Addr{gatewayV4, gatewayV6},
		DNSUpstreams: []netip.AddrPort{startDNSServer(t)},
		Egress:       nat.EgressOptions{Ports: slice, DialTimeout: time.Second},
		Policy:       nat.PolicyOptions{Allow: loopback},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return srv
}

// wgClient is a real wireguard-go device whose TUN side is a client
// stack, talking to the gateway over UDP on loopback.
type wgClient struct {
	*netstacktest.Client
	key wireguard.Key
	dev *wireguard.Device
}

func newWGClient(t *testing.T, srv *Server, n byte) *wgClient { return newWGClientB(t, srv, n) }

func newWGClientB(t testing.TB, srv *Server, n byte) *wgClient {
	t.Helper()
	key, err := wireguard.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	addrs := peerAddrs(n)
	stack, err := netstacktest.NewClient(addrs, 1420)
	if err != nil {
		t.Fatal(err)
	}
	dev, err := wireguard.New(stack, wireguard.Options{
		PrivateKey: key,
		Peers: []wireguard.Peer{{
			PublicKey:  srv.PublicKey(),
			Endpoint:   netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(srv.ListenPort())),
			AllowedIPs: []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")},
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dev.Close() })
	return &wgClient{Client: stack, key: key, dev: dev}
}

func peerAddrs(n byte) []netip.Addr {
	return []netip.Addr{netip.AddrFrom4([4]byte{100, 96, 0, n}), netip.MustParseAddr("fd5c:1ce::" + string("0123456789"[n]))}
}

func addPeer(t *testing.T, srv *Server, name string, c *wgClient, n byte) {
	t.Helper()
	if err := srv.AddPeer(Peer{Name: name, PublicKey: c.key.PublicKey(), Addrs: peerAddrs(n)}); err != nil {
		t.Fatal(err)
	}
}

func get(t *testing.T, c *wgClient, url string, timeout time.Duration) ([]byte, error) {
	t.Helper()
	hc := &http.Client{Transport: &http.Transport{DialContext: c.DialContext, DisableKeepAlives: true}, Timeout: timeout}
	resp, err := hc.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	return io.ReadAll(resp.Body)
}

func TestWireGuardPeers(t *testing.T) {
	srv := startWireGuard(t)
	body := bytes.Repeat([]byte("wireguard"), 1<<20/9+1)[:1<<20]
	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write(body) }))
	defer web.Close()

	alice := newWGClient(t, srv, 2)
	bob := newWGClient(t, srv, 3)
	addPeer(t, srv, "alice", alice, 2)
	addPeer(t, srv, "bob", bob, 3)

	t.Run("HTTP", func(t *testing.T) {
		got, err := get(t, alice, web.URL, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if sha256.Sum256(got) != sha256.Sum256(body) {
			t.Fatalf("got %d bytes, want the same %d", len(got), len(body))
		}
		peers, err := srv.Peers()
		if err != nil || len(peers) != 2 || peers[0].Name != "alice" || peers[0].LastHandshake.IsZero() || peers[0].RxBytes == 0 {
			t.Fatalf("peers: %+v %v", peers, err)
		}
	})

	t.Run("FlowsBelongToPeers", func(t *testing.T) {
		events, cancel := srv.Table().Subscribe(8)
		defer cancel()
		if _, err := get(t, bob, web.URL, 10*time.Second); err != nil {
			t.Fatal(err)
		}
		for ev := range events {
			if ev.Type == nat.EventNew && ev.Entry.Key.Client.Addr() == peerAddrs(3)[0] {
				if ev.Entry.Peer != "bob" {
					t.Fatalf("flow %+v, want it to belong to bob", ev.Entry)
				}
				return
			}
		}
	})

	t.Run("UDP", func(t *testing.T) {
		pc, err := net.ListenUDP("udp6", &net.UDPAddr{IP: net.IPv6loopback})
		if err != nil {
			t.Skip("no IPv6 loopback")
		}
		defer pc.Close()
		go func() {
			buf := make([]byte, 2048)
			for {
				n, from, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				pc.WriteTo(buf[:n], from)
			}
		}()
		c, err := alice.DialContext(context.Background(), "udp", pc.LocalAddr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		c.Write([]byte("over wireguard, v6"))
		buf := make([]byte, 64)
		n, err := c.Read(buf)
		if err != nil || string(buf[:n]) != "over wireguard, v6" {
			t.Fatalf("echo: %q %v", buf[:n], err)
		}
	})

	t.Run("Ping", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		// The gateway answers for its own address...
		if _, err := alice.Ping(ctx, gatewayV4, 1, []byte("gw")); err != nil {
			t.Fatalf("ping the gateway: %v", err)
		}
		// ...and passes other pings on.
		reply, err := alice.Ping(ctx, netip.MustParseAddr("127.0.0.1"), 2, []byte("lo"))
		if errors.Is(err, netstacktest.ErrNoReply) && os.Geteuid() != 0 {
			t.Skip("ping through the gateway needs ICMP sockets (ping_group_range) or raw sockets; this user has neither")
		}
		if err != nil || string(reply) != "lo" {
			t.Fatalf("ping 127.0.0.1: %q %v", reply, err)
		}
	})

	t.Run("DNS", func(t *testing.T) {
		for _, network := range []string{"udp", "tcp"} {
			for _, gw := range []netip.Addr{gatewayV4, gatewayV6} {
				got, err := lookup(alice, network, netip.AddrPortFrom(gw, 53))
				if err != nil || got != dnsAnswer {
					t.Errorf("DNS over %s to %s: %v %v", network, gw, got, err)
				}
			}
		}
		if st := srv.Stats().DNS; st.Answered < 2 {
			t.Errorf("DNS stats %+v", st)
		}
	})

	t.Run("PeersCannotReachEachOther", func(t *testing.T) {
		ln, err := alice.ListenTCP(netip.AddrPortFrom(peerAddrs(2)[0], 8080))
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		accepted := make(chan struct{}, 1)
		go func() {
			if c, err := ln.Accept(); err == nil {
				accepted <- struct{}{}
				c.Close()
			}
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		if _, err := bob.DialContext(ctx, "tcp", "100.96.0.2:8080"); err == nil {
			t.Fatal("bob reached alice")
		}
		select {
		case <-accepted:
			t.Fatal("alice's listener accepted a connection from bob")
		case <-time.After(100 * time.Millisecond):
		}
	})

	t.Run("UnknownKeyGetsNothing", func(t *testing.T) {
		mallory := newWGClient(t, srv, 4)
		if _, err := get(t, mallory, web.URL, 2*time.Second); err == nil {
			t.Fatal("a client with an unknown key was served")
		}
	})

	t.Run("RemovedPeerLosesAccess", func(t *testing.T) {
		// An open connection of alice's, to see it cut.
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			if c, err := ln.Accept(); err == nil {
				io.Copy(io.Discard, c)
				c.Close()
			}
		}()
		open, err := alice.DialContext(context.Background(), "tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer open.Close()

		if err := srv.RemovePeer("alice"); err != nil {
			t.Fatal(err)
		}
		for _, e := range srv.Table().Snapshot() {
			if e.Peer == "alice" {
				t.Errorf("alice's flow %v outlived her removal", e.Key)
			}
		}
		if _, err := get(t, alice, web.URL, 2*time.Second); err == nil {
			t.Fatal("a removed peer was served")
		}
		if got, err := get(t, bob, web.URL, 10*time.Second); err != nil || len(got) != len(body) {
			t.Fatalf("bob after alice's removal: %d bytes, %v", len(got), err)
		}
	})
}

// lookup asks the DNS server at server, through c, for dnsName's A record.
func lookup(c *wgClient, network string, server netip.AddrPort) (netip.Addr, error) {
	q, err := (&dnsmessage.Message{
		Header:    dnsmessage.Header{ID: 0x5c1e, RecursionDesired: true},
		Questions: []dnsmessage.Question{{Name: dnsmessage.MustNewName(dnsName), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}},
	}).Pack()
	if err != nil {
		return netip.Addr{}, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := c.DialContext(ctx, network, server.String())
	if err != nil {
		return netip.Addr{}, err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 1500)
	var n int
	if network == "tcp" {
		conn.Write(append([]byte{byte(len(q) >> 8), byte(len(q))}, q...))
		if _, err = io.ReadFull(conn, buf[:2]); err == nil {
			n = int(buf[0])<<8 | int(buf[1])
			_, err = io.ReadFull(conn, buf[:n])
		}
	} else {
		conn.Write(q)
		n, err = conn.Read(buf)
	}
	if err != nil {
		return netip.Addr{}, err
	}
	var m dnsmessage.Message
	if err := m.Unpack(buf[:n]); err != nil {
		return netip.Addr{}, err
	}
	if m.ID != 0x5c1e || len(m.Answers) != 1 {
		return netip.Addr{}, errors.New("unexpected answer")
	}
	a, ok := m.Answers[0].Body.(*dnsmessage.AResource)
	if !ok {
		return netip.Addr{}, errors.New("not an A record")
	}
	return netip.AddrFrom4(a.A), nil
}

// startDNSServer answers A queries for dnsName over UDP and TCP on a
// loopback port, and REFUSED to anything else.
func startDNSServer(t testing.TB) netip.AddrPort {
	t.Helper()
	// UDP and TCP on one port: the UDP port is free, but its TCP twin
	// may be another socket's ephemeral port, so try a few.
	var (
		pc   net.PacketConn
		ln   net.Listener
		addr netip.AddrPort
	)
	for try := 0; ; try++ {
		var err error
		if pc, err = net.ListenPacket("udp4", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
		addr = netip.MustParseAddrPort(pc.LocalAddr().String())
		if ln, err = net.Listen("tcp4", addr.String()); err == nil {
			break
		}
		pc.Close()
		if try == 20 {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() { pc.Close(); ln.Close() })
	answer := func(q []byte) []byte {
		var m dnsmessage.Message
		if err := m.Unpack(q); err != nil || len(m.Questions) != 1 {
			return nil
		}
		m.Response = true
		if m.Questions[0].Name.String() == dnsName && m.Questions[0].Type == dnsmessage.TypeA {
			m.Answers = []dnsmessage.Resource{{
				Header: dnsmessage.ResourceHeader{Name: m.Questions[0].Name, Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET, TTL: 60},
				Body:   &dnsmessage.AResource{A: dnsAnswer.As4()},
			}}
		} else {
			m.RCode = dnsmessage.RCodeRefused
		}
		b, _ := m.Pack()
		return b
	}
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			if a := answer(buf[:n]); a != nil {
				pc.WriteTo(a, from)
			}
		}
	}()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				hdr := make([]byte, 2)
				if _, err := io.ReadFull(c, hdr); err != nil {
					return
				}
				q := make([]byte, int(hdr[0])<<8|int(hdr[1]))
				if _, err := io.ReadFull(c, q); err != nil {
					return
				}
				a := answer(q)
				c.Write(append([]byte{byte(len(a) >> 8), byte(len(a))}, a...))
			}()
		}
	}()
	return addr
}

// TestWireGuardRoaming moves a client to another UDP port in the middle of
// a TCP connection: the gateway follows the new endpoint and the flow
// carries on.
func TestWireGuardRoaming(t *testing.T) {
	srv := startWireGuard(t)
	alice := newWGClient(t, srv, 2)
	addPeer(t, srv, "alice", alice, 2)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		if c, err := ln.Accept(); err == nil {
			io.Copy(c, c)
			c.Close()
		}
	}()
	c, err := alice.DialContext(context.Background(), "tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	echo := func(msg string) {
		t.Helper()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, len(msg))
		if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
			t.Fatalf("echo %q: got %q, %v", msg, buf, err)
		}
	}
	endpoint := func() netip.AddrPort {
		peers, err := srv.Peers()
		if err != nil || len(peers) != 1 {
			t.Fatalf("peers: %+v %v", peers, err)
		}
		return peers[0].Endpoint
	}

	echo("before")
	before := endpoint()
	if err := alice.dev.SetListenPort(0); err != nil {
		t.Fatal(err)
	}
	echo("after the move")
	after := endpoint()
	if after == before || after.Port() != uint16(alice.dev.ListenPort()) {
		t.Fatalf("endpoint %v -> %v; the client now listens on %d", before, after, alice.dev.ListenPort())
	}
	if n := srv.Table().Len(); n != 1 {
		t.Fatalf("%d flows; the roaming client's flow should be the only one", n)
	}
}
