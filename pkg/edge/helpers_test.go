package edge

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/sluice-vpn/sluice/pkg/edge/registry"
	"github.com/sluice-vpn/sluice/pkg/expose"
)

// fakeTunnel stands in for the gateway's DialPeer: a replica's address is
// a loopback address and port where a test origin listens, and dials to
// addresses marked failing fail as a dead peer's would.
type fakeTunnel struct {
	mu    sync.Mutex
	fail  map[netip.AddrPort]error
	dials map[netip.AddrPort]int
}

func newFakeTunnel() *fakeTunnel {
	return &fakeTunnel{fail: map[netip.AddrPort]error{}, dials: map[netip.AddrPort]int{}}
}

func (f *fakeTunnel) Dial(ctx context.Context, dst netip.AddrPort) (net.Conn, error) {
	f.mu.Lock()
	f.dials[dst]++
	err := f.fail[dst]
	f.mu.Unlock()
	if err != nil {
		return nil, err
	}
	if !dst.Addr().IsLoopback() {
		return nil, fmt.Errorf("test tunnel: %s is not a loopback address", dst)
	}
	var d net.Dialer
	return d.DialContext(ctx, "tcp", dst.String())
}

func (f *fakeTunnel) setFail(dst netip.AddrPort, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fail[dst] = err
}

func (f *fakeTunnel) dialsTo(dst netip.AddrPort) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.dials[dst]
}

func newRegistry(t *testing.T, hosts map[string]registry.Hostname) *registry.Registry {
	t.Helper()
	reg, err := registry.New(registry.Options{Hostnames: hosts, Lease: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	return reg
}

// register makes the replica at 127.0.0.1:port serve hostname. All
// replicas of one hostname belong to one peer, which claims it.
func register(t *testing.T, reg *registry.Registry, hostname string, port uint16, protocol string, labels map[string]string) {
	t.Helper()
	peer := registry.Peer{Name: "agent-" + hostname, PublicKey: "key-" + hostname}
	_, err := reg.Register(peer, netip.MustParseAddr("127.0.0.1"), expose.Registration{
		Hostname: hostname, Port: port, Protocol: protocol, Labels: labels,
	})
	if err != nil {
		t.Fatalf("register %s at port %d: %v", hostname, port, err)
	}
}

// startEdge builds and starts an edge, filling in Registry and Dial when
// they are not set, and closes it when the test ends.
func startEdge(t *testing.T, opts Options) *Edge {
	t.Helper()
	if opts.Registry == nil {
		opts.Registry = newRegistry(t, nil)
	}
	if opts.Dial == nil {
		opts.Dial = newFakeTunnel().Dial
	}
	e, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	return e
}

// origin starts an HTTP origin and returns its port.
func origin(t *testing.T, h http.Handler) (*httptest.Server, uint16) {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv, portOf(t, srv.Listener.Addr())
}

func portOf(t *testing.T, a net.Addr) uint16 {
	t.Helper()
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		t.Fatal(err)
	}
	return ap.Port()
}

// named is an origin handler that answers with its name.
func named(name string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		io.WriteString(w, name)
	})
}

// testClient sends every request to the edge at addr, whatever its URL
// names, as a client that resolved the hostname to the edge would.
func testClient(addr net.Addr) *http.Client {
	return &http.Client{
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "tcp", addr.String())
			},
			MaxIdleConnsPerHost: 8,
		},
		Timeout: 10 * time.Second,
	}
}

// fetch sends a request and returns the response with its body read.
func fetch(t *testing.T, c *http.Client, req *http.Request) (*http.Response, string) {
	t.Helper()
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", req.Method, req.URL, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: reading the body: %v", req.Method, req.URL, err)
	}
	return resp, string(b)
}

func get(t *testing.T, c *http.Client, url string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	return fetch(t, c, req)
}

// metric returns the value of the edge's metric name with the given
// labels (a histogram's sample count), and whether it exists.
func metric(t *testing.T, e *Edge, name string, labels map[string]string) (float64, bool) {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(e.Collector()); err != nil {
		t.Fatal(err)
	}
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() != name {
			continue
		}
	next:
		for _, m := range f.GetMetric() {
			have := map[string]string{}
			for _, lp := range m.GetLabel() {
				have[lp.GetName()] = lp.GetValue()
			}
			for k, v := range labels {
				if have[k] != v {
					continue next
				}
			}
			switch f.GetType() {
			case dto.MetricType_COUNTER:
				return m.GetCounter().GetValue(), true
			case dto.MetricType_GAUGE:
				return m.GetGauge().GetValue(), true
			case dto.MetricType_HISTOGRAM:
				return float64(m.GetHistogram().GetSampleCount()), true
			}
		}
	}
	return 0, false
}

func mustMetric(t *testing.T, e *Edge, name string, labels map[string]string, want float64) {
	t.Helper()
	got, ok := metric(t, e, name, labels)
	if !ok || got != want {
		t.Errorf("%s%v = %v (present %v), want %v", name, labels, got, ok, want)
	}
}

// eventually polls cond until it holds or a few seconds pass.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func contains(s, sub string) bool { return strings.Contains(s, sub) }

// dialRaw connects to addr for a test that speaks the protocol by hand,
// with a deadline on the whole connection unless it is 0; the connection
// is closed when the test ends.
func dialRaw(t *testing.T, addr net.Addr, deadline time.Duration) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if deadline > 0 {
		c.SetDeadline(time.Now().Add(deadline))
	}
	return c
}
