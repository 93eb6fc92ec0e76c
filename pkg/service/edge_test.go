package service

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/websocket"

	"github.com/sluice-vpn/sluice/pkg/client"
	"github.com/sluice-vpn/sluice/pkg/edge"
	"github.com/sluice-vpn/sluice/pkg/edge/registry"
	"github.com/sluice-vpn/sluice/pkg/expose"
)

// The whole of expose in one process: a WireGuard gateway with its edge,
// and agents that join it as peers through pkg/client, each publishing a
// loopback origin. Requests go client -> edge -> tunnel -> agent ->
// origin, over real sockets and real WireGuard.

// origin is a loopback web service that counts what reaches it.
type origin struct {
	name string
	hits atomic.Int64
	srv  *httptest.Server
}

func newOrigin(t testing.TB, name string, extra func(mux *http.ServeMux)) *origin {
	t.Helper()
	o := &origin{name: name}
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		o.hits.Add(1)
		fmt.Fprintf(w, "%s %s %s", o.name, r.Header.Get("X-Forwarded-For"), r.Host)
	})
	if extra != nil {
		extra(mux)
	}
	o.srv = httptest.NewServer(mux)
	t.Cleanup(o.srv.Close)
	return o
}

// agentRun is an agent publishing an origin, with its own tunnel.
type agentRun struct {
	agent    *expose.Agent
	client   *client.Client
	cancel   context.CancelFunc
	done     chan error
	stopOnce sync.Once
}

// addPeer adds a peer to the gateway and returns its configuration.
func addPeer(t testing.TB, r *running, name string) string {
	t.Helper()
	np, err := AddPeer(context.Background(), r.dir, PeerRequest{Name: name})
	if err != nil {
		t.Fatal(err)
	}
	return np.Config.String()
}

// startAgent adds a peer to the gateway and runs an agent as that peer.
func startAgent(t *testing.T, r *running, peer, hostname, to string, labels map[string]string) (*agentRun, string) {
	t.Helper()
	conf := addPeer(t, r, peer)
	return runAgent(t, conf, hostname, to, labels), conf
}

