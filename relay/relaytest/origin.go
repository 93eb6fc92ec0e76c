// Package relaytest holds what the tests of every relaying path share:
// origins on loopback whose behaviour a test asserts on.
package relaytest

import (
	"bufio"
	"net"
	"net/netip"
	"testing"
	"time"
)

// ResetOrigin listens on loopback for one connection, answers its first
// line with "ok\n" and then reports on next what its next read returns:
// a reset (ECONNRESET) when a relay passed on the client's reset, io.EOF
// when it closed cleanly instead, and a timeout after a minute when it
// did nothing. The listener closes with the test.
func ResetOrigin(t testing.TB) (addr netip.AddrPort, next <-chan error) {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	ch := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			ch <- err
			return
		}
		defer c.Close()
		r := bufio.NewReader(c)
		if _, err := r.ReadString('\n'); err != nil {
			ch <- err
			return
		}
		c.Write([]byte("ok\n"))
		// Nothing else is coming from the client: the read ends when the
		// relay closes or resets its side, or at the deadline.
		c.SetReadDeadline(time.Now().Add(time.Minute))
		_, err = r.ReadByte()
		ch <- err
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort(), ch
}
