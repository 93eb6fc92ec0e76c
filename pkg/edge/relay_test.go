package edge

import (
	"bufio"
	"errors"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-vpn/sluice/pkg/expose"
	"github.com/sluice-vpn/sluice/relay/relaytest"
)

// TestTCPRouteResetReachesReplica: a client that resets its connection to
// a TCP route resets the edge's connection to the replica too, at once,
// through the wrappers both connections are in.
func TestTCPRouteResetReachesReplica(t *testing.T) {
	addr, next := relaytest.ResetOrigin(t)
	reg := newRegistry(t, nil)
	register(t, reg, "db.example.com", addr.Port(), expose.ProtocolTCP, nil)
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