// runAgent brings a tunnel up with conf and runs an agent on it, until
// the test ends.
func runAgent(t testing.TB, conf, hostname, to string, labels map[string]string) *agentRun {
	t.Helper()
	// An agent's tunnel is never idle (it refreshes its lease every
	// few hundred milliseconds here): a gateway silent for 3 s is gone,
	// or restarted and has forgotten the session.
	c, err := client.New(client.Options{ConfigText: conf, StaleAfter: 3 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := c.Up(ctx); err != nil {
		t.Fatal(err)
	}
	control, err := expose.ControlAddr(c.DNSServers())
	if err != nil {
		t.Fatal(err)
	}
	a, err := expose.New(expose.Options{Tunnel: c, Control: control, Hostname: hostname, To: to, Labels: labels})
	if err != nil {
		t.Fatal(err)
	}
	actx, acancel := context.WithCancel(context.Background())
	ar := &agentRun{agent: a, client: c, cancel: acancel, done: make(chan error, 1)}
	go func() { ar.done <- a.Run(actx) }()
	t.Cleanup(ar.stop)
	select {
	case <-a.Registered():
	case err := <-ar.done:
		ar.done <- err // for stop, at cleanup
		t.Fatalf("agent for %s: %v", hostname, err)
	case <-time.After(20 * time.Second):
		t.Fatalf("agent for %s never registered: %+v", hostname, a.Stats())
	}
	return ar
}

func (a *agentRun) stop() {
	a.stopOnce.Do(func() {
		a.cancel()
		<-a.done
	})
}

// kill takes the agent away as a crash would: its tunnel goes first, so
// it cannot withdraw its registration.
func (a *agentRun) kill() {
	a.client.Close()
	a.stop()
}

func startEdgeService(t testing.TB, mod func(*EdgeOptions)) (*running, string) {
	t.Helper()
	eo := &EdgeOptions{
		Registry: registry.Options{Lease: 2 * time.Second},
		Edge:     edge.Options{HTTPAddr: "127.0.0.1:0", DialTimeout: time.Second},
	}
	if mod != nil {
		mod(eo)
	}
	r := startRunning(t, func(o *Options) { o.Edge = eo })
	waitFor(t, 10*time.Second, func() bool { return r.svc.Edge() != nil })
	return r, r.svc.Edge().HTTPAddr().String()
}

// runService runs a service with opts until the test ends, or until the
// stop it returns, which gives Run's error; it waits for the edge.
func runService(t testing.TB, opts Options) (svc *Service, stop func() error) {
	t.Helper()
	svc, err := New(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- svc.Run(ctx) }()
	var once sync.Once
	var runErr error
	stop = func() error {
		once.Do(func() {
			cancel()
			runErr = <-done
		})
		return runErr
	}
	t.Cleanup(func() { stop() })
	waitFor(t, 10*time.Second, func() bool { return svc.Edge() != nil })
	return svc, stop
}

func waitFor(t testing.TB, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("timed out waiting")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// edgeGet sends a request for host to the edge.
func edgeGet(hc *http.Client, edgeAddr, host, path string, hdr http.Header) (int, string, error) {
	req, err := http.NewRequest(http.MethodGet, "http://"+edgeAddr+path, nil)
	if err != nil {
		return 0, "", err
	}
	req.Host = host
	for k, v := range hdr {
		req.Header[k] = v
	}
	resp, err := hc.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

func TestExposeWeightedSplitAndFailover(t *testing.T) {
	const host = "app.sluice.test"
	r, edgeAddr := startEdgeService(t, func(o *EdgeOptions) {
		o.Registry.Hostnames = map[string]registry.Hostname{host: {
			Peers: []string{"stable", "canary"},
			Weights: []registry.Weight{
				{Labels: map[string]string{"release": "stable"}, Weight: 90},
				{Labels: map[string]string{"release": "canary"}, Weight: 10},
			},
		}}
	})
	stable := newOrigin(t, "stable", nil)
	canary := newOrigin(t, "canary", nil)
	startAgent(t, r, "stable", host, stable.srv.URL, map[string]string{"release": "stable"})
	canaryAgent, canaryConf := startAgent(t, r, "canary", host, canary.srv.URL, map[string]string{"release": "canary"})

	// The registry lists both, with their shares.
	svcs, err := r.unix.Services(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(svcs) != 1 || svcs[0].Hostname != host || len(svcs[0].Replicas) != 2 {
		t.Fatalf("services: %+v", svcs)
	}
	for _, rep := range svcs[0].Replicas {
		if !rep.Healthy || (rep.Peer == "stable") != (rep.Weight == 90) {
			t.Errorf("replica %+v", rep)
		}
	}
	st, err := r.unix.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if e := st.Edge; e == nil || e.Hostnames != 1 || e.Replicas != 2 || e.Healthy != 2 ||
		len(e.Listeners) != 1 || e.Listeners[0] != "http "+edgeAddr {
		t.Errorf("status of the edge: %+v", st.Edge)
	}

	hc := &http.Client{Timeout: 20 * time.Second}
	counts := map[string]int{}
	const n = 1000
	for i := 0; i < n; i++ {
		code, body, err := edgeGet(hc, edgeAddr, host, "/", nil)
		if err != nil || code != http.StatusOK {
			t.Fatalf("request %d: %d %q %v", i, code, body, err)
		}
		name, rest, _ := strings.Cut(body, " ")
		counts[name]++
		if i == 0 && !strings.HasPrefix(rest, "127.0.0.1 "+host) {
			t.Errorf("the origin saw X-Forwarded-For and Host %q, want 127.0.0.1 and %s", rest, host)
		}
	}
	t.Logf("split over %d requests: %v", n, counts)
	if counts["stable"] < 880 || counts["stable"] > 920 || counts["stable"]+counts["canary"] != n {
		t.Fatalf("split %v, want 90/10 within 2 %%", counts)
	}

	// Kill the canary in the middle of a stream of requests: not one
	// fails, and soon all go to the stable replica.
	var failed, toCanary, total atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				code, body, err := edgeGet(hc, edgeAddr, host, "/", nil)
				total.Add(1)
				if err != nil || code != http.StatusOK {
					failed.Add(1)
					t.Logf("failed: %d %q %v", code, body, err)
					continue
				}
				if strings.HasPrefix(body, "canary") {
					toCanary.Add(1)
				}
			}
		}()
	}
	time.Sleep(300 * time.Millisecond)
	canaryAgent.kill()
	time.Sleep(5 * time.Second)
	close(stop)
	wg.Wait()
	if failed.Load() != 0 {
		t.Fatalf("%d of %d requests failed while a replica went away", failed.Load(), total.Load())
	}
	t.Logf("%d requests while the canary died, none failed (%d answered by it before)", total.Load(), toCanary.Load())
	// The registry has let it go, and every request goes to the stable
	// replica.
	waitFor(t, 10*time.Second, func() bool {
		svcs, err := r.unix.Services(context.Background())
		return err == nil && len(svcs) == 1 && len(svcs[0].Replicas) == 1 && svcs[0].Replicas[0].Peer == "stable"
	})
	for i := 0; i < 50; i++ {
		code, body, err := edgeGet(hc, edgeAddr, host, "/", nil)
		if err != nil || code != http.StatusOK || !strings.HasPrefix(body, "stable ") {
			t.Fatalf("after the canary died: %d %q %v; want the stable replica's answer", code, body, err)
		}
	}

	// It comes back, and is put back into rotation.
	runAgent(t, canaryConf, host, canary.srv.URL, map[string]string{"release": "canary"})
	before := canary.hits.Load()
	for i := 0; i < 50; i++ {
		if code, _, err := edgeGet(hc, edgeAddr, host, "/", nil); err != nil || code != http.StatusOK {
			t.Fatalf("after the canary came back: %d %v", code, err)
		}
	}
	if got := canary.hits.Load() - before; got < 3 || got > 8 {
		t.Fatalf("the canary served %d of 50 requests after coming back, want about 5", got)
	}
}

func TestExposePoliciesAndStreaming(t *testing.T) {
	const token = "s3cret-token"
	r, edgeAddr := startEdgeService(t, func(o *EdgeOptions) {
		o.Edge.Hostnames = map[string]edge.Policy{
			// Loopback clients are outside the list.
			"guarded.sluice.test": {Allow: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}},
			"token.sluice.test":   {BearerTokens: []string{edge.HashSecret(token)}},
			"db.sluice.test":      {ProxyProtocol: true},
		}
		o.Edge.TCP = []edge.TCPRoute{{Addr: "127.0.0.1:0", Hostname: "db.sluice.test"}}
	})

	guarded := newOrigin(t, "guarded", nil)
	tokened := newOrigin(t, "token", nil)
	sseStep := make(chan struct{})
	stream := newOrigin(t, "stream", func(mux *http.ServeMux) {
		mux.Handle("/ws", websocket.Handler(func(ws *websocket.Conn) { io.Copy(ws, ws) }))
		mux.HandleFunc("/sum", func(w http.ResponseWriter, r *http.Request) {
			h := sha256.New()
			io.Copy(h, r.Body)
			io.WriteString(w, hex.EncodeToString(h.Sum(nil)))
		})
		mux.HandleFunc("/events", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/event-stream")
			fmt.Fprint(w, "data: one\n\n")
			w.(http.Flusher).Flush()
			// The second event waits until the client has read the
			// first: only an edge that streams lets it.
			select {
			case <-sseStep:
			case <-time.After(10 * time.Second):
				return
			}
			fmt.Fprint(w, "data: two\n\n")
		})
	})
	startAgent(t, r, "guard", "guarded.sluice.test", guarded.srv.URL, nil)
	startAgent(t, r, "tok", "token.sluice.test", tokened.srv.URL, nil)
	startAgent(t, r, "streamer", "stream.sluice.test", stream.srv.URL, nil)
	db := proxiedEcho(t)
	startAgent(t, r, "db", "db.sluice.test", "tcp://"+db.Addr().String(), nil)
	hc := &http.Client{Timeout: 20 * time.Second}

	t.Run("unknown host", func(t *testing.T) {
		code, body, err := edgeGet(hc, edgeAddr, "nobody.sluice.test", "/", nil)
		if err != nil || code != http.StatusNotFound || !strings.Contains(body, "nobody.sluice.test") {
			t.Fatalf("%d %q %v; want 404 naming the host", code, body, err)
		}
	})

	t.Run("allow list", func(t *testing.T) {
		code, _, err := edgeGet(hc, edgeAddr, "guarded.sluice.test", "/", nil)
		if err != nil || code != http.StatusForbidden {
			t.Fatalf("%d %v; want 403", code, err)
		}
		if n := guarded.hits.Load(); n != 0 {
			t.Fatalf("the origin received %d refused requests", n)
		}
	})

	t.Run("bearer token", func(t *testing.T) {
		code, _, err := edgeGet(hc, edgeAddr, "token.sluice.test", "/", nil)
		if err != nil || code != http.StatusUnauthorized {
			t.Fatalf("no token: %d %v; want 401", code, err)
		}
		code, _, err = edgeGet(hc, edgeAddr, "token.sluice.test", "/", http.Header{"Authorization": {"Bearer wrong"}})
		if err != nil || code != http.StatusUnauthorized {
			t.Fatalf("wrong token: %d %v; want 401", code, err)
		}
		if n := tokened.hits.Load(); n != 0 {
			t.Fatalf("the origin received %d refused requests", n)
		}
		code, body, err := edgeGet(hc, edgeAddr, "token.sluice.test", "/", http.Header{"Authorization": {"Bearer " + token}})
		if err != nil || code != http.StatusOK || !strings.HasPrefix(body, "token ") {
			t.Fatalf("with the token: %d %q %v", code, body, err)
		}
		if n := tokened.hits.Load(); n != 1 {
			t.Fatalf("the origin received %d requests, want 1", n)
		}
	})

	t.Run("websocket", func(t *testing.T) {
		conn, err := net.DialTimeout("tcp", edgeAddr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(20 * time.Second))
		cfg, err := websocket.NewConfig("ws://stream.sluice.test/ws", "http://stream.sluice.test/")
		if err != nil {
			t.Fatal(err)
		}
		ws, err := websocket.NewClient(cfg, conn)
		if err != nil {
			t.Fatalf("upgrade through the edge: %v", err)
		}
		for i := 0; i < 5; i++ {
			msg := fmt.Sprintf("message %d", i)
			if err := websocket.Message.Send(ws, msg); err != nil {
				t.Fatal(err)
			}
			var echo string
			if err := websocket.Message.Receive(ws, &echo); err != nil || echo != msg {
				t.Fatalf("echo %q, %v; want %q", echo, err, msg)
			}
		}
	})

	t.Run("upload", func(t *testing.T) {
		// 16 MiB up and its digest back, through the tunnel both ways.
		blob := make([]byte, 16<<20)
		for i := range blob {
			blob[i] = byte(i * 7 / 5)
		}
		req, _ := http.NewRequest(http.MethodPost, "http://"+edgeAddr+"/sum", bytes.NewReader(blob))
		req.Host = "stream.sluice.test"
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		got, _ := io.ReadAll(resp.Body)
		if want := sha256.Sum256(blob); string(got) != hex.EncodeToString(want[:]) {
			t.Fatalf("the origin's digest %q differs from the upload's", got)
		}
	})

	t.Run("tcp with PROXY v2", func(t *testing.T) {
		conn, err := net.DialTimeout("tcp", r.svc.Edge().TCPAddrs()[0].String(), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(20 * time.Second))
		io.WriteString(conn, "hello\n")
		line, err := bufio.NewReader(conn).ReadString('\n')
		// The origin prefixes the echo with the client address the
		// PROXY header gave it: this connection's own.
		if want := conn.LocalAddr().String() + " hello\n"; err != nil || line != want {
			t.Fatalf("echo %q, %v; want %q", line, err, want)
		}
	})

	t.Run("server-sent events", func(t *testing.T) {
		req, _ := http.NewRequest(http.MethodGet, "http://"+edgeAddr+"/events", nil)
		req.Host = "stream.sluice.test"
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
			t.Fatalf("Content-Type %q", ct)
		}
		br := bufio.NewReader(resp.Body)
		line, err := br.ReadString('\n')
		if err != nil || line != "data: one\n" {
			t.Fatalf("first event %q, %v", line, err)
		}
		close(sseStep)
		br.ReadString('\n')
		if line, err = br.ReadString('\n'); err != nil || line != "data: two\n" {
			t.Fatalf("second event %q, %v", line, err)
		}
	})

	// Refusals are counted per hostname and reason.
	mfs, err := r.svc.metrics().Gather()
	if err != nil {
		t.Fatal(err)
	}
	var refused []string
	for _, mf := range mfs {
		if mf.GetName() != "sluice_edge_refused_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			var l []string
			for _, lp := range m.GetLabel() {
				l = append(l, lp.GetName()+"="+lp.GetValue())
			}
			refused = append(refused, fmt.Sprintf("%s:%g", strings.Join(l, ","), m.GetCounter().GetValue()))
		}
	}
	for _, want := range []string{"hostname=guarded.sluice.test,reason=ip:1", "hostname=token.sluice.test,reason=auth:2"} {
		found := false
		for _, got := range refused {
			found = found || got == want
		}
		if !found {
			t.Errorf("sluice_edge_refused_total has no %s: %v", want, refused)
		}
	}
}

