package gateway

import (
	"context"
	"crypto/sha256"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/sluice-vpn/sluice/nat"
	"github.com/sluice-vpn/sluice/tunnel/wireguard"
)

// TestFloodingPeerIsHeldToItsLimits has one peer open TCP connections as
// fast as it can while another downloads: the flood is held to its limits
// and the download completes.
func TestFloodingPeerIsHeldToItsLimits(t *testing.T) {
	key, _ := wireguard.GeneratePrivateKey()
	srv, err := New(Options{
		WireGuard: &WireGuardOptions{PrivateKey: key},
		Addrs:     []netip.Addr{gatewayV4},
		Egress:    nat.EgressOptions{Ports: slice, DialTimeout: time.Second},
		Policy:    nat.PolicyOptions{Allow: loopback},
		Limits:    nat.LimiterOptions{Default: nat.Limits{NewFlowsPerSecond: 50, Burst: 20, MaxFlows: 30}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	flooder := newWGClient(t, srv, 2)
	victim := newWGClient(t, srv, 3)
	addPeer(t, srv, "flooder", flooder, 2)
	addPeer(t, srv, "victim", victim, 3)

	// A server that holds every connection open, so that the flooder's
	// flows pile up.
	hold, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer hold.Close()
	go func() {
		for {
			c, err := hold.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(io.Discard, c); c.Close() }()
		}
	}()
	body := make([]byte, 4<<20)
	for i := range body {
		body[i] = byte(i * 7)
	}
	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write(body) }))
	defer web.Close()

	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	for range 16 {
		wg.Go(func() {
			for ctx.Err() == nil {
				dctx, dcancel := context.WithTimeout(ctx, 500*time.Millisecond)
				c, err := flooder.DialContext(dctx, "tcp", hold.Addr().String())
				dcancel()
				if err == nil {
					mu.Lock()
					conns = append(conns, c)
					mu.Unlock()
				}
			}
		})
	}
	defer func() {
		cancel()
		wg.Wait()
		for _, c := range conns {
			c.Close()
		}
	}()

	time.Sleep(300 * time.Millisecond) // the flood is on
	got, err := get(t, victim, web.URL, 20*time.Second)
	if err != nil {
		t.Fatalf("the victim's download failed during the flood: %v", err)
	}
	if sha256.Sum256(got) != sha256.Sum256(body) {
		t.Fatalf("the victim got %d bytes, want %d", len(got), len(body))
	}

	var flood nat.PeerLimitStats
	for _, l := range srv.Stats().Limits {
		if l.Peer == "flooder" {
			flood = l
		}
	}
	if flood.Flows > 30 {
		t.Errorf("the flooder holds %d flows; its limit is 30", flood.Flows)
	}
	if flood.RateLimited+flood.FlowLimited == 0 {
		t.Errorf("the flooder was never refused: %+v", flood)
	}
	if n := srv.Stats().Refused[RefusedLimit]; n == 0 {
		t.Error("no refusal counted for limits")
	}
	t.Logf("flooder: %+v", flood)
}

// TestShutdownDrains stops new flows at once, lets an open connection
// finish, and returns as soon as it has.
func TestShutdownDrains(t *testing.T) {
	h := start(t, nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	open, err := h.client.DialContext(context.Background(), "tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	grace, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	go func() { done <- h.srv.Shutdown(grace) }()
	time.Sleep(100 * time.Millisecond)

	if h.srv.Ready() {
		t.Error("ready while draining")
	}
	dctx, dcancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer dcancel()
	if _, err := h.client.DialContext(dctx, "tcp", ln.Addr().String()); err == nil {
		t.Error("a new connection was accepted while draining")
	}
	open.SetDeadline(time.Now().Add(5 * time.Second))
	open.Write([]byte("still served"))
	buf := make([]byte, 12)
	if _, err := io.ReadFull(open, buf); err != nil {
		t.Fatalf("the open connection stopped working while draining: %v", err)
	}
	start := time.Now()
	open.Close()
	select {
	case <-done:
		if d := time.Since(start); d > 3*time.Second {
			t.Errorf("shutdown took %v after the last connection closed", d)
		}
	case <-time.After(8 * time.Second):
		t.Fatal("shutdown did not return after the last connection closed")
	}
}

// TestTUNLimitsPerClientAddress: behind a TUN device every client is the
// same unnamed peer, so the limits count each client address apart: one
// host at its limit leaves the others theirs.
func TestTUNLimitsPerClientAddress(t *testing.T) {
	h := start(t, func(o *Options) {
		o.Limits = nat.LimiterOptions{Default: nat.Limits{NewFlowsPerSecond: -1, MaxFlows: 2}}
	})
	listen := func(network, addr string) string {
		ln, err := net.Listen(network, addr)
		if err != nil {
			t.Skipf("%s: %v", network, err)
		}
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				t.Cleanup(func() { c.Close() })
			}
		}()
		return ln.Addr().String()
	}
	v4, v6 := listen("tcp4", "127.0.0.1:0"), listen("tcp6", "[::1]:0")
	dial := func(addr string) error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c, err := h.client.DialContext(ctx, "tcp", addr)
		if err == nil {
			t.Cleanup(func() { c.Close() })
		}
		return err
	}
	for i := range 2 {
		if err := dial(v4); err != nil {
			t.Fatalf("flow %d from %s: %v", i+1, clientV4, err)
		}
	}
	if err := dial(v4); err == nil {
		t.Fatalf("a third flow from %s was let through; its limit is 2", clientV4)
	}
	if err := dial(v6); err != nil {
		t.Fatalf("a flow from %s, another client address: %v", clientV6, err)
	}
	got := map[string]nat.PeerLimitStats{}
	for _, l := range h.srv.Stats().Limits {
		got[l.Peer] = l
	}
	if l := got[clientV4.String()]; l.Flows != 2 || l.FlowLimited != 1 {
		t.Errorf("limits of %s: %+v; want 2 flows and 1 refusal", clientV4, l)
	}
	if l := got["fd5c:1ce::/64"]; l.Flows != 1 {
		t.Errorf("limits of %s's /64: %+v; want 1 flow", clientV6, l)
	}
}
