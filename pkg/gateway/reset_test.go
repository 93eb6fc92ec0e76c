package gateway

import (
	"context"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-vpn/sluice/relay/relaytest"
)

// TestClientResetEndsFlow is issue 14 §3 through the whole gateway: a
// client sends a line, the origin answers and waits, and the client
// resets its connection. The flow must leave the table and the egress
// socket close at once, not after the established timeout.
func TestClientResetEndsFlow(t *testing.T) {
	h := start(t, nil)
	addr, next := relaytest.ResetOrigin(t)

	c, err := h.client.DialContext(context.Background(), "tcp", addr.String())
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