// A TCP replica whose origin dies looks fine to the edge: the edge's
// connection to the agent succeeds, and only then does the agent fail to
// reach its origin. The agent says so in its registration, so the edge
// stops sending it connections after the first failure, and sends them
// again once the agent's probes find the origin back.
func TestExposeTCPOriginDown(t *testing.T) {
	const host = "db.sluice.test"
	r, _ := startEdgeService(t, func(o *EdgeOptions) {
		o.Registry.Hostnames = map[string]registry.Hostname{host: {Peers: []string{"db-a", "db-b"}}}
		o.Edge.TCP = []edge.TCPRoute{{Addr: "127.0.0.1:0", Hostname: host}}
	})
	edgeTCP := r.svc.Edge().TCPAddrs()[0].String()
	a := namedEcho(t, "a", "127.0.0.1:0")
	b := namedEcho(t, "b", "127.0.0.1:0")
	bAddr := b.Addr().String()
	startAgent(t, r, "db-a", host, "tcp://"+a.Addr().String(), nil)
	startAgent(t, r, "db-b", host, "tcp://"+bAddr, nil)

	// ask opens a connection through the edge and returns the name of
	// the origin that echoed, or "" if the connection ended unanswered.
	ask := func() string {
		c, err := net.DialTimeout("tcp", edgeTCP, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, "hi\n")
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return ""
		}
		name, _, _ := strings.Cut(line, " ")
		return name
	}
	served := func(n int) map[string]int {
		got := map[string]int{}
		for range n {
			got[ask()]++
		}
		return got
	}
	replicaB := func() registry.Replica {
		svcs, err := r.unix.Services(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range svcs {
			for _, rep := range s.Replicas {
				if rep.Peer == "db-b" {
					return rep
				}
			}
		}
		t.Fatalf("db-b is not listed: %+v", svcs)
		return registry.Replica{}
	}
	if got := served(10); got["a"] != 5 || got["b"] != 5 {
		t.Fatalf("both origins up, 10 connections: %v; want 5 each", got)
	}

	b.Close()
	// The edge alternates, so one of the next two connections goes to b
	// and ends unanswered; b's agent then tells the gateway. (Connections
	// that arrive before its word do too.)
	if got := served(2); got[""] != 1 || got["a"] != 1 {
		t.Errorf("2 connections right after b's origin died: %v; want one unanswered, one by a", got)
	}
	waitFor(t, 5*time.Second, func() bool { return replicaB().OriginDown })
	if rep := replicaB(); rep.Healthy || rep.Weight != 0 {
		t.Errorf("db-b with its origin down: %+v; want unhealthy, weight 0", rep)
	}
	if got := served(20); got["a"] != 20 {
		t.Errorf("b's origin down, 20 connections: %v; want all answered by a", got)
	}

	// b's origin comes back on its address; its agent finds it by itself.
	nb := namedEcho(t, "b", bAddr)
	defer nb.Close()
	waitFor(t, 10*time.Second, func() bool { return replicaB().Healthy })
	if got := served(10); got["a"] != 5 || got["b"] != 5 {
		t.Errorf("b's origin back, 10 connections: %v; want 5 each", got)
	}
}

