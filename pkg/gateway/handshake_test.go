package gateway

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/sluice-vpn/sluice/nat"
	"github.com/sluice-vpn/sluice/netstack/netstacktest"
	"github.com/sluice-vpn/sluice/tunnel/memtun"
)

// rawSYN builds an IPv4 TCP SYN, with checksums, as a client that never
// answers the SYN-ACK sends it.
func rawSYN(src, dst netip.AddrPort) []byte {
	b := make([]byte, 40)
	sa, da := tcpip.AddrFrom4(src.Addr().As4()), tcpip.AddrFrom4(dst.Addr().As4())
	ip := header.IPv4(b)
	ip.Encode(&header.IPv4Fields{TotalLength: 40, TTL: 64, Protocol: 6, SrcAddr: sa, DstAddr: da})
	ip.SetChecksum(^ip.CalculateChecksum())
	th := header.TCP(b[20:])
	th.Encode(&header.TCPFields{SrcPort: src.Port(), DstPort: dst.Port(), SeqNum: 1, DataOffset: 20,
		Flags: header.TCPFlagSyn, WindowSize: 65535})
	th.SetChecksum(^th.CalculateChecksum(header.PseudoHeaderChecksum(6, sa, da, 20)))
	return b
}

// TestHalfOpenFloodDoesNotLockOutOtherClients is issue 14 §2: one client
// floods bare SYNs (their SYN-ACKs never answered) at a destination that
// accepts every connection, under its new-flow rate; another client's
// HTTP requests keep working, because each client has its own share of
// the handshakes in flight, and the flood's extra SYNs are refused and
// counted against it.
func TestHalfOpenFloodDoesNotLockOutOtherClients(t *testing.T) {
	a, b, err := memtun.NewPair(memtun.Options{})
	if err != nil {
		t.Fatal(err)
	}
	const share = 16
	srv, err := New(Options{
		Device: b,
		Egress: nat.EgressOptions{Ports: slice, DialTimeout: time.Second},
		Policy: nat.PolicyOptions{Allow: loopback},
		// No rate limit: the share of handshakes alone must hold the
		// flood, however fast it comes.
		Limits:      nat.LimiterOptions{Default: nat.Limits{NewFlowsPerSecond: -1, MaxHandshakes: share}},
		MaxInFlight: 64,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	client, err := netstacktest.NewClient([]netip.Addr{clientV4}, 1420)
	if err != nil {
		t.Fatal(err)
	}
	wait := netstacktest.Join(a, client)
	defer func() {
		client.Close()
		a.Close()
		closed := make(chan struct{})
		go func() { srv.Close(); close(closed) }()
		select {
		case <-closed:
		case <-time.After(10 * time.Second):
			t.Error("the gateway did not close within 10 s of a half-open flood")
		}
		wait()
	}()

	hold, err := net.Listen("tcp4", "127.0.0.1:0")
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
	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, r.URL.Path) }))
	defer web.Close()

	// Ten times the global bound of SYNs, all at once, from one address.
	flooder := netip.MustParseAddr("100.96.0.9")
	dst := netip.MustParseAddrPort(hold.Addr().String())
	for p := range 640 {
		a.Write([][]byte{rawSYN(netip.AddrPortFrom(flooder, uint16(10000+p)), dst)}, 0)
	}
	key := flooder.String() // the limit key in TUN mode
	deadline := time.Now().Add(5 * time.Second)
	for handshakesOf(srv, key) < share && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}

	hc := &http.Client{Transport: &http.Transport{DialContext: client.DialContext, DisableKeepAlives: true}, Timeout: 5 * time.Second}
	const n = 200
	ok := 0
	for i := range n {
		path := fmt.Sprintf("/%d", i)
		resp, err := hc.Get(web.URL + path)
		if err != nil {
			t.Logf("request %d: %v", i, err)
			continue
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err == nil && string(body) == path {
			ok++
		}
	}
	if ok < n*99/100 {
		t.Fatalf("%d of %d requests of the other client succeeded during the flood", ok, n)
	}

	var flood nat.PeerLimitStats
	for _, l := range srv.Stats().Limits {
		if l.Peer == key {
			flood = l
		}
	}
	if flood.Handshakes != share || flood.HandshakeLimited == 0 {
		t.Errorf("the flooder: %+v; want its %d handshakes in flight and the rest refused", flood, share)
	}
	if st := srv.Stats().Stack; st.InFlightDrops != 0 || st.InFlightRefused == 0 {
		t.Errorf("stack: %d SYNs dropped at the global bound, %d refused; want none and some", st.InFlightDrops, st.InFlightRefused)
	}
	if got := gaugeOf(t, srv, "sluice_peer_tcp_handshakes_in_flight", key); got != share {
		t.Errorf("sluice_peer_tcp_handshakes_in_flight{peer=%q} is %v; want %d", key, got, share)
	}
}

// gaugeOf gathers the gateway's metrics and returns the named gauge's
// value for the peer.
func gaugeOf(t *testing.T, srv *Server, name, peer string) float64 {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(srv.Collector())
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if lp.GetName() == "peer" && lp.GetValue() == peer {
					return m.GetGauge().GetValue()
				}
			}
		}
	}
	t.Fatalf("no %s for peer %q", name, peer)
	return 0
}

func handshakesOf(srv *Server, key string) int {
	for _, l := range srv.Stats().Limits {
		if l.Peer == key {
			return l.Handshakes
		}
	}
	return 0
}
