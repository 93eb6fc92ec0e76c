package gateway

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"
)

// TestClientResetEndsFlow is issue 14 §3 through the whole gateway: a
// client sends a line, the origin answers and waits, and the client
// resets its connection. The flow must leave the table and the egress
// socket close at once, not after the established timeout.
func TestClientResetEndsFlow(t *testing.T) {
	h := start(t, nil)
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

	c, err := h.client.DialContext(context.Background(), "tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("line\n")); err != nil {
		t.Fatal(err)
	}
	var b [1]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		t.Fatal(err)
	}
	if n := h.srv.Table().Len(); n != 1 {
		t.Fatalf("%d flows in the table; want the one", n)
	}
	// "k\n" is unread: the client's stack answers the close with a RST.
	c.Close()

	select {
	case err := <-next:
		var ne net.Error
		if err == nil || errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("the origin's read: %v; want the socket closed", err)
		}
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("the origin's read: %v; want ECONNRESET", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the egress socket is still open 5 s after the client's reset")
	}
	for deadline := time.Now().Add(5 * time.Second); h.srv.Table().Len() > 0; {
		if time.Now().After(deadline) {
			t.Fatalf("%d flows left in the table after the client's reset", h.srv.Table().Len())
		}
		time.Sleep(10 * time.Millisecond)
	}
}