// namedEcho is a TCP origin at addr that answers each line with its name
// and the line.
func namedEcho(t *testing.T, name, addr string) net.Listener {
	return lineOrigin(t, addr, func(c net.Conn, br *bufio.Reader) string { return name })
}

// proxiedEcho is a TCP origin behind a PROXY protocol v2 header: it reads
// the header, then echoes each line prefixed with the client address the
// header carried.
func proxiedEcho(t *testing.T) net.Listener {
	return lineOrigin(t, "127.0.0.1:0", func(c net.Conn, br *bufio.Reader) string {
		hdr := make([]byte, 16)
		if _, err := io.ReadFull(br, hdr); err != nil || string(hdr[:12]) != "\r\n\r\n\x00\r\nQUIT\n" || hdr[12] != 0x21 || hdr[13] != 0x11 {
			io.WriteString(c, "bad PROXY header\n")
			return ""
		}
		addrs := make([]byte, binary.BigEndian.Uint16(hdr[14:]))
		if _, err := io.ReadFull(br, addrs); err != nil || len(addrs) < 12 {
			return ""
		}
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(addrs[0:4])), binary.BigEndian.Uint16(addrs[8:])).String()
	})
}

// lineOrigin is a TCP origin at addr that, on each connection, asks
// prefix for the prefix of its answers (which may read a header first;
// "" closes the connection), then answers each line with the prefix and
// the line, until the test ends.
func lineOrigin(t *testing.T, addr string, prefix func(net.Conn, *bufio.Reader) string) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
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
			go func() {
				defer c.Close()
				br := bufio.NewReader(c)
				p := prefix(c, br)
				if p == "" {
					return
				}
				for {
					line, err := br.ReadString('\n')
					if err != nil {
						return
					}
					io.WriteString(c, p+" "+line)
				}
			}()
		}
	}()
	return ln
}

