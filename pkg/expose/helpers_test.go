package expose

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
)

// loopTunnel is a Tunnel on loopback: the agent listens on 127.0.0.1 and
// dials with the host's sockets. It records what the agent dials, so
// that tests can tell the control API was reached through it.
type loopTunnel struct {
	mu    sync.Mutex
	dials []string
}

func (t *loopTunnel) Listen(network, address string) (net.Listener, error) {
	host, port, err := net.SplitHostPort(address)
	if err != nil {
		return nil, err
	}
	if host == "" {
		host = "127.0.0.1"
	}
	return net.Listen("tcp4", net.JoinHostPort(host, port))
}

func (t *loopTunnel) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	t.mu.Lock()
	t.dials = append(t.dials, address)
	t.mu.Unlock()
	var d net.Dialer
	return d.DialContext(ctx, network, address)
}

func (t *loopTunnel) dialed() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]string(nil), t.dials...)
}

// put is a registration the fake registry received.
type put struct {
	reg  Registration
	at   time.Time
	from string
}

// fakeRegistry is the gateway's control API, recording what it is sent
// and answering PUTs as the test says.
type fakeRegistry struct {
	mu      sync.Mutex
	puts    []put
	deletes []url.Values
	status  int    // of PUT answers; 0 means 200 with lease
	message string // of error answers
	lease   Lease
}

func (f *fakeRegistry) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != RegistrationsPath {
		http.NotFound(w, r)
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	switch r.Method {
	case http.MethodPut:
		var reg Registration
		if err := json.NewDecoder(r.Body).Decode(&reg); err != nil {
			w.WriteHeader(http.StatusBadRequest)
			json.NewEncoder(w).Encode(ErrorBody{Error: "bad body: " + err.Error()})
			return
		}
		f.puts = append(f.puts, put{reg: reg, at: time.Now(), from: r.RemoteAddr})
		if f.status != 0 && f.status != http.StatusOK {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(f.status)
			json.NewEncoder(w).Encode(ErrorBody{Error: f.message})
			return
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(f.lease)
	case http.MethodDelete:
		f.deletes = append(f.deletes, r.URL.Query())
		w.WriteHeader(http.StatusNoContent)
	default:
		w.WriteHeader(http.StatusMethodNotAllowed)
	}
}

func (f *fakeRegistry) answer(status int, message string) {
	f.mu.Lock()
	f.status, f.message = status, message
	f.mu.Unlock()
}

func (f *fakeRegistry) received() ([]put, []url.Values) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]put(nil), f.puts...), append([]url.Values(nil), f.deletes...)
}

// controlServer serves a fakeRegistry on 127.0.0.1 and can go away and
// come back on the same port.
type controlServer struct {
	t    *testing.T
	reg  *fakeRegistry
	addr netip.AddrPort
	mu   sync.Mutex
	srv  *http.Server
	done chan struct{}
}

func newControlServer(t *testing.T, lease Lease) *controlServer {
	t.Helper()
	cs := &controlServer{t: t, reg: &fakeRegistry{lease: lease}}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cs.addr = netip.MustParseAddrPort(ln.Addr().String())
	cs.serve(ln)
	t.Cleanup(cs.stop)
	return cs
}

func (cs *controlServer) serve(ln net.Listener) {
	srv := &http.Server{Handler: cs.reg}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(ln)
	}()
	cs.mu.Lock()
	cs.srv, cs.done = srv, done
	cs.mu.Unlock()
}

// stop closes the server: connections are refused from then on.
func (cs *controlServer) stop() {
	cs.mu.Lock()
	srv, done := cs.srv, cs.done
	cs.srv = nil
	cs.mu.Unlock()
	if srv != nil {
		srv.Close()
		<-done
	}
}

