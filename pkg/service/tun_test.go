package service

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"golang.zx2c4.com/wireguard/tun"

	"github.com/sluice-vpn/sluice/nat"
	"github.com/sluice-vpn/sluice/netstack/netstacktest"
	"github.com/sluice-vpn/sluice/pkg/admin"
	"github.com/sluice-vpn/sluice/pkg/gateway"
	"github.com/sluice-vpn/sluice/tunnel/memtun"
)

const tunTestDevice = "tuntest0"

// tunRunning is a TUN-mode service started by a test: its device is one
// end of an in-memory tunnel, a client stack is on the other.
type tunRunning struct {
	svc    *Service
	dir    string
	unix   *admin.Client
	tcp    *admin.Client
	tcpURL string
	client *netstacktest.Client
	cancel context.CancelFunc // stops Run
	done   chan error         // Run's result
}

// tunOptions are a TUN-mode service's options on a new in-memory tunnel;
// the other end is returned for the client.
func tunOptions(t *testing.T, dir string) (Options, *memtun.Device) {
	t.Helper()
	a, b, err := memtun.NewPair(memtun.Options{Name: tunTestDevice})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	return Options{
		StateDir:      dir,
		Device:        b,
		ShutdownGrace: 200 * time.Millisecond,
		Gateway: gateway.Options{
			Policy: nat.PolicyOptions{Allow: []nat.Rule{{Prefix: netip.MustParsePrefix("127.0.0.0/8")}}},
		},
	}, a
}

func startTUN(t *testing.T, mod func(*Options)) *tunRunning {
	t.Helper()
	dir := t.TempDir()
	opts, peerEnd := tunOptions(t, dir)
	opts.Admin = freeTCPAddr(t)
	if mod != nil {
		mod(&opts)
	}
	svc, err := New(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	client, err := netstacktest.NewClient([]netip.Addr{netip.MustParseAddr("10.9.0.2")}, 0)
	if err != nil {
		t.Fatal(err)
	}
	wait := netstacktest.Join(peerEnd, client)
	ctx, cancel := context.WithCancel(context.Background())
	r := &tunRunning{
		svc: svc, dir: dir,
		unix:   admin.NewUnixClient(filepath.Join(dir, SocketName)),
		tcp:    admin.NewTCPClient(opts.Admin, readToken(t, svc)),
		tcpURL: "http://" + opts.Admin,
		client: client,
		cancel: cancel,
		done:   make(chan error, 1),
	}
	go func() { r.done <- svc.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-r.done; err != nil {
			t.Error(err)
		}
		client.Close()
		peerEnd.Close()
		wait()
	})
	waitAnswers(t, r.unix)
	return r
}

