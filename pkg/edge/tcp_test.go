package edge

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sluice-vpn/sluice/pkg/expose"
)

// tcpOrigin is a TCP service behind the edge. With proxy set it first
// reads a PROXY v2 header and answers with the addresses in it; then it
// echoes until the client half-closes, and says "bye".
type tcpOrigin struct {
	port  uint16
	conns atomic.Int64
}

func startTCPOrigin(t *testing.T, proxy bool) *tcpOrigin {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	o := &tcpOrigin{port: portOf(t, ln.Addr())}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var open []net.Conn
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range open {
			c.Close()
		}
		mu.Unlock()
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
			o.conns.Add(1)
			mu.Lock()
			open = append(open, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				br := bufio.NewReader(c)
				if proxy {
					src, dst, err := parseProxyV2(br)
					if err != nil {
						fmt.Fprintf(c, "bad header: %v\n", err)
						return
					}
					fmt.Fprintf(c, "%s %s\n", src, dst)
				}
				io.Copy(c, br)
				io.WriteString(c, "bye")
			}()
		}
	}()
	return o
}

func TestTCPRouteProxyV2(t *testing.T) {
	reg := newRegistry(t, nil)
	o := startTCPOrigin(t, true)
	register(t, reg, "db.example.com", o.port, expose.ProtocolTCP, nil)
	e := startEdge(t, Options{Registry: reg,
		TCP:       []TCPRoute{{Addr: "127.0.0.1:0", Hostname: "db.example.com"}},
		Hostnames: map[string]Policy{"db.example.com": {ProxyProtocol: true}},
	})
	c, err := net.Dial("tcp", e.TCPAddrs()[0].String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	if want := c.LocalAddr().String() + " " + e.TCPAddrs()[0].String() + "\n"; line != want {
		t.Fatalf("origin saw PROXY addresses %q, want %q", line, want)
	}
	io.WriteString(c, "ping")
	c.(*net.TCPConn).CloseWrite()
	rest, err := io.ReadAll(br)
	if err != nil || string(rest) != "pingbye" {
		t.Fatalf("after the half-close: %q %v, want the echo and bye", rest, err)
	}
}

func TestTCPRoutePlainAndFailover(t *testing.T) {
	reg := newRegistry(t, nil)
	tun := newFakeTunnel()
	o := startTCPOrigin(t, false)
	dead := startTCPOrigin(t, false)
	register(t, reg, "db.example.com", o.port, expose.ProtocolTCP, nil)
	register(t, reg, "db.example.com", dead.port, expose.ProtocolTCP, nil)
	tun.setFail(netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), dead.port), errors.New("peer gone"))
	e := startEdge(t, Options{Registry: reg, Dial: tun.Dial, TCP: []TCPRoute{{Addr: "127.0.0.1:0", Hostname: "db.example.com"}}})
	for i := 0; i < 3; i++ {
		c, err := net.Dial("tcp", e.TCPAddrs()[0].String())
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprintf(c, "hello %d", i)
		c.(*net.TCPConn).CloseWrite()
		got, err := io.ReadAll(c)
		c.Close()
		if want := fmt.Sprintf("hello %dbye", i); err != nil || string(got) != want {
			t.Fatalf("connection %d: %q %v, want %q (no PROXY header without the policy)", i, got, err, want)
		}
	}
	if dead.conns.Load() != 0 || tun.dialsTo(netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), dead.port)) == 0 {
		t.Errorf("the failing replica: %d connections, %d dials; want it tried and never reached",
			dead.conns.Load(), tun.dialsTo(netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), dead.port)))
	}
	if o.conns.Load() != 3 {
		t.Errorf("origin saw %d connections, want 3", o.conns.Load())
	}
}

// closedAtOnce reports whether the edge closes c without a byte.
func closedAtOnce(t *testing.T, c net.Conn) bool {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	n, err := c.Read(make([]byte, 1))
	return n == 0 && err != nil && !isTimeout(err)
}

