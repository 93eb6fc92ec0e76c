package service

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/sluice-vpn/sluice/nat"
	"github.com/sluice-vpn/sluice/netstack/netstacktest"
	"github.com/sluice-vpn/sluice/pkg/admin"
)

// running is a service started by a test, with a WireGuard client
// connected as peer "phone".
type running struct {
	svc    *Service
	dir    string
	unix   *admin.Client
	tcp    *admin.Client
	tcpURL string
	client *netstacktest.Client
}

func startRunning(t testing.TB, mod func(*Options)) *running {
	t.Helper()
	dir := t.TempDir()
	opts := testOptions(t, dir)
	opts.Endpoint = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(opts.ListenPort)).String()
	opts.Admin = freeTCPAddr(t)
	if mod != nil {
		mod(&opts)
	}
	svc, err := New(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- svc.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	np, err := AddPeer(context.Background(), dir, PeerRequest{Name: "phone"})
	if err != nil {
		t.Fatal(err)
	}
	return &running{
		svc: svc, dir: dir,
		unix:   admin.NewUnixClient(dir + "/" + SocketName),
		tcp:    admin.NewTCPClient(opts.Admin, readToken(t, svc)),
		tcpURL: "http://" + opts.Admin,
		client: connect(t, np.Config),
	}
}

func freeTCPAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// echoServer echoes on loopback.
func echoServer(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	return ln
}

func TestAdminAPIFlows(t *testing.T) {
	r := startRunning(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	events, err := r.unix.Events(ctx, admin.FlowFilter{Peer: "phone", Proto: "tcp"})
	if err != nil {
		t.Fatal(err)
	}

	ln := echoServer(t)
	conn, err := r.client.DialContext(ctx, "tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	const n = 100000
	msg := strings.Repeat("x", n)
	conn.Write([]byte(msg))
	if _, err := io.ReadFull(conn, make([]byte, n)); err != nil {
		t.Fatal(err)
	}

	ev := <-events
	if ev.Type != "new" || ev.Flow.Peer != "phone" || ev.Flow.Dest.String() != ln.Addr().String() {
		t.Fatalf("first event %+v", ev)
	}
	id := ev.Flow.ID

	// The same flow, over the unix socket and over loopback TCP.
	for name, c := range map[string]*admin.Client{"unix": r.unix, "tcp": r.tcp} {
		// The relay counts a write once it returns, which can be after
		// the echo has come back: give the counters a moment.
		for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			flows, err := c.Flows(ctx, admin.FlowFilter{Peer: "phone", Proto: "tcp", Port: uint16(ln.Addr().(*net.TCPAddr).Port)})
			if err == nil && len(flows) == 1 && flows[0].ID == id && flows[0].OrigBytes == n && flows[0].ReplyBytes == n {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: flows %+v, %v", name, flows, err)
			}
		}
		if none, err := c.Flows(ctx, admin.FlowFilter{Dest: netip.MustParsePrefix("10.0.0.0/8")}); err != nil || len(none) != 0 {
			t.Fatalf("%s: a filter that matches nothing: %+v %v", name, none, err)
		}
	}
	if st, err := r.unix.Status(ctx); err != nil || len(st.Peers) != 2 || st.Flows != 1 {
		t.Fatalf("status %+v %v", st, err)
	}

	// Deleting the flow closes both sides: the client sees its connection
	// end.
	if err := r.tcp.DeleteFlow(ctx, id); err != nil {
		t.Fatal(err)
	}
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Read(make([]byte, 1)); err == nil || strings.Contains(err.Error(), "timeout") {
		t.Fatalf("the client's connection outlived the flow's deletion: %v", err)
	}
	ev = <-events
	if ev.Type != "ended" || ev.Reason != "evicted" || ev.Flow.ID != id || ev.Flow.OrigBytes != n || ev.Flow.ReplyBytes != n {
		t.Fatalf("ended event %+v", ev)
	}
	if err := r.tcp.DeleteFlow(ctx, id); err == nil {
		t.Fatal("deleting a flow twice succeeded")
	}
}

func TestAdminAPIMetrics(t *testing.T) {
	r := startRunning(t, nil)
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
	// Two flows the policy refuses: loopback other than 127.0.0.1/8 is
	// allowed in these tests, so aim at a private address.
	for range 2 {
		dctx, dcancel := context.WithTimeout(ctx, 3*time.Second)
		r.client.DialContext(dctx, "tcp", "10.1.2.3:80")
		dcancel()
	}

	resp, err := getWithToken(r.tcpURL+"/metrics", readToken(t, r.svc))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	value := func(name string, labels map[string]string) float64 {
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
	if v := value("sluice_flows_refused_total", map[string]string{"reason": "policy"}); v != 2 {
		t.Errorf("policy refusals: %v, want 2", v)
	}
	if v := value("sluice_flows_created_total", nil); v < 1 {
		t.Errorf("flows created: %v", v)
	}
	if v := value("sluice_peer_flow_bytes_total", map[string]string{"peer": "phone", "direction": "orig"}); v != 10 {
		t.Errorf("phone's bytes sent: %v, want 10", v)
	}
	if v := value("sluice_peer_handshake_age_seconds", map[string]string{"peer": "phone"}); v < 0 || v > 60 {
		t.Errorf("handshake age %v", v)
	}
	if v := value("sluice_egress_ports_slice_size", nil); v != float64(nat.DefaultEgressPorts.Len()) {
		t.Errorf("slice size %v", v)
	}
	value("go_goroutines", nil)

	for _, path := range []string{"/healthz", "/readyz"} {
		resp, err := http.Get(r.tcpURL + path)
		if err != nil || resp.StatusCode != 200 {
			t.Errorf("%s: %v %v", path, resp, err)
		}
	}
}

// TestReloadClosesDeniedFlows tightens the policy while two flows are
// open: the one the new policy denies is closed, the other carries on.
func TestReloadClosesDeniedFlows(t *testing.T) {
	denied := echoServer(t)
	allowed := echoServer(t)
	deniedPort := uint16(denied.Addr().(*net.TCPAddr).Port)
	r := startRunning(t, func(o *Options) {
		o.Reload = func(context.Context) (Reloadable, []byte, error) {
			p := o.Gateway.Policy
			p.Deny = append(p.Deny, nat.Rule{Prefix: netip.MustParsePrefix("127.0.0.1/32"), Ports: nat.PortRange{Lo: deniedPort, Hi: deniedPort}})
			return Reloadable{Policy: p}, []byte("reloaded: true\n"), nil
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
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

	if err := r.unix.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	a.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := a.Read(make([]byte, 1)); err == nil || strings.Contains(err.Error(), "timeout") {
		t.Fatalf("the now-denied flow stayed open: %v", err)
	}
	b.SetDeadline(time.Now().Add(5 * time.Second))
	b.Write([]byte("still here"))
	if got := make([]byte, 10); func() error { _, err := io.ReadFull(b, got); return err }() != nil {
		t.Fatal("the allowed flow was closed too")
	}
	if conf, err := r.unix.Config(ctx); err != nil || string(conf) != "reloaded: true\n" {
		t.Fatalf("running config after reload: %q %v", conf, err)
	}
	// New flows follow the new policy too.
	dctx, dcancel := context.WithTimeout(ctx, 3*time.Second)
	defer dcancel()
	if _, err := r.client.DialContext(dctx, "tcp", denied.Addr().String()); err == nil {
		t.Fatal("a new flow to the denied port was let through")
	}
}