// waitAnswers waits until the service answers on the admin API.
func waitAnswers(t *testing.T, c *admin.Client) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); ; {
		if _, err := c.Status(context.Background()); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the TUN-mode service does not answer on its admin API")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestTUNModeFlows lists, watches and deletes a flow that a client of the
// TUN device opened, over the control socket and over loopback TCP, and
// reads the status.
func TestTUNModeFlows(t *testing.T) {
	r := startTUN(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	events, err := r.unix.Events(ctx, admin.FlowFilter{Proto: "tcp"})
	if err != nil {
		t.Fatal(err)
	}

	ln := echoServer(t)
	conn, err := r.client.DialContext(ctx, "tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	const n = 50000
	conn.Write([]byte(strings.Repeat("t", n)))
	if _, err := io.ReadFull(conn, make([]byte, n)); err != nil {
		t.Fatal(err)
	}

	ev := <-events
	if ev.Type != "new" || ev.Flow.Dest.String() != ln.Addr().String() || ev.Flow.Peer != "" {
		t.Fatalf("first event %+v, want a new flow to %s with no peer", ev, ln.Addr())
	}
	id := ev.Flow.ID
	port := uint16(ln.Addr().(*net.TCPAddr).Port)
	for name, c := range map[string]*admin.Client{"unix": r.unix, "tcp": r.tcp} {
		// The relay counts a write once it returns, which can be after
		// the echo has come back: give the counters a moment.
		var flows []admin.FlowInfo
		for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			flows, err = c.Flows(ctx, admin.FlowFilter{Proto: "tcp", Port: port})
			ok := err == nil && len(flows) == 1 && flows[0].ID == id && flows[0].OrigBytes == n && flows[0].ReplyBytes == n
			if ok {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: flows %+v, %v; want flow %d with %d bytes each way", name, flows, err, id, n)
			}
		}
		if flows[0].Client.Addr() != netip.MustParseAddr("10.9.0.2") {
			t.Errorf("%s: flow's client %s, want the client's tunnel address 10.9.0.2", name, flows[0].Client)
		}
	}

	st, err := r.unix.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode != "tun" || st.Device != tunTestDevice || st.Flows != 1 || st.Peers == nil || len(st.Peers) != 0 ||
		st.PublicKey != "" || st.ListenPort != 0 {
		t.Fatalf("status %+v; want mode tun, device %s, 1 flow, an empty peer list, no key or port", st, tunTestDevice)
	}

	if err := r.tcp.DeleteFlow(ctx, id); err != nil {
		t.Fatal(err)
	}
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Read(make([]byte, 1)); err == nil || strings.Contains(err.Error(), "timeout") {
		t.Fatalf("the client's connection outlived the flow's deletion: %v", err)
	}
	ev = <-events
	if ev.Type != "ended" || ev.Reason != "evicted" || ev.Flow.ID != id {
		t.Fatalf("ended event %+v", ev)
	}
	if st, err := r.unix.Status(ctx); err != nil || st.Flows != 0 {
		t.Fatalf("status after the deletion: %+v %v", st, err)
	}
}

// TestTUNModeMetricsAndHealth reads /metrics, /healthz and /readyz of a
// TUN-mode service.
func TestTUNModeMetricsAndHealth(t *testing.T) {
	r := startTUN(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ln := echoServer(t)
	conn, err := r.client.DialContext(ctx, "tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	conn.Write([]byte("0123456789"))
	io.ReadFull(conn, make([]byte, 10))
	conn.Close()
	// The policy allows only 127.0.0.0/8.
	dctx, dcancel := context.WithTimeout(ctx, 3*time.Second)
	if c, err := r.client.DialContext(dctx, "tcp", "10.1.2.3:80"); err == nil {
		c.Close()
		t.Error("a dial the policy denies succeeded")
	}
	dcancel()

	value := scrape(t, r.tcpURL+"/metrics", readToken(t, r.svc))
	if v := value("sluice_flows_created_total", nil); v < 1 {
		t.Errorf("sluice_flows_created_total %v, want at least 1", v)
	}
	if v := value("sluice_flows_refused_total", map[string]string{"reason": "policy"}); v != 1 {
		t.Errorf("policy refusals %v, want 1", v)
	}
	value("go_goroutines", nil)

	for _, path := range []string{"/healthz", "/readyz"} {
		resp, err := http.Get(r.tcpURL + path)
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("%s: %s, want 200", path, resp.Status)
		}
	}
}

// scrape reads the metrics at url and returns a function that gives the
// value of the first sample of a metric whose labels include labels.
func scrape(t *testing.T, url, token string) (value func(name string, labels map[string]string) float64) {
	t.Helper()
	resp, err := getWithToken(url, token)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return func(name string, labels map[string]string) float64 {
		t.Helper()
		mf, ok := families[name]
		if !ok {
			t.Fatalf("no metric %s", name)
		}
	next:
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if want, ok := labels[lp.GetName()]; ok && want != lp.GetValue() {
					continue next
				}
			}
			if c := m.GetCounter(); c != nil {
				return c.GetValue()
			}
			return m.GetGauge().GetValue()
		}
		t.Fatalf("no %s with %v", name, labels)
		return 0
	}
}

// TestTUNModeReloadAndConfig reloads a TUN-mode service through the admin
// API: the flow the new policy denies is closed, the running configuration
// is the new one.
func TestTUNModeReloadAndConfig(t *testing.T) {
	denied := echoServer(t)
	allowed := echoServer(t)
	deniedPort := uint16(denied.Addr().(*net.TCPAddr).Port)
	r := startTUN(t, func(o *Options) {
		o.ConfigYAML = []byte("tun: {name: tuntest0}\n")
		o.Reload = func(context.Context) (Reloadable, []byte, error) {
			p := o.Gateway.Policy
			p.Deny = append(p.Deny, nat.Rule{Prefix: netip.MustParsePrefix("127.0.0.1/32"), Ports: nat.PortRange{Lo: deniedPort, Hi: deniedPort}})
			return Reloadable{Policy: p}, []byte("tun: {name: tuntest0}\nreloaded: true\n"), nil
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if conf, err := r.unix.Config(ctx); err != nil || string(conf) != "tun: {name: tuntest0}\n" {
		t.Fatalf("running config: %q %v", conf, err)
	}
	a, err := r.client.DialContext(ctx, "tcp", denied.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := r.client.DialContext(ctx, "tcp", allowed.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()

	if err := r.tcp.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	a.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := a.Read(make([]byte, 1)); err == nil || strings.Contains(err.Error(), "timeout") {
		t.Fatalf("the now-denied flow stayed open: %v", err)
	}
	b.SetDeadline(time.Now().Add(5 * time.Second))
	b.Write([]byte("still here"))
	if _, err := io.ReadFull(b, make([]byte, 10)); err != nil {
		t.Fatalf("the allowed flow was closed too: %v", err)
	}
	if conf, err := r.unix.Config(ctx); err != nil || !strings.Contains(string(conf), "reloaded: true") {
		t.Fatalf("running config after reload: %q %v", conf, err)
	}
}

// TestTUNModeHasNoPeers: the peer API and the peer functions say why
// they cannot work, and nothing is written to the state directory but the
// lock.
func TestTUNModeHasNoPeers(t *testing.T) {
	r := startTUN(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	checks := map[string]error{}
	_, checks["API peers"] = r.unix.Peers(ctx)
	_, checks["API server"] = r.unix.Server(ctx)
	_, checks["API add"] = r.tcp.AddPeer(ctx, admin.AddPeerRequest{Name: "laptop", PublicKey: "x"})
	checks["API remove"] = r.unix.RemovePeer(ctx, "laptop")
	_, checks["AddPeer"] = AddPeer(ctx, r.dir, PeerRequest{Name: "laptop"})
	checks["RemovePeer"] = RemovePeer(ctx, r.dir, "laptop")
	_, _, checks["ListPeers"] = ListPeers(ctx, r.dir)
	for what, err := range checks {
		if !errors.Is(err, admin.ErrInvalid) || !strings.Contains(err.Error(), "TUN device "+tunTestDevice) ||
			!strings.Contains(err.Error(), "no peers") {
			t.Errorf("%s on a TUN-mode gateway: %v; want an invalid request that names TUN mode and its device", what, err)
		}
	}
	if _, err := os.Stat(filepath.Join(r.dir, "state.json")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a TUN-mode gateway wrote a state file: %v", err)
	}
	if fi, err := os.Stat(filepath.Join(r.dir, SocketName)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("control socket: %v %v; want mode 0600", fi, err)
	}
}

// TestTUNModeOwnsStateDir: a second gateway, of either mode, cannot share
// a TUN gateway's state directory, and the device handed to a New that
// fails is closed.
func TestTUNModeOwnsStateDir(t *testing.T) {
	r := startTUN(t, nil)

	opts, _ := tunOptions(t, r.dir)
	start := time.Now()
	_, err := New(context.Background(), opts)
	if err == nil || !strings.Contains(err.Error(), "in use by a running gateway") {
		t.Fatalf("a second TUN gateway on the state directory: %v", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("refusing took %v; a running gateway answers at once", d)
	}
	if !isClosed(opts.Device) {
		t.Error("the device of the New that failed was not closed")
	}

	wg := testOptions(t, r.dir)
	if _, err := New(context.Background(), wg); err == nil || !strings.Contains(err.Error(), "in use by a running gateway") {
		t.Fatalf("a WireGuard gateway on a TUN gateway's state directory: %v", err)
	}
}

// TestTUNModeDrains: once Run's context is done the gateway is no longer
// ready, the API stays up while an open connection drains, and Run
// returns as soon as it has closed, before the grace period.
func TestTUNModeDrains(t *testing.T) {
	const grace = 10 * time.Second
	r := startTUN(t, func(o *Options) { o.ShutdownGrace = grace })
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ln := echoServer(t)
	conn, err := r.client.DialContext(ctx, "tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.Write([]byte("x"))
	io.ReadFull(conn, make([]byte, 1))

	stopped := time.Now()
	r.cancel()
	for {
		resp, err := http.Get(r.tcpURL + "/readyz")
		if err != nil {
			t.Fatalf("the admin API went away while a connection drained: %v", err)
		}
		resp.Body.Close()
		if resp.StatusCode == http.StatusServiceUnavailable {
			break
		}
		if time.Since(stopped) > 5*time.Second {
			t.Fatal("still ready 5s after shutdown began")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Draining still lets the open connection work.
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	conn.Write([]byte("y"))
	if _, err := io.ReadFull(conn, make([]byte, 1)); err != nil {
		t.Fatalf("the open connection broke while draining: %v", err)
	}
	conn.Close()
	select {
	case err := <-r.done:
		r.done <- err // for the cleanup
		if d := time.Since(stopped); d > grace/2 {
			t.Errorf("Run returned %v after shutdown began; the last connection closed long before the %v grace", d, grace)
		}
	case <-time.After(grace / 2):
		t.Fatal("Run still draining after the last connection closed")
	}
}

// TestTUNModeOptions: options that contradict TUN mode are refused,
// naming the field, and the device is closed.
func TestTUNModeOptions(t *testing.T) {
	opts, _ := tunOptions(t, t.TempDir())
	other, _ := tunOptions(t, t.TempDir())
	opts.Gateway.Device = other.Device
	_, err := New(context.Background(), opts)
	if err == nil || !strings.Contains(err.Error(), "Options.Gateway.Device") {
		t.Fatalf("Gateway.Device set as well as Device: %v", err)
	}
	if !isClosed(opts.Device) {
		t.Error("the device of the New that failed was not closed")
	}
	other.Device.Close()
}

// isClosed reports whether dev, an end of a memtun pair that nothing
// writes to, is closed: a Read then fails at once, where it would block.
func isClosed(dev tun.Device) bool {
	res := make(chan error, 1)
	go func() {
		_, err := dev.Read(make([][]byte, 1), make([]int, 1), 0)
		res <- err
	}()
	select {
	case err := <-res:
		return errors.Is(err, os.ErrClosed)
	case <-time.After(time.Second):
		dev.Close() // ends the Read
		<-res
		return false
	}
}
