package edge

import (
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/sluice-vpn/sluice/pkg/edge/registry"
	"github.com/sluice-vpn/sluice/pkg/expose"
)

// A replica that vanishes mid-request answers nothing, not even a reset.
// Once the registry lets it go, the edge closes its connections, and the
// request that was waiting on one moves to a replica that answers.
func TestVanishedReplicaReleasesRequests(t *testing.T) {
	const host = "v.example.com"
	reg := newRegistry(t, nil)
	hole, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer hole.Close()
	accepted := make(chan net.Conn, 4)
	go func() {
		for {
			c, err := hole.Accept()
			if err != nil {
				return
			}
			accepted <- c // read nothing, answer nothing, close nothing
		}
	}()
	holePort := portOf(t, hole.Addr())
	register(t, reg, host, holePort, expose.ProtocolHTTP, nil)
	e := startEdge(t, Options{Registry: reg, HTTPAddr: "127.0.0.1:0"})
	c := testClient(e.HTTPAddr())
	c.Timeout = 20 * time.Second

	type result struct {
		body string
		code int
	}
	done := make(chan result, 1)
	start := time.Now()
	go func() {
		resp, body := get(t, c, "http://"+host+"/")
		done <- result{body, resp.StatusCode}
	}()
	var held net.Conn
	select {
	case held = <-accepted:
		defer held.Close()
	case <-time.After(10 * time.Second):
		t.Fatal("the request never reached the replica")
	}
	_, good := origin(t, named("good"))
	register(t, reg, host, good, expose.ProtocolHTTP, nil)
	select {
	case r := <-done:
		t.Fatalf("the request finished while its replica was still registered: %d %q", r.code, r.body)
	case <-time.After(2 * sweepInterval):
	}
	peer := registry.Peer{Name: "agent-" + host, PublicKey: "key-" + host}
	if err := reg.Deregister(peer, host, holePort); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-done:
		if r.code != http.StatusOK || r.body != "good" {
			t.Fatalf("after the replica went: %d %q, want the good replica's answer", r.code, r.body)
		}
		t.Logf("answered %v after it was sent", time.Since(start).Round(time.Millisecond))
	case <-time.After(3 * sweepInterval):
		t.Fatal("the request still waits on a replica that is gone")
	}
	// The held connection was closed from the edge's side.
	held.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 4096)
	for {
		if _, err := held.Read(buf); err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				t.Fatal("the edge kept its connection to the vanished replica")
			}
			break
		}
	}
}
