package edge

import (
	"bufio"
	"errors"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-vpn/sluice/pkg/expose"
)

// TestTCPRouteResetReachesReplica: a client that resets its connection to
// a TCP route resets the edge's connection to the replica too, at once,
// through the wrappers both connections are in.
func TestTCPRouteResetReachesReplica(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	next := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			next <- err
			return
		}
		defer c.Close()
		r := bufio.NewReader(c)
		if _, err := r.ReadString('\n'); err != nil {
			next <- err
			return
		}
		c.Write([]byte("ok\n"))
		c.SetReadDeadline(time.Now().Add(time.Minute))
		_, err = r.ReadByte()
		next <- err
	}()
	reg := newRegistry(t, nil)
	register(t, reg, "db.example.com", portOf(t, ln.Addr()), expose.ProtocolTCP, nil)
	e := startEdge(t, Options{Registry: reg, Dial: newFakeTunnel().Dial, TCP: []TCPRoute{{Addr: "127.0.0.1:0", Hostname: "db.example.com"}}})

	c, err := net.Dial("tcp4", e.TCPAddrs()[0].String())
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	c.Write([]byte("line\n"))
	if line, err := bufio.NewReader(c).ReadString('\n'); err != nil || line != "ok\n" {
		t.Fatalf("read %q, %v", line, err)
	}
	c.(*net.TCPConn).SetLinger(0)
	c.Close()
	select {
	case err := <-next:
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("the replica's read: %v; want ECONNRESET", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the replica's connection is still open 5 s after the client's reset")
	}
}
