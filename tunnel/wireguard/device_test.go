package wireguard

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-vpn/sluice/tunnel/memtun"
	"golang.zx2c4.com/wireguard/conn"
)

// These tests run real wireguard-go devices that talk UDP over loopback
// only: every client's peer endpoint is 127.0.0.1. The TUN side of each
// device is a memtun pair whose far end the test writes and reads.

const (
	// deliverTimeout bounds how long a packet that must arrive may take,
	// handshake included; on loopback it takes milliseconds.
	deliverTimeout = 3 * time.Second
	// silence is how long a packet that must not arrive is waited for. Each
	// such check runs next to one that shows the same path delivers well
	// within this time.
	silence = 300 * time.Millisecond
)

var (
	clientAddr4 = netip.MustParseAddr("100.96.0.2")
	clientAddr6 = netip.MustParseAddr("fd5c:1ce::2")
	spoofAddr4  = netip.MustParseAddr("100.96.0.3")
	// remote is where client packets are addressed; the gateway's netstack
	// would terminate them, here the test reads them off the server's tun.
	remote4 = netip.MustParseAddrPort("198.51.100.7:53")
	remote6 = netip.MustParseAddrPort("[2001:db8::7]:53")
)

// node is a Device plus the far end of its tun, whose packets a goroutine
// collects into pkts.
type node struct {
	dev  *Device
	far  *memtun.Device
	pkts chan []byte
}

func genKey(t *testing.T) Key {
	t.Helper()
	k, err := GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func newNode(t *testing.T, opts Options) *node {
	t.Helper()
	near, far, err := memtun.NewPair(memtun.Options{})
	if err != nil {
		t.Fatal(err)
	}
	dev, err := New(near, opts)
	if err != nil {
		far.Close()
		t.Fatal(err)
	}
	n := &node{dev: dev, far: far, pkts: make(chan []byte, 256)}
	var wg sync.WaitGroup
	wg.Go(func() {
		bufs := make([][]byte, far.BatchSize())
		for i := range bufs {
			bufs[i] = make([]byte, memtun.MaxPacketSize)
		}
		sizes := make([]int, len(bufs))
		for {
			count, err := far.Read(bufs, sizes, 0)
			for i := range count {
				n.pkts <- bytes.Clone(bufs[i][:sizes[i]])
			}
			if err != nil {
				return
			}
		}
	})
	t.Cleanup(func() {
		// Closing the device closes near, which ends far's reads.
		if err := dev.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		far.Close()
		wg.Wait()
	})
	return n
}

// send writes an IP packet into the tun as the host behind the device would.
func (n *node) send(t *testing.T, pkt []byte) {
	t.Helper()
	if _, err := n.far.Write([][]byte{pkt}, 0); err != nil {
		t.Fatalf("write to tun: %v", err)
	}
}

func (n *node) expect(t *testing.T, want []byte) {
	t.Helper()
	select {
	case got := <-n.pkts:
		if !bytes.Equal(got, want) {
			t.Fatalf("received the wrong packet:\n got %x\nwant %x", got, want)
		}
	case <-time.After(deliverTimeout):
		t.Fatalf("packet not delivered within %v", deliverTimeout)
	}
}

func (n *node) expectNothing(t *testing.T) {
	t.Helper()
	select {
	case got := <-n.pkts:
		t.Fatalf("unexpected packet delivered: %x", got)
	case <-time.After(silence):
	}
}

func (n *node) stats(t *testing.T, pub Key) PeerStats {
	t.Helper()
	peers, err := n.dev.Peers()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range peers {
		if p.PublicKey == pub {
			return p
		}
	}
	t.Fatalf("peer %s not in Peers()", pub.short())
	return PeerStats{}
}

func loopback(port int) netip.AddrPort {
	return netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(port))
}

// newServer starts a server device with the given client peers.
func newServer(t *testing.T, peers ...Peer) (*node, Key) {
	t.Helper()
	priv := genKey(t)
	return newNode(t, Options{PrivateKey: priv, Peers: peers}), priv.PublicKey()
}

