package proxy_test

import (
	"bufio"
	"errors"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-vpn/sluice/pkg/proxy"
)

// TestSOCKS5ResetReachesServer: a client that resets its connection
// through the proxy resets the proxy's connection to the server too, at
// once, while the server waits for more.
func TestSOCKS5ResetReachesServer(t *testing.T) {
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
	_, addr := startSOCKS(t, proxy.SOCKS5Options{Dialer: newHostDialer()})
	c := dialSOCKS(t, addr)
	if code, err := c.connect("127.0.0.1", uint16(ln.Addr().(*net.TCPAddr).Port)); err != nil || code != 0 {
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
