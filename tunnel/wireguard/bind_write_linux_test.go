package wireguard

import (
	"errors"
	"os"
	"testing"

	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"
)

// refusingConn plays sendmmsg: it takes messages until one it refuses,
// which it fails with err when it comes first in a call.
type refusingConn struct {
	refuse map[string]error // by the message's first buffer
	sent   []string
}

func (c *refusingConn) ReadBatch([]ipv6.Message, int) (int, error) { return 0, errors.New("not here") }

func (c *refusingConn) WriteBatch(msgs []ipv6.Message, _ int) (int, error) {
	for i, m := range msgs {
		if err := c.refuse[string(m.Buffers[0])]; err != nil {
			if i == 0 {
				return 0, err
			}
			return i, nil
		}
		c.sent = append(c.sent, string(m.Buffers[0]))
	}
	return len(msgs), nil
}

func messages(payloads ...string) []ipv6.Message {
	msgs := make([]ipv6.Message, len(payloads))
	for i, p := range payloads {
		msgs[i].Buffers = [][]byte{[]byte(p)}
	}
	return msgs
}

// A datagram that a firewall in the sending host drops fails sendmmsg with
// EPERM; the datagrams after it in the batch must still be sent, as they
// were when wireguard-go sent each alone.
func TestWriteAllSkipsARefusedDatagram(t *testing.T) {
	eperm := os.NewSyscallError("sendmmsg", unix.EPERM)
	c := &refusingConn{refuse: map[string]error{"b": eperm, "d": eperm}}
	err := writeAll(c, messages("a", "b", "c", "d", "e"))
	if !errors.Is(err, unix.EPERM) {
		t.Errorf("writeAll = %v, want the first refusal (EPERM)", err)
	}
	if got := len(c.sent); got != 3 || c.sent[0] != "a" || c.sent[1] != "c" || c.sent[2] != "e" {
		t.Errorf("sent %q, want a, c and e", c.sent)
	}

	// An error of the socket itself ends the batch.
	ebadf := os.NewSyscallError("sendmmsg", unix.EBADF)
	c = &refusingConn{refuse: map[string]error{"b": ebadf}}
	if err := writeAll(c, messages("a", "b", "c")); !errors.Is(err, unix.EBADF) {
		t.Errorf("writeAll = %v, want EBADF", err)
	}
	if len(c.sent) != 1 {
		t.Errorf("sent %q after a socket error, want only a", c.sent)
	}
}