// newClient starts a client device whose only peer is the server, routing
// everything to it.
func newClient(t *testing.T, priv, serverPub Key, serverPort int, psk Key) *node {
	t.Helper()
	return newNode(t, Options{
		PrivateKey: priv,
		Peers: []Peer{{
			PublicKey:    serverPub,
			PresharedKey: psk,
			Endpoint:     loopback(serverPort),
			AllowedIPs:   prefixes(t, "0.0.0.0/0", "::/0"),
		}},
	})
}

func clientPeer(pub Key, psk Key, addrs ...string) Peer {
	p := Peer{PublicKey: pub, PresharedKey: psk}
	for _, a := range addrs {
		p.AllowedIPs = append(p.AllowedIPs, netip.MustParsePrefix(a))
	}
	return p
}

func TestDeviceDeliversAndDropsSpoofed(t *testing.T) {
	t.Parallel()
	start := time.Now()
	clientPriv := genKey(t)
	server, serverPub := newServer(t, clientPeer(clientPriv.PublicKey(), Key{}, "100.96.0.2/32", "fd5c:1ce::2/128"))
	client := newClient(t, clientPriv, serverPub, server.dev.ListenPort(), Key{})
	if server.dev.ListenPort() == 0 || server.dev.ListenPort() == client.dev.ListenPort() {
		t.Fatalf("listen ports: server %d, client %d", server.dev.ListenPort(), client.dev.ListenPort())
	}

	spoofed := udpPacket(netip.AddrPortFrom(spoofAddr4, 4000), remote4, []byte("spoofed"))
	good4 := udpPacket(netip.AddrPortFrom(clientAddr4, 4000), remote4, []byte("hello over v4"))
	good6 := udpPacket(netip.AddrPortFrom(clientAddr6, 4000), remote6, []byte("hello over v6"))
	// All three go through the same session in order; the spoofed one is
	// the only one the server may drop.
	client.send(t, spoofed)
	client.send(t, good4)
	client.send(t, good6)
	server.expect(t, good4)
	server.expect(t, good6)
	server.expectNothing(t)

	// The reply is routed back to the client by its AllowedIPs.
	reply := udpPacket(remote4, netip.AddrPortFrom(clientAddr4, 4000), []byte("reply"))
	server.send(t, reply)
	client.expect(t, reply)
	// A packet for an address no peer holds goes nowhere.
	server.send(t, udpPacket(remote4, netip.AddrPortFrom(spoofAddr4, 4000), []byte("nobody")))
	client.expectNothing(t)

	st := server.stats(t, clientPriv.PublicKey())
	if st.Endpoint != loopback(client.dev.ListenPort()) {
		t.Errorf("server sees client at %v, want %v", st.Endpoint, loopback(client.dev.ListenPort()))
	}
	if st.LastHandshake.Before(start.Add(-time.Second)) || st.LastHandshake.After(time.Now()) {
		t.Errorf("server's LastHandshake %v is not during the test (started %v)", st.LastHandshake, start)
	}
	// Received: handshake initiation plus three data packets, each larger
	// than its plaintext; sent: the handshake response and the reply.
	if min := uint64(len(spoofed) + len(good4) + len(good6)); st.RxBytes < min {
		t.Errorf("server RxBytes %d < %d", st.RxBytes, min)
	}
	if st.TxBytes < uint64(len(reply)) {
		t.Errorf("server TxBytes %d < %d", st.TxBytes, len(reply))
	}
	if want := prefixes(t, "100.96.0.2/32", "fd5c:1ce::2/128"); fmt.Sprint(st.AllowedIPs) != fmt.Sprint(want) {
		t.Errorf("server AllowedIPs %v, want %v", st.AllowedIPs, want)
	}
	cst := client.stats(t, serverPub)
	if cst.Endpoint != loopback(server.dev.ListenPort()) || cst.LastHandshake.IsZero() || cst.TxBytes < st.RxBytes {
		t.Errorf("client's view of the server: %+v (server received %d bytes)", cst, st.RxBytes)
	}
}

