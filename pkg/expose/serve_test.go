package expose

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// newEchoOrigin serves TCP echo on 127.0.0.1, passing a half-close back,
// and returns its address.
func newEchoOrigin(t *testing.T) string {
	t.Helper()
	return newTCPOrigin(t, echo)
}

func echo(c *net.TCPConn) {
	io.Copy(c, c)
	c.CloseWrite()
}

// newTCPOrigin serves each connection with handle on 127.0.0.1 and
// returns its address; handle's connection is closed after it.
func newTCPOrigin(t *testing.T, handle func(*net.TCPConn)) string {
	t.Helper()
	addr, err := serveTCPOrigin(t, "127.0.0.1:0", handle)
	if err != nil {
		t.Fatal(err)
	}
	return addr
}

// serveTCPOrigin is newTCPOrigin at addr, which may be taken.
func serveTCPOrigin(t *testing.T, addr string, handle func(*net.TCPConn)) (string, error) {
	ln, err := net.Listen("tcp4", addr)
	if err != nil {
		return "", err
	}
	var wg sync.WaitGroup
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				handle(c.(*net.TCPConn))
			}()
		}
	}()
	return ln.Addr().String(), nil
}

// originHandler is the HTTP origin: /hello says who asked for what,
// /upload hashes the body.
func originHandler(w http.ResponseWriter, r *http.Request) {
	switch r.URL.Path {
	case "/hello":
		alpn := ""
		if r.TLS != nil {
			alpn = r.TLS.NegotiatedProtocol
		}
		fmt.Fprintf(w, "hello host=%s proto=%s alpn=%s", r.Host, r.Proto, alpn)
	case "/upload":
		h := sha256.New()
		n, err := io.Copy(h, r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		fmt.Fprintf(w, "%d %x", n, h.Sum(nil))
	default:
		http.NotFound(w, r)
	}
}

func get(t *testing.T, c *http.Client, url string) (int, string) {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

func TestProxiesHTTP(t *testing.T) {
	origin := httptest.NewServer(http.HandlerFunc(originHandler))
	defer origin.Close()
	cs := newControlServer(t, fastLease)
	a := startAgent(t, cs, Options{To: origin.URL})
	edge, conns := edgeClient(t, a.Agent)

	// The Host the edge sends reaches the origin untouched, and
	// keep-alive holds: three requests, one connection.
	for range 3 {
		code, body := get(t, edge, "http://app.example.com/hello")
		if code != 200 || body != "hello host=app.example.com proto=HTTP/1.1 alpn=" {
			t.Fatalf("GET /hello: %d %q", code, body)
		}
	}
	if code, _ := get(t, edge, "http://app.example.com/nothing"); code != 404 {
		t.Errorf("GET /nothing: %d; want the origin's 404", code)
	}
	st := a.Stats()
	if *conns != 1 || st.Accepted != 1 {
		t.Errorf("edge opened %d connections, agent accepted %d; want 1 and 1 (keep-alive)", *conns, st.Accepted)
	}
	if st.BytesToOrigin == 0 || st.BytesFromOrigin == 0 || st.Active != 1 {
		t.Errorf("stats %+v; want bytes both ways and the kept-alive connection active", st)
	}
}

func TestUploadsByteExact(t *testing.T) {
	origin := httptest.NewServer(http.HandlerFunc(originHandler))
	defer origin.Close()
	cs := newControlServer(t, fastLease)
	a := startAgent(t, cs, Options{To: origin.URL})
	edge, _ := edgeClient(t, a.Agent)

	body := make([]byte, 8<<20)
	rand.Read(body)
	sum := sha256.Sum256(body)
	resp, err := edge.Post("http://app.example.com/upload", "application/octet-stream", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if want := fmt.Sprintf("%d %s", len(body), hex.EncodeToString(sum[:])); string(got) != want {
		t.Fatalf("origin got %q; want %q", got, want)
	}
	// The relay counts a write once it has returned, which may be after
	// the origin has read it and answered.
	deadline := time.Now().Add(2 * time.Second)
	for a.Stats().BytesToOrigin < uint64(len(body)) && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if st := a.Stats(); st.BytesToOrigin < uint64(len(body)) {
		t.Errorf("BytesToOrigin %d; want at least %d", st.BytesToOrigin, len(body))
	}
}

func TestTCPEcho(t *testing.T) {
	cs := newControlServer(t, fastLease)
	a := startAgent(t, cs, Options{To: "tcp://" + newEchoOrigin(t)})
	c := dialAgent(t, a.Agent)
	c.SetDeadline(time.Now().Add(5 * time.Second))
	r := bufio.NewReader(c)
	for i := range 20 {
		line := fmt.Sprintf("line %d %s\n", i, strings.Repeat("x", i*100))
		if _, err := c.Write([]byte(line)); err != nil {
			t.Fatal(err)
		}
		got, err := r.ReadString('\n')
		if err != nil || got != line {
			t.Fatalf("echo of line %d: %q, %v", i, got, err)
		}
	}
	c.CloseWrite()
	if rest, err := io.ReadAll(r); err != nil || len(rest) != 0 {
		t.Errorf("after half-close: %q, %v; want EOF", rest, err)
	}
}

func TestHalfClose(t *testing.T) {
	// The origin answers only once it has read to the end.
	origin := newTCPOrigin(t, func(c *net.TCPConn) {
		n, err := io.Copy(io.Discard, c)
		if err != nil {
			return
		}
		fmt.Fprintf(c, "got %d bytes", n)
	})
	cs := newControlServer(t, fastLease)
	a := startAgent(t, cs, Options{To: "tcp://" + origin})
	c := dialAgent(t, a.Agent)
	c.SetDeadline(time.Now().Add(5 * time.Second))
	payload := bytes.Repeat([]byte("0123456789"), 100000)
	if _, err := c.Write(payload); err != nil {
		t.Fatal(err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c)
	if err != nil || string(got) != fmt.Sprintf("got %d bytes", len(payload)) {
		t.Fatalf("answer after half-close: %q, %v", got, err)
	}
	eventually(t, "the relay to end", func() bool { return a.Stats().Active == 0 })
}

func TestHTTPSOrigin(t *testing.T) {
	origin := httptest.NewUnstartedServer(http.HandlerFunc(originHandler))
	// The unverifiable case makes the origin log a handshake error.
	origin.Config.ErrorLog = log.New(io.Discard, "", 0)
	origin.StartTLS()
	defer origin.Close()
	cs := newControlServer(t, fastLease)
	want := "hello host=app.example.com proto=HTTP/1.1 alpn=http/1.1"

	t.Run("insecure", func(t *testing.T) {
		a := startAgent(t, cs, Options{To: origin.URL, InsecureSkipVerify: true})
		edge, _ := edgeClient(t, a.Agent)
		if code, body := get(t, edge, "http://app.example.com/hello"); code != 200 || body != want {
			t.Fatalf("GET /hello: %d %q; want %q", code, body, want)
		}
	})
	t.Run("verified", func(t *testing.T) {
		roots := x509.NewCertPool()
		roots.AddCert(origin.Certificate())
		a := startAgent(t, cs, Options{To: origin.URL, RootCAs: roots})
		edge, _ := edgeClient(t, a.Agent)
		if code, body := get(t, edge, "http://app.example.com/hello"); code != 200 || body != want {
			t.Fatalf("GET /hello: %d %q; want %q", code, body, want)
		}
	})
	t.Run("unverifiable", func(t *testing.T) {
		a := startAgent(t, cs, Options{To: origin.URL})
		edge, _ := edgeClient(t, a.Agent)
		resp, err := edge.Get("http://app.example.com/hello")
		if err == nil {
			resp.Body.Close()
			t.Fatalf("GET through an origin whose certificate cannot be verified: %s", resp.Status)
		}
		if st := a.Stats(); st.OriginErrors == 0 {
			t.Errorf("stats %+v; want an origin error", st)
		}
	})
}

func TestOriginUnreachable(t *testing.T) {
	cs := newControlServer(t, fastLease)
	a := startAgent(t, cs, Options{To: fmt.Sprintf("tcp://127.0.0.1:%d", freePort(t))})
	c := dialAgent(t, a.Agent)
	if err := readClosed(c); err != nil {
		t.Fatalf("connection to an agent whose origin is down: %v", err)
	}
	eventually(t, "an origin error counted", func() bool { return a.Stats().OriginErrors == 1 })
}

// An agent that finds its origin down tells the gateway at once, without
// waiting for its next refresh, and tells it again when probes find the
// origin back: the edge's own connection to the agent succeeds either
// way, so for TCP only the agent can know.
func TestOriginHealthReported(t *testing.T) {
	slow := Lease{ID: "r1", TTLSeconds: 60, RefreshSeconds: 20, Weight: 1}
	cs := newControlServer(t, slow)
	port := freePort(t)
	a := startAgent(t, cs, Options{To: fmt.Sprintf("tcp://127.0.0.1:%d", port)})
	waitRegistered(t, a.Agent)
	originDown := func(want bool) []put {
		var puts []put
		eventually(t, fmt.Sprintf("a registration saying origin_down=%v", want), func() bool {
			puts, _ = cs.reg.received()
			return puts[len(puts)-1].reg.OriginDown == want
		})
		return puts
	}
	if puts := originDown(false); len(puts) != 1 {
		t.Fatalf("%d registrations before anything happened; want 1", len(puts))
	}

	if err := readClosed(dialAgent(t, a.Agent)); err != nil {
		t.Fatalf("connection to an agent whose origin is down: %v", err)
	}
	puts := originDown(true)
	if len(puts) != 2 {
		t.Errorf("%d registrations; want the first and one saying the origin is down", len(puts))
	}
	if st := a.Stats(); !st.OriginDown || st.OriginErrors != 1 {
		t.Errorf("stats %+v; want the origin down after one error", st)
	}
	// Probes keep failing meanwhile; nothing more is said.
	time.Sleep(100 * time.Millisecond)
	if puts, _ := cs.reg.received(); len(puts) != 2 {
		t.Errorf("%d registrations while the origin stays down; want 2", len(puts))
	}

	// The origin comes back on its port: a probe finds it, with no
	// connection from the edge needed.
	if _, err := serveTCPOrigin(t, fmt.Sprintf("127.0.0.1:%d", port), echo); err != nil {
		t.Skipf("the origin's port was taken meanwhile: %v", err)
	}
	originDown(false)
	if st := a.Stats(); st.OriginDown || st.Accepted != 1 {
		t.Errorf("stats %+v; want the origin up, with no connection from the edge since", st)
	}
	c := dialAgent(t, a.Agent)
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write([]byte("back")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4)
	if _, err := io.ReadFull(c, got); err != nil || string(got) != "back" {
		t.Fatalf("echo through the agent after the origin came back: %q, %v", got, err)
	}
}

func TestMaxConns(t *testing.T) {
	cs := newControlServer(t, fastLease)
	a := startAgent(t, cs, Options{To: "tcp://" + newEchoOrigin(t), MaxConns: 2})
	echo := func(c net.Conn) error {
		c.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.Write([]byte("hi")); err != nil {
			return err
		}
		b := make([]byte, 2)
		if _, err := io.ReadFull(c, b); err != nil {
			return err
		}
		if string(b) != "hi" {
			return fmt.Errorf("echo %q", b)
		}
		return nil
	}
	c1, c2 := dialAgent(t, a.Agent), dialAgent(t, a.Agent)
	for _, c := range []net.Conn{c1, c2} {
		if err := echo(c); err != nil {
			t.Fatal(err)
		}
	}
	c3 := dialAgent(t, a.Agent)
	if err := readClosed(c3); err != nil {
		t.Fatalf("third connection with MaxConns 2: %v", err)
	}
	if st := a.Stats(); st.Refused != 1 || st.Active != 2 || st.Accepted != 2 {
		t.Errorf("stats %+v; want 1 refused, 2 active, 2 accepted", st)
	}
	// A slot given back is taken again.
	c1.Close()
	eventually(t, "a slot to free", func() bool { return a.Stats().Active == 1 })
	if err := echo(dialAgent(t, a.Agent)); err != nil {
		t.Fatalf("a connection after one closed: %v", err)
	}
}

func TestOnlyTheGateway(t *testing.T) {
	var mu sync.Mutex
	seen := 0
	origin := newTCPOrigin(t, func(c *net.TCPConn) {
		mu.Lock()
		seen++
		mu.Unlock()
		io.Copy(c, c)
	})
	cs := newControlServer(t, fastLease)
	a := startAgent(t, cs, Options{To: "tcp://" + origin})

	// 127.0.0.2 stands for another peer of the tunnel.
	c := dialAgentFrom(t, a.Agent, "127.0.0.2")
	c.Write([]byte("let me in"))
	if err := readClosed(c); err != nil {
		t.Fatalf("connection from 127.0.0.2: %v", err)
	}
	st := a.Stats()
	mu.Lock()
	n := seen
	mu.Unlock()
	if st.Foreign != 1 || st.Accepted != 0 || n != 0 {
		t.Errorf("stats %+v, origin saw %d connections; want 1 foreign, none accepted or relayed", st, n)
	}
	// The gateway's address still gets through.
	g := dialAgent(t, a.Agent)
	g.SetDeadline(time.Now().Add(2 * time.Second))
	g.Write([]byte("x"))
	if _, err := io.ReadFull(g, make([]byte, 1)); err != nil {
		t.Fatalf("connection from the gateway's address: %v", err)
	}
}
