package gateway

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// TestUDPClosedPortGetsPortUnreachable: a datagram to a port nothing
// listens on comes back to the client as port unreachable, which its
// connected socket reads as connection refused, as it would without the
// gateway.
func TestUDPClosedPortGetsPortUnreachable(t *testing.T) {
	h := start(t, nil)
	for _, network := range []string{"udp4", "udp6"} {
		t.Run(network, func(t *testing.T) {
			laddr := "127.0.0.1:0"
			if network == "udp6" {
				laddr = "[::1]:0"
			}
			pc, err := net.ListenPacket(network, laddr)
			if err != nil {
				t.Fatal(err)
			}
			closed := pc.LocalAddr().String()
			pc.Close()
			c, err := h.client.DialContext(context.Background(), "udp", closed)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, err := c.Write([]byte("anyone?")); err != nil {
				t.Fatal(err)
			}
			// The client's stack (gVisor's gonet) notices the error only
			// when a read begins, not while one waits: read in short turns.
			for deadline := time.Now().Add(3 * time.Second); ; {
				c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
				_, err = c.Read(make([]byte, 64))
				if err != nil && strings.Contains(err.Error(), "refused") {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("reading after a datagram to a closed port: %v, want connection refused", err)
				}
			}
			if got := h.srv.Stats().UDP.ICMPErrors; got == 0 {
				t.Error("no ICMP error counted")
			}
		})
	}
}

// TestTunnelMalformedMetric: datagrams to the WireGuard port that are not
// WireGuard show in sluice_tunnel_malformed_total.
func TestTunnelMalformedMetric(t *testing.T) {
	srv := startWireGuard(t)
	c, err := net.DialUDP("udp", nil, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: srv.ListenPort()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for range 3 {
		if _, err := c.Write([]byte("not wireguard at all, but long enough to pass the size check")); err != nil {
			t.Fatal(err)
		}
	}
	var got float64
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if got = counterOf(t, srv, "sluice_tunnel_malformed_total"); got == 3 {
			return
		}
	}
	t.Fatalf("sluice_tunnel_malformed_total = %v, want 3", got)
}

// counterOf reads an unlabelled counter from the gateway's collector.
func counterOf(t *testing.T, srv *Server, name string) float64 {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(srv.Collector())
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) == 1 {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	t.Fatalf("no %s", name)
	return 0
}