// An agent outlives its gateway: when the gateway restarts (same key and
// peers, nothing of the registry), the agent finds it again and
// registers anew by itself.
func TestExposeAgentReturnsAfterGatewayRestart(t *testing.T) {
	const host = "back.sluice.test"
	dir := t.TempDir()
	opts := testOptions(t, dir)
	opts.Endpoint = fmt.Sprintf("127.0.0.1:%d", opts.ListenPort)
	opts.Edge = &EdgeOptions{
		Registry: registry.Options{Lease: 2 * time.Second},
		Edge:     edge.Options{HTTPAddr: freeTCPAddr(t), DialTimeout: time.Second},
	}
	_, stop := runService(t, opts)
	np, err := AddPeer(context.Background(), dir, PeerRequest{Name: "app"})
	if err != nil {
		t.Fatal(err)
	}
	o := newOrigin(t, "app", nil)
	runAgent(t, np.Config.String(), host, o.srv.URL, nil)
	hc := &http.Client{Timeout: 5 * time.Second}
	if code, body, err := edgeGet(hc, opts.Edge.Edge.HTTPAddr, host, "/", nil); err != nil || code != http.StatusOK {
		t.Fatalf("before the restart: %d %q %v", code, body, err)
	}

	if err := stop(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	runService(t, opts)
	// The agent's tunnel gives a silent gateway 3 s (StaleAfter), then
	// handshakes afresh; WireGuard alone would take 15 s or more.
	deadline := time.Now().Add(12 * time.Second)
	for {
		code, _, err := edgeGet(hc, opts.Edge.Edge.HTTPAddr, host, "/", nil)
		if err == nil && code == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the agent did not come back to the restarted gateway: last answer %d, %v", code, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("served again %v after the gateway restarted", time.Since(start).Round(100*time.Millisecond))
}

// Stopping the gateway lets the edge's requests in flight finish within
// the grace period: their agents stay reachable, and registered, until
// then.
func TestExposeDrainsOnShutdown(t *testing.T) {
	const host = "slow.sluice.test"
	dir := t.TempDir()
	opts := testOptions(t, dir)
	opts.Endpoint = fmt.Sprintf("127.0.0.1:%d", opts.ListenPort)
	opts.ShutdownGrace = 20 * time.Second
	opts.Edge = &EdgeOptions{
		Registry: registry.Options{Lease: 2 * time.Second},
		Edge:     edge.Options{HTTPAddr: "127.0.0.1:0", DialTimeout: time.Second},
	}
	svc, stop := runService(t, opts)
	np, err := AddPeer(context.Background(), dir, PeerRequest{Name: "slow"})
	if err != nil {
		t.Fatal(err)
	}
	arrived := make(chan struct{}, 1)
	o := newOrigin(t, "slow", func(mux *http.ServeMux) {
		mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
			arrived <- struct{}{}
			// Longer than a lease: the agent must keep its place while
			// the gateway drains.
			time.Sleep(3 * time.Second)
			io.WriteString(w, "finished")
		})
	})
	runAgent(t, np.Config.String(), host, o.srv.URL, nil)

	type answer struct {
		code int
		body string
		err  error
	}
	got := make(chan answer, 1)
	go func() {
		code, body, err := edgeGet(&http.Client{Timeout: 20 * time.Second}, svc.Edge().HTTPAddr().String(), host, "/slow", nil)
		got <- answer{code, body, err}
	}()
	select {
	case <-arrived:
	case <-time.After(10 * time.Second):
		t.Fatal("the request never reached the origin")
	}
	// Stop the gateway while the request is at the origin.
	stopped := time.Now()
	stopErr := make(chan error, 1)
	go func() { stopErr <- stop() }()
	a := <-got
	if a.err != nil || a.code != http.StatusOK || a.body != "finished" {
		t.Fatalf("the request in flight at shutdown: %d %q %v; want it to finish", a.code, a.body, a.err)
	}
	if err := <-stopErr; err != nil {
		t.Fatal(err)
	}
	t.Logf("answered, and the gateway stopped, %v after the stop", time.Since(stopped).Round(10*time.Millisecond))
}

