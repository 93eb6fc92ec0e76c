package netstack

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-vpn/sluice/relay/relaytest"
)

// TestClientResetClosesUpstream is the defect of issue 14 §3: a client
// that resets its connection, while the relay waits for the origin to
// speak, must get the upstream socket closed, and the relay gone, at
// once, not when the origin next sends or at the idle timeout.
func TestClientResetClosesUpstream(t *testing.T) {
	f := newFixture(t, nil)
	addr, next := relaytest.ResetOrigin(t)
	c, err := f.client.DialContext(context.Background(), "tcp", addr.String())
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
	// "k\n" is still unread: closing now makes the client's stack send a
	// RST, as SO_LINGER 0 would.
	c.Close()

	select {
	case err := <-next:
		if err == nil {
			t.Fatal("the origin read a byte nobody sent")
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("the upstream socket stayed open: %v", err)
		}
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("the origin's read: %v; want ECONNRESET, the client's reset passed on", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the upstream socket is still open 5 s after the client's reset")
	}
	for deadline := time.Now().Add(5 * time.Second); f.s.Stats().TCPRelays > 0; {
		if time.Now().After(deadline) {
			t.Fatalf("%d relays left after the client's reset", f.s.Stats().TCPRelays)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestOriginResetResetsClient: the other way round, an origin's RST
// reaches the client as a reset, not as an orderly end.
func TestOriginResetResetsClient(t *testing.T) {
	f := newFixture(t, nil)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		// Only once the client has spoken: a reset before its handshake
		// is done would be a refusal.
		bufio.NewReader(c).ReadString('\n')
		c.Write([]byte("bye\n"))
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
	}()
	c, err := f.client.DialContext(context.Background(), "tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("hi\n")); err != nil {
		t.Fatal(err)
	}
	_, err = io.ReadAll(c)
	if err == nil {
		t.Fatal("the client saw an orderly end; want a reset")
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("the client was never told: %v", err)
	}
	for deadline := time.Now().Add(5 * time.Second); f.s.Stats().TCPRelays > 0; {
		if time.Now().After(deadline) {
			t.Fatalf("%d relays left after the origin's reset", f.s.Stats().TCPRelays)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