// start listens on the same port again.
func (cs *controlServer) start() {
	cs.t.Helper()
	var ln net.Listener
	var err error
	for range 50 {
		if ln, err = net.Listen("tcp4", cs.addr.String()); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		cs.t.Fatalf("control server cannot come back on %s: %v", cs.addr, err)
	}
	cs.serve(ln)
}

// fastLease is what the fake registry hands out: refreshes every 100ms.
var fastLease = Lease{ID: "r1", TTLSeconds: 0.3, RefreshSeconds: 0.1, Weight: 1}

// running is an agent whose Run is going, stopped at the end of the test.
type running struct {
	*Agent
	cancel context.CancelFunc
	errc   chan error
}

// stop cancels Run and returns what it returned.
func (r *running) stop(t *testing.T) error {
	t.Helper()
	r.cancel()
	select {
	case err := <-r.errc:
		r.errc <- err
		return err
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return within 5s of its context's end")
		return nil
	}
}

// startAgent runs an agent of opts, filling in the fake tunnel, cs's
// address and a hostname where opts has none, and waits until it
// listens.
func startAgent(t *testing.T, cs *controlServer, opts Options) *running {
	t.Helper()
	if opts.Tunnel == nil {
		opts.Tunnel = &loopTunnel{}
	}
	if !opts.Control.IsValid() {
		opts.Control = cs.addr
	}
	if opts.Hostname == "" {
		opts.Hostname = "app.example.com"
	}
	if opts.Logger == nil {
		opts.Logger = zaptest.NewLogger(t)
	}
	a, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	a.backoffMin, a.backoffMax = 20*time.Millisecond, 100*time.Millisecond
	a.probeEvery = 20 * time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{Agent: a, cancel: cancel, errc: make(chan error, 1)}
	go func() { r.errc <- a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-r.errc:
		case <-time.After(5 * time.Second):
			t.Error("Run did not return within 5s of its context's end")
		}
	})
	select {
	case <-a.Ready():
	case <-time.After(5 * time.Second):
		t.Fatal("the agent is not listening after 5s")
	}
	if a.Addr() == nil {
		t.Fatalf("the agent could not listen: %v", <-r.errc)
	}
	return r
}

// waitRegistered waits for the agent's first registration.
func waitRegistered(t *testing.T, a *Agent) {
	t.Helper()
	select {
	case <-a.Registered():
	case <-time.After(5 * time.Second):
		t.Fatalf("not registered after 5s: %+v", a.Stats())
	}
}

// eventually waits up to 5s for cond.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after 5s, still not: %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// dialAgent connects to the agent as the edge would, from 127.0.0.1.
func dialAgent(t *testing.T, a *Agent) *net.TCPConn {
	t.Helper()
	return dialAgentFrom(t, a, "127.0.0.1")
}

func dialAgentFrom(t *testing.T, a *Agent, from string) *net.TCPConn {
	t.Helper()
	d := net.Dialer{Timeout: 2 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}
	c, err := d.Dial("tcp4", a.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// edgeClient is an HTTP client whose every connection goes to the agent,
// as the edge's reverse proxy does; it counts the connections it opens.
func edgeClient(t *testing.T, a *Agent) (*http.Client, *int) {
	t.Helper()
	var mu sync.Mutex
	n := new(int)
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			mu.Lock()
			*n++
			mu.Unlock()
			var d net.Dialer
			return d.DialContext(ctx, "tcp4", a.Addr().String())
		},
		DisableCompression: true,
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}, n
}

// readClosed reports whether c is closed by the other side within 2s:
// a read ends with EOF or a reset and no data.
func readClosed(c net.Conn) error {
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	var b [1]byte
	n, err := c.Read(b[:])
	switch {
	case n > 0:
		return errors.New("read data from a connection that should be closed")
	case err == nil:
		return errors.New("read nothing and no error")
	case errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || isReset(err):
		return nil
	default:
		return err
	}
}

func isReset(err error) bool {
	var oe *net.OpError
	return errors.As(err, &oe) && !oe.Timeout()
}