func TestDevicePresharedKey(t *testing.T) {
	t.Parallel()
	psk1, err := GeneratePresharedKey()
	if err != nil {
		t.Fatal(err)
	}
	psk2, err := GeneratePresharedKey()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name                 string
		serverPSK, clientPSK Key
		works                bool
	}{
		{"same", psk1, psk1, true},
		{"different", psk1, psk2, false},
		{"client only", Key{}, psk1, false},
		{"server only", psk1, Key{}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			clientPriv := genKey(t)
			server, serverPub := newServer(t, clientPeer(clientPriv.PublicKey(), tc.serverPSK, "100.96.0.2/32"))
			client := newClient(t, clientPriv, serverPub, server.dev.ListenPort(), tc.clientPSK)
			pkt := udpPacket(netip.AddrPortFrom(clientAddr4, 4000), remote4, []byte(tc.name))
			client.send(t, pkt)
			if tc.works {
				server.expect(t, pkt)
				return
			}
			server.expectNothing(t)
			if st := client.stats(t, serverPub); !st.LastHandshake.IsZero() {
				t.Errorf("client completed a handshake at %v with a mismatched preshared key", st.LastHandshake)
			}
		})
	}
}

func TestDeviceUnknownClient(t *testing.T) {
	t.Parallel()
	known, stranger := genKey(t), genKey(t)
	server, serverPub := newServer(t, clientPeer(known.PublicKey(), Key{}, "100.96.0.2/32"))
	client := newClient(t, stranger, serverPub, server.dev.ListenPort(), Key{})
	client.send(t, udpPacket(netip.AddrPortFrom(clientAddr4, 4000), remote4, []byte("let me in")))
	server.expectNothing(t)
	if st := client.stats(t, serverPub); !st.LastHandshake.IsZero() || st.RxBytes != 0 {
		t.Errorf("unknown client got an answer: %+v", st)
	}
	if st := server.stats(t, known.PublicKey()); st.RxBytes != 0 {
		t.Errorf("stranger's traffic counted for the known peer: %+v", st)
	}

	// Control: the known key gets through the same server.
	friend := newClient(t, known, serverPub, server.dev.ListenPort(), Key{})
	pkt := udpPacket(netip.AddrPortFrom(clientAddr4, 4000), remote4, []byte("friend"))
	friend.send(t, pkt)
	server.expect(t, pkt)
}

func TestDeviceRemoveAndReplacePeer(t *testing.T) {
	t.Parallel()
	priv1, priv2 := genKey(t), genKey(t)
	server, serverPub := newServer(t)
	port := server.dev.ListenPort()
	if err := server.dev.AddPeer(clientPeer(priv1.PublicKey(), Key{}, "100.96.0.2/32")); err != nil {
		t.Fatal(err)
	}
	if err := server.dev.AddPeer(clientPeer(priv2.PublicKey(), Key{}, "100.96.0.4/32")); err != nil {
		t.Fatal(err)
	}
	c1 := newClient(t, priv1, serverPub, port, Key{})
	c2 := newClient(t, priv2, serverPub, port, Key{})
	from := func(addr string, payload string) []byte {
		return udpPacket(netip.AddrPortFrom(netip.MustParseAddr(addr), 4000), remote4, []byte(payload))
	}
	p := from("100.96.0.2", "c1 first")
	c1.send(t, p)
	server.expect(t, p)
	p = from("100.96.0.4", "c2 first")
	c2.send(t, p)
	server.expect(t, p)
	hs2 := server.stats(t, priv2.PublicKey()).LastHandshake

	if err := server.dev.RemovePeer(priv1.PublicKey()); err != nil {
		t.Fatal(err)
	}
	c1.send(t, from("100.96.0.2", "c1 after removal"))
	p = from("100.96.0.4", "c2 after removal")
	c2.send(t, p)
	server.expect(t, p)
	server.expectNothing(t)

	err := server.dev.RemovePeer(priv1.PublicKey())
	if err == nil || !strings.Contains(err.Error(), "no such peer") {
		t.Errorf("second RemovePeer: %v, want a no-such-peer error", err)
	}

	// Replacing c2's configuration moves its address without a new
	// handshake.
	if err := server.dev.AddPeer(clientPeer(priv2.PublicKey(), Key{}, "100.96.0.5/32")); err != nil {
		t.Fatal(err)
	}
	c2.send(t, from("100.96.0.4", "old address"))
	p = from("100.96.0.5", "new address")
	c2.send(t, p)
	server.expect(t, p)
	server.expectNothing(t)
	if hs := server.stats(t, priv2.PublicKey()).LastHandshake; !hs.Equal(hs2) {
		t.Errorf("replacing c2's config redid its handshake: %v, was %v", hs, hs2)
	}
	peers, err := server.dev.Peers()
	if err != nil {
		t.Fatal(err)
	}
	if len(peers) != 1 || peers[0].PublicKey != priv2.PublicKey() || fmt.Sprint(peers[0].AllowedIPs) != "[100.96.0.5/32]" {
		t.Errorf("Peers() after remove and replace: %+v", peers)
	}
	// The address c2 gave up is free for another peer.
	if err := server.dev.AddPeer(clientPeer(priv1.PublicKey(), Key{}, "100.96.0.4/32")); err != nil {
		t.Errorf("re-adding a peer on a freed address: %v", err)
	}
}

