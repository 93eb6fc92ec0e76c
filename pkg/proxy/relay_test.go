package proxy_test

import (
	"bufio"
	"errors"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-vpn/sluice/pkg/proxy"
	"github.com/sluice-vpn/sluice/relay/relaytest"
)

// TestSOCKS5ResetReachesServer: a client that resets its connection
// through the proxy resets the proxy's connection to the server too, at
// once, while the server waits for more.
func TestSOCKS5ResetReachesServer(t *testing.T) {
	origin, next := relaytest.ResetOrigin(t)
	_, addr := startSOCKS(t, proxy.SOCKS5Options{Dialer: newHostDialer()})
	c := dialSOCKS(t, addr)
	if code, err := c.connect("127.0.0.1", origin.Port()); err != nil || code != 0 {
		t.Fatalf("CONNECT: reply %d, %v", code, err)
	}
	c.conn.Write([]byte("line\n"))
	if line, err := bufio.NewReader(c.conn).ReadString('\n'); err != nil || line != "ok\n" {
		t.Fatalf("read %q, %v", line, err)
	}
	c.conn.(*net.TCPConn).SetLinger(0)
	c.conn.Close()
	select {
	case err := <-next:
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("the server's read: %v; want ECONNRESET", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the server's connection is still open 5 s after the client's reset")
	}
}