// A reload changes the edge's policies and the registry's hostnames at
// once, for the next request.
func TestExposeReload(t *testing.T) {
	const host = "reload.sluice.test"
	var next atomic.Pointer[EdgeReload]
	eo := &EdgeOptions{
		Registry: registry.Options{Lease: 2 * time.Second},
		Edge:     edge.Options{HTTPAddr: "127.0.0.1:0", DialTimeout: time.Second},
	}
	r := startRunning(t, func(o *Options) {
		o.Edge = eo
		o.Reload = func(context.Context) (Reloadable, []byte, error) {
			return Reloadable{Edge: next.Load()}, []byte("reloaded\n"), nil
		}
	})
	waitFor(t, 10*time.Second, func() bool { return r.svc.Edge() != nil })
	edgeAddr := r.svc.Edge().HTTPAddr().String()
	o := newOrigin(t, "reload", nil)
	startAgent(t, r, "reloader", host, o.srv.URL, nil)
	hc := &http.Client{Timeout: 10 * time.Second}
	if code, _, err := edgeGet(hc, edgeAddr, host, "/", nil); err != nil || code != http.StatusOK {
		t.Fatalf("before the reload: %d %v", code, err)
	}

	next.Store(&EdgeReload{Policies: map[string]edge.Policy{host: {Deny: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}}})
	if err := r.unix.Reload(context.Background()); err != nil {
		t.Fatal(err)
	}
	before := o.hits.Load()
	if code, _, err := edgeGet(hc, edgeAddr, host, "/", nil); err != nil || code != http.StatusForbidden {
		t.Fatalf("after a reload that denies loopback: %d %v; want 403", code, err)
	}
	if o.hits.Load() != before {
		t.Fatal("the refused request reached the origin")
	}

	// A reload that does not validate changes nothing.
	next.Store(&EdgeReload{Policies: map[string]edge.Policy{host: {BasicUsers: map[string]string{"u": "$2a$broken"}}}})
	if err := r.unix.Reload(context.Background()); err == nil {
		t.Fatal("a reload with a broken bcrypt hash was taken")
	}
	if code, _, err := edgeGet(hc, edgeAddr, host, "/", nil); err != nil || code != http.StatusForbidden {
		t.Fatalf("after a rejected reload: %d %v; want the last good policy's 403", code, err)
	}
}