func TestDeviceManyPeers(t *testing.T) {
	t.Parallel()
	server, _ := newServer(t)
	const n = 300
	keys := make(map[Key]bool, n)
	start := time.Now()
	for i := range n {
		pub := genKey(t).PublicKey()
		keys[pub] = true
		p := clientPeer(pub, Key{},
			fmt.Sprintf("100.97.%d.%d/32", i/256, i%256),
			fmt.Sprintf("fd5c:1ce::1:%x/128", i))
		if err := server.dev.AddPeer(p); err != nil {
			t.Fatalf("peer %d: %v", i, err)
		}
	}
	elapsed := time.Since(start)
	t.Logf("AddPeer × %d: %v", n, elapsed)
	if elapsed > 5*time.Second {
		t.Errorf("adding %d peers took %v", n, elapsed)
	}
	peers, err := server.dev.Peers()
	if err != nil {
		t.Fatal(err)
	}
	if len(peers) != n {
		t.Fatalf("Peers() lists %d peers, want %d", len(peers), n)
	}
	for i, p := range peers {
		if !keys[p.PublicKey] {
			t.Fatalf("Peers() lists unknown key %s", p.PublicKey.short())
		}
		delete(keys, p.PublicKey)
		if len(p.AllowedIPs) != 2 {
			t.Fatalf("peer %s has AllowedIPs %v", p.PublicKey.short(), p.AllowedIPs)
		}
		if i > 0 && bytes.Compare(peers[i-1].PublicKey[:], p.PublicKey[:]) >= 0 {
			t.Fatal("Peers() is not ordered by public key")
		}
	}
}

func TestDeviceAddPeerErrors(t *testing.T) {
	serverPriv := genKey(t)
	server := newNode(t, Options{PrivateKey: serverPriv})
	owner := genKey(t).PublicKey()
	if err := server.dev.AddPeer(clientPeer(owner, Key{}, "100.96.0.2/32")); err != nil {
		t.Fatal(err)
	}
	other := genKey(t).PublicKey()
	for _, tc := range []struct {
		name string
		peer Peer
		want string
	}{
		{"no key", Peer{}, "PublicKey is required"},
		{"own key", Peer{PublicKey: serverPriv.PublicKey()}, "PublicKey is the device's own public key"},
		{"invalid prefix", Peer{PublicKey: other, AllowedIPs: []netip.Prefix{{}}}, "AllowedIPs[0] is not a valid prefix"},
		{"duplicate prefix", clientPeer(other, Key{}, "10.0.0.1/32", "10.0.0.1/32"), "AllowedIPs[1]: 10.0.0.1/32 is listed twice"},
		{"taken prefix", clientPeer(other, Key{}, "100.96.0.2/32"), "AllowedIPs[0]: 100.96.0.2/32 already belongs to peer " + owner.short()},
		{"endpoint port", Peer{PublicKey: other, Endpoint: loopback(0)}, "Endpoint 127.0.0.1:0 is not a usable address and port"},
		{"endpoint unspecified", Peer{PublicKey: other, Endpoint: netip.MustParseAddrPort("0.0.0.0:51820")}, "is not a usable address"},
		{"keepalive fraction", Peer{PublicKey: other, PersistentKeepalive: 1500 * time.Millisecond}, "PersistentKeepalive 1.5s is not a whole number of seconds"},
		{"keepalive range", Peer{PublicKey: other, PersistentKeepalive: 20 * time.Hour}, "PersistentKeepalive 20h0m0s out of range"},
		{"keepalive negative", Peer{PublicKey: other, PersistentKeepalive: -time.Second}, "out of range"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := server.dev.AddPeer(tc.peer)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("AddPeer: %v, want error containing %q", err, tc.want)
			}
		})
	}
	// None of the failures touched the device.
	peers, err := server.dev.Peers()
	if err != nil {
		t.Fatal(err)
	}
	if len(peers) != 1 || peers[0].PublicKey != owner {
		t.Errorf("Peers() after failed AddPeers: %+v", peers)
	}
	// A valid peer with keepalive and endpoint is accepted and reported.
	ep := loopback(9) // never answered: nothing listens on it
	if err := server.dev.AddPeer(Peer{PublicKey: other, Endpoint: ep, PersistentKeepalive: 25 * time.Second}); err != nil {
		t.Fatal(err)
	}
	if st := server.stats(t, other); st.Endpoint != ep {
		t.Errorf("endpoint %v, want %v", st.Endpoint, ep)
	}
}