func TestTCPUnknownAndRefused(t *testing.T) {
	reg := newRegistry(t, nil)
	o := startTCPOrigin(t, false)
	register(t, reg, "denied.example.com", o.port, expose.ProtocolTCP, nil)
	// A hostname served over HTTP is not a TCP route's to reach: its
	// requests pass the HTTP policy (paths, credentials) that a byte
	// stream would skip.
	register(t, reg, "web.example.com", o.port, expose.ProtocolHTTP, nil)
	e := startEdge(t, Options{Registry: reg,
		TCP: []TCPRoute{
			{Addr: "127.0.0.1:0", Hostname: "nothing.example.com"},
			{Addr: "127.0.0.1:0", Hostname: "denied.example.com"},
			{Addr: "127.0.0.1:0", Hostname: "web.example.com"},
		},
		Hostnames: map[string]Policy{"denied.example.com": {Deny: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}},
	})
	for i, a := range e.TCPAddrs() {
		c, err := net.Dial("tcp", a.String())
		if err != nil {
			t.Fatal(err)
		}
		if !closedAtOnce(t, c) {
			t.Errorf("route %d: the connection was not closed at once", i)
		}
		c.Close()
	}
	if o.conns.Load() != 0 {
		t.Errorf("a refused connection reached the origin")
	}
	mustMetric(t, e, "sluice_edge_unknown_host_total", map[string]string{"listener": "tcp:" + e.TCPAddrs()[0].String()}, 1)
	mustMetric(t, e, "sluice_edge_unknown_host_total", map[string]string{"listener": "tcp:" + e.TCPAddrs()[1].String()}, 0)
	mustMetric(t, e, "sluice_edge_refused_total", map[string]string{"hostname": "denied.example.com", "reason": "ip"}, 1)
	mustMetric(t, e, "sluice_edge_refused_total", map[string]string{"hostname": "web.example.com", "reason": "no_replica"}, 1)
}

func TestTCPRateLimit(t *testing.T) {
	reg := newRegistry(t, nil)
	o := startTCPOrigin(t, false)
	register(t, reg, "db.example.com", o.port, expose.ProtocolTCP, nil)
	e := startEdge(t, Options{Registry: reg,
		TCP:       []TCPRoute{{Addr: "127.0.0.1:0", Hostname: "db.example.com"}},
		Hostnames: map[string]Policy{"db.example.com": {RateTotal: 0.01, BurstTotal: 2}},
	})
	for i := 0; i < 3; i++ {
		c, err := net.Dial("tcp", e.TCPAddrs()[0].String())
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(c, "x")
		c.(*net.TCPConn).CloseWrite()
		got, _ := io.ReadAll(c)
		c.Close()
		if want := map[bool]string{true: "xbye", false: ""}[i < 2]; string(got) != want {
			t.Errorf("connection %d: %q, want %q", i, got, want)
		}
	}
	mustMetric(t, e, "sluice_edge_refused_total", map[string]string{"hostname": "db.example.com", "reason": "rate"}, 1)
}

func TestTCPMaxConnsAndClose(t *testing.T) {
	reg := newRegistry(t, nil)
	o := startTCPOrigin(t, false)
	register(t, reg, "db.example.com", o.port, expose.ProtocolTCP, nil)
	e := startEdge(t, Options{Registry: reg, MaxConns: 2, TCP: []TCPRoute{{Addr: "127.0.0.1:0", Hostname: "db.example.com"}}})
	addr := e.TCPAddrs()[0].String()
	listener := "tcp:" + addr

	var held []net.Conn
	for i := 0; i < 2; i++ {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(c, "hi")
		if _, err := io.ReadFull(c, make([]byte, 2)); err != nil {
			t.Fatalf("held connection %d: %v", i, err)
		}
		held = append(held, c)
	}
	over, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer over.Close()
	if !closedAtOnce(t, over) {
		t.Error("a connection over MaxConns was not closed at once")
	}
	mustMetric(t, e, "sluice_edge_connections_refused_total", map[string]string{"listener": listener}, 1)
	mustMetric(t, e, "sluice_edge_connections_active", map[string]string{"listener": listener}, 2)
	if o.conns.Load() != 2 {
		t.Errorf("origin saw %d connections, want 2", o.conns.Load())
	}

	// Close ends the relays and waits for them.
	done := make(chan struct{})
	go func() {
		e.Close()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not return with relays open")
	}
	for i, c := range held {
		if got, err := io.ReadAll(c); err != nil && !strings.Contains(err.Error(), "reset") || len(got) != 0 {
			t.Errorf("held connection %d after Close: %q %v", i, got, err)
		}
	}
	mustMetric(t, e, "sluice_edge_connections_active", map[string]string{"listener": listener}, 0)
	if _, err := net.Dial("tcp", addr); err == nil {
		t.Error("the listener is still open after Close")
	}
}
