package service

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/sluice-vpn/sluice/nat"
	"github.com/sluice-vpn/sluice/netstack/netstacktest"
	"github.com/sluice-vpn/sluice/pkg/gateway"
	"github.com/sluice-vpn/sluice/tunnel/wireguard"
)

// freePort finds a UDP port nothing listens on.
func freePort(t testing.TB) int {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return c.LocalAddr().(*net.UDPAddr).Port
}

func testOptions(t testing.TB, dir string) Options {
	return Options{
		StateDir:     dir,
		ListenPort:   freePort(t),
		Endpoint:     "127.0.0.1:1", // replaced by each test that dials
		DNSUpstreams: []netip.AddrPort{},
		// The tests' clients vanish without closing their flows.
		ShutdownGrace: 200 * time.Millisecond,
		Gateway: gateway.Options{
			Policy: nat.PolicyOptions{Allow: []nat.Rule{{Prefix: netip.MustParsePrefix("127.0.0.0/8")}}},
		},
	}
}

func TestRestartKeepsKeyAndPeers(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	svc, err := New(ctx, testOptions(t, dir))
	if err != nil {
		t.Fatal(err)
	}
	first := svc.FirstPeer()
	if first == nil || first.Peer.Name != "peer1" || !first.PrivateKeyKnown {
		t.Fatalf("first start: first peer %+v", first)
	}
	pub := svc.Gateway().PublicKey()
	svc.Close()

	// A peer added while the gateway is stopped goes into the state.
	np, err := AddPeer(ctx, dir, PeerRequest{Name: "laptop", Endpoint: "vpn.example.com:51820"})
	if err != nil {
		t.Fatal(err)
	}
	if np.Config.Peers[0].PublicKey != pub || np.Config.Peers[0].Endpoint != "vpn.example.com:51820" || np.EndpointGuessed {
		t.Fatalf("offline peer config: %+v", np.Config.Peers[0])
	}

	svc, err = New(ctx, testOptions(t, dir))
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Close()
	if svc.FirstPeer() != nil {
		t.Error("a second start created another first peer")
	}
	if got := svc.Gateway().PublicKey(); got != pub {
		t.Fatalf("public key changed across restarts: %s -> %s", pub, got)
	}
	peers, err := svc.Gateway().Peers()
	if err != nil || len(peers) != 2 || peers[0].Name != "laptop" || peers[1].Name != "peer1" {
		t.Fatalf("peers after restart: %+v %v", peers, err)
	}
	if fi, err := os.Stat(svc.store.Path()); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("state file mode: %v %v", fi.Mode(), err)
	}
}

func TestDamagedStateIsKeptAndNamed(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	svc, err := New(ctx, testOptions(t, dir))
	if err != nil {
		t.Fatal(err)
	}
	path := svc.store.Path()
	svc.Close()
	// A second save, so that there is a previous good state.
	if _, err := AddPeer(ctx, dir, PeerRequest{Name: "laptop"}); err != nil {
		t.Fatal(err)
	}

	// A write cut off half way, as a crash without the atomic rename
	// would leave it.
	good, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	cut := good[:len(good)/2]
	if err := os.WriteFile(path, cut, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = New(ctx, testOptions(t, dir))
	if err == nil {
		t.Fatal("a gateway started on a damaged state")
	}
	if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "truncated") {
		t.Fatalf("error %q does not name the file and the damage", err)
	}
	if now, _ := os.ReadFile(path); !bytes.Equal(now, cut) {
		t.Fatal("the damaged state was overwritten")
	}
	// The previous good state is there to recover from.
	if prev, err := os.ReadFile(path + ".prev"); err != nil || len(prev) == 0 {
		t.Fatalf("no previous state kept: %v", err)
	}
}

func TestOneServicePerStateDir(t *testing.T) {
	dir := t.TempDir()
	svc, err := New(context.Background(), testOptions(t, dir))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- svc.Run(ctx) }()
	defer func() { cancel(); <-done }()
	waitServing(t, dir)

	start := time.Now()
	_, err = New(context.Background(), testOptions(t, dir))
	if err == nil || !strings.Contains(err.Error(), "in use by a running gateway") {
		t.Fatalf("second service on one state directory: %v", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("refusing took %v; a running gateway answers at once", d)
	}
}

// waitServing waits until the gateway of dir answers on its socket.
func waitServing(t *testing.T, dir string) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); ; {
		if _, running, _ := ListPeers(context.Background(), dir); running {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the gateway does not answer on its control socket")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestPeersAppliedWhileRunning adds a peer through the control socket of a
// running gateway and connects a WireGuard client with the configuration
// it printed; removing the peer cuts the client off.
func TestPeersAppliedWhileRunning(t *testing.T) {
	dir := t.TempDir()
	opts := testOptions(t, dir)
	opts.Endpoint = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(opts.ListenPort)).String()
	svc, err := New(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- svc.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()

	// Run may not be serving yet: AddPeer waits for it.
	np, err := AddPeer(context.Background(), dir, PeerRequest{Name: "phone"})
	if err != nil {
		t.Fatal(err)
	}
	if peers, running, err := ListPeers(context.Background(), dir); err != nil || !running || len(peers) != 2 {
		t.Fatalf("list while running: %+v running=%v %v", peers, running, err)
	}

	client := connect(t, np.Config)
	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "hello phone") }))
	defer web.Close()
	if got, err := get(client, web.URL, 10*time.Second); err != nil || got != "hello phone" {
		t.Fatalf("through the new peer: %q %v", got, err)
	}

	if err := RemovePeer(context.Background(), dir, "phone"); err != nil {
		t.Fatal(err)
	}
	if _, err := get(client, web.URL, 2*time.Second); err == nil {
		t.Fatal("a removed peer was still served")
	}
	st, err := svc.store.Load()
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := st.Peer("phone"); ok {
		t.Fatal("the removed peer is still in the state")
	}
}

// connect brings up a WireGuard client from a wg-quick configuration.
func connect(t testing.TB, conf *wireguard.Config) *netstacktest.Client {
	t.Helper()
	// Round-trip the text, as a user would hand it to a client.
	conf, err := wireguard.ParseConfig(conf.String())
	if err != nil {
		t.Fatal(err)
	}
	var addrs []netip.Addr
	for _, p := range conf.Interface.Addresses {
		addrs = append(addrs, p.Addr())
	}
	client, err := netstacktest.NewClient(addrs, conf.Interface.MTU)
	if err != nil {
		t.Fatal(err)
	}
	p := conf.Peers[0]
	dev, err := wireguard.New(client, wireguard.Options{
		PrivateKey: conf.Interface.PrivateKey,
		Peers: []wireguard.Peer{{
			PublicKey: p.PublicKey, PresharedKey: p.PresharedKey,
			Endpoint: netip.MustParseAddrPort(p.Endpoint), AllowedIPs: p.AllowedIPs,
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dev.Close() })
	return client
}

func get(c *netstacktest.Client, url string, timeout time.Duration) (string, error) {
	hc := &http.Client{Transport: &http.Transport{DialContext: c.DialContext, DisableKeepAlives: true}, Timeout: timeout}
	resp, err := hc.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}