// closedTun reports whether the far end of a memtun pair sees its peer closed.
func closedTun(far *memtun.Device) bool {
	done := make(chan error, 1)
	go func() {
		bufs, sizes := [][]byte{make([]byte, 2048)}, []int{0}
		_, err := far.Read(bufs, sizes, 0)
		done <- err
	}()
	select {
	case err := <-done:
		return errors.Is(err, os.ErrClosed)
	case <-time.After(2 * time.Second):
		far.Close() // unblocks the reader
		return false
	}
}

func TestNewErrors(t *testing.T) {
	busy, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	busyPort := busy.LocalAddr().(*net.UDPAddr).Port

	priv := genKey(t)
	peer := clientPeer(genKey(t).PublicKey(), Key{}, "100.96.0.2/32")
	for _, tc := range []struct {
		name string
		opts Options
		want string
	}{
		{"no private key", Options{}, "Options.PrivateKey is required"},
		{"port range", Options{PrivateKey: priv, ListenPort: 70000}, "Options.ListenPort 70000 out of range"},
		{"bad peer", Options{PrivateKey: priv, Peers: []Peer{peer, {}}}, "Options.Peers[1].PublicKey is required"},
		{"duplicate peer", Options{PrivateKey: priv, Peers: []Peer{peer, peer}}, "Options.Peers[1].PublicKey: peer " + peer.PublicKey.short() + " is listed twice"},
		{"shared address", Options{PrivateKey: priv, Peers: []Peer{peer, clientPeer(genKey(t).PublicKey(), Key{}, "100.96.0.2/32")}}, "Options.Peers[1].AllowedIPs[0]: 100.96.0.2/32 already belongs to peer"},
		{"port in use", Options{PrivateKey: priv, ListenPort: busyPort}, fmt.Sprintf("listen on UDP port %d: ", busyPort)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			near, far, err := memtun.NewPair(memtun.Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer far.Close()
			d, err := New(near, tc.opts)
			if err == nil {
				d.Close()
				t.Fatalf("New succeeded, want error containing %q", tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not contain %q", err, tc.want)
			}
			if tc.opts.ListenPort == busyPort && !errors.Is(err, syscall.EADDRINUSE) {
				t.Errorf("error %q does not wrap EADDRINUSE", err)
			}
			if !closedTun(far) {
				t.Error("New failed but left the tun device open")
			}
		})
	}
	if _, err := New(nil, Options{PrivateKey: priv}); err == nil {
		t.Error("New(nil) succeeded")
	}
}

func TestDeviceFixedPortAndClose(t *testing.T) {
	// Find a port that is free on both families, as the default bind needs.
	probe, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	port := probe.LocalAddr().(*net.UDPAddr).Port
	probe.Close()

	priv := genKey(t)
	near, far, err := memtun.NewPair(memtun.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer far.Close()
	d, err := New(near, Options{PrivateKey: priv, ListenPort: port})
	if err != nil {
		t.Skipf("port %d taken between probe and New: %v", port, err)
	}
	if d.ListenPort() != port {
		t.Errorf("ListenPort() = %d, want %d", d.ListenPort(), port)
	}
	if d.PublicKey() != priv.PublicKey() {
		t.Errorf("PublicKey() = %s, want %s", d.PublicKey(), priv.PublicKey())
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if !closedTun(far) {
		t.Error("Close left the tun device open")
	}
	// The port is released.
	again, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port})
	if err != nil {
		t.Errorf("port %d still in use after Close: %v", port, err)
	} else {
		again.Close()
	}
	pub := genKey(t).PublicKey()
	if err := d.AddPeer(Peer{PublicKey: pub}); !errors.Is(err, ErrClosed) {
		t.Errorf("AddPeer after Close: %v", err)
	}
	if err := d.RemovePeer(pub); !errors.Is(err, ErrClosed) {
		t.Errorf("RemovePeer after Close: %v", err)
	}
	if _, err := d.Peers(); !errors.Is(err, ErrClosed) {
		t.Errorf("Peers after Close: %v", err)
	}
}

// v4OnlyBind is the default bind refusing IPv6 endpoints, so that a set
// operation can fail after it created the peer.
type v4OnlyBind struct{ conn.Bind }

func (b v4OnlyBind) ParseEndpoint(s string) (conn.Endpoint, error) {
	ap, err := netip.ParseAddrPort(s)
	if err == nil && !ap.Addr().Is4() {
		return nil, errors.New("v4OnlyBind: IPv6 endpoint")
	}
	return b.Bind.ParseEndpoint(s)
}

// A peer whose configuration the device rejects is not left half made.
func TestDeviceAddPeerFailureLeavesNoPeer(t *testing.T) {
	n := newNode(t, Options{PrivateKey: genKey(t), Bind: v4OnlyBind{conn.NewDefaultBind()}})
	pub := genKey(t).PublicKey()
	err := n.dev.AddPeer(Peer{PublicKey: pub, Endpoint: netip.MustParseAddrPort("[::1]:51820"), AllowedIPs: prefixes(t, "100.96.0.2/32")})
	if err == nil || !strings.Contains(err.Error(), "v4OnlyBind: IPv6 endpoint") {
		t.Fatalf("AddPeer: %v, want the bind's error", err)
	}
	peers, err := n.dev.Peers()
	if err != nil {
		t.Fatal(err)
	}
	if len(peers) != 0 {
		t.Fatalf("failed AddPeer left %+v", peers)
	}
	// Its address was not taken either.
	if err := n.dev.AddPeer(Peer{PublicKey: pub, Endpoint: loopback(51820), AllowedIPs: prefixes(t, "100.96.0.2/32")}); err != nil {
		t.Fatal(err)
	}
	if st := n.stats(t, pub); st.Endpoint != loopback(51820) {
		t.Errorf("endpoint %v", st.Endpoint)
	}
}

// A client's first handshake must not be lost to its own start-up: the
// device comes up by itself when its tun reports EventUp, and a peer with
// an endpoint and a keepalive sends its initiation at once. Were the
// listen port set after that, the bind would be reopened under the
// initiation and the answer lost, costing REKEY_TIMEOUT (5 s) before the
// next try. Each new client gets rekeyTimeout/2 to complete.
func TestDeviceFirstHandshakeIsNotLost(t *testing.T) {
	t.Parallel()
	const rekeyTimeout = 5 * time.Second
	for i := range 8 {
		cpriv := genKey(t)
		server, serverPub := newServer(t, clientPeer(cpriv.PublicKey(), Key{}, "100.96.0.2/32"))
		client := newNode(t, Options{
			PrivateKey: cpriv,
			Peers: []Peer{{
				PublicKey:           serverPub,
				Endpoint:            loopback(server.dev.ListenPort()),
				AllowedIPs:          prefixes(t, "0.0.0.0/0"),
				PersistentKeepalive: 25 * time.Second,
			}},
		})
		deadline := time.Now().Add(rekeyTimeout / 2)
		for client.stats(t, serverPub).LastHandshake.IsZero() {
			if time.Now().After(deadline) {
				t.Fatalf("client %d: no handshake within %v of New; the first initiation was lost", i, rekeyTimeout/2)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}
