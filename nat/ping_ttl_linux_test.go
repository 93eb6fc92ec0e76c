package nat

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-vpn/sluice/nat/nattest"
	"golang.org/x/sys/unix"
)

type echoErr struct {
	client, dst netip.Addr
	id, seq     uint16
	payload     []byte
	err         ICMPError
}

// ttlPinger is a Pinger whose replies and errors arrive on channels; with
// raw set it uses raw sockets only.
func ttlPinger(t *testing.T, raw bool) (*Pinger, chan echoReply, chan echoErr) {
	t.Helper()
	replies, errs := make(chan echoReply, 16), make(chan echoErr, 16)
	p, err := NewPinger(PingerOptions{
		Table: pingTable(t, TableOptions{}),
		Deliver: func(src, dst netip.Addr, id, seq uint16, payload []byte) {
			replies <- echoReply{src, dst, id, seq, bytes.Clone(payload)}
		},
		DeliverError: func(client, dst netip.Addr, id, seq uint16, payload []byte, e ICMPError) {
			errs <- echoErr{client, dst, id, seq, bytes.Clone(payload), e}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	p.noDatagram = raw
	t.Cleanup(func() { p.Close() })
	return p, replies, errs
}

// checkEchoTTL sends an echo with a low TTL to loopback and checks, with a
// raw socket that sees the request arrive, that it left with that TTL; then
// plays a router that answers time exceeded from 127.0.0.5, and checks the
// error reaches the client's session with its identifier and sequence.
func checkEchoTTL(t *testing.T, raw bool) {
	t.Helper()
	watch, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMP)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(watch)
	unix.SetsockoptTimeval(watch, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 3})

	p, replies, errs := ttlPinger(t, raw)
	const id, seq = 0x4242, 7
	if err := p.EchoTTL("peer-a", pingClient4, lo4, id, seq, []byte("hop 3"), 3); err != nil {
		t.Fatal(err)
	}
	waitReply(t, replies)
	var request []byte
	for request == nil {
		buf := make([]byte, 1500)
		n, _, err := unix.Recvfrom(watch, buf, 0)
		if err != nil {
			t.Fatalf("the request did not arrive: %v", err)
		}
		if ihl := int(buf[0]&0x0f) * 4; n > ihl && buf[ihl] == 8 {
			request = buf[:n]
		}
	}
	if request[8] != 3 {
		t.Fatalf("the request left with TTL %d, want 3", request[8])
	}

	// The router's error quotes the request as it reached it, TTL spent.
	q := bytes.Clone(request)
	q[8] = 0
	router := netip.MustParseAddr("127.0.0.5")
	nattest.SendTimeExceeded(t, router, netip.AddrFrom4([4]byte(request[12:16])), q)
	select {
	case e := <-errs:
		if !e.err.TimeExceeded || e.err.From != router || !errors.Is(e.err, syscall.EHOSTUNREACH) ||
			e.client != pingClient4 || e.dst != lo4 || e.id != id || e.seq != seq || string(e.payload) != "hop 3" {
			t.Errorf("error %+v, want time exceeded at %s for %s -> %s id %#x seq %d", e, router, pingClient4, lo4, id, seq)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("no time exceeded reported")
	}
	t.Logf("checked on the %s path", p.modeOf(false))
}

// TestPingerTTLRaw: traceroute by ping on the raw path.
func TestPingerTTLRaw(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("raw ICMP sockets need root")
	}
	checkEchoTTL(t, true)
}

// TestPingerTTLDatagram: traceroute by ping on the unprivileged path, in a
// namespace of the test's own whose ping_group_range allows it.
func TestPingerTTLDatagram(t *testing.T) {
	enterLoopbackNetns(t)
	setPingGroupRange(t, "0 2147483647")
	checkEchoTTL(t, false)
}

// TestPingerRefusesGroups: broadcast and multicast destinations are
// refused before any socket is opened, whatever the host allows.
func TestPingerRefusesGroups(t *testing.T) {
	p, _, _ := ttlPinger(t, false)
	for _, dst := range []string{"255.255.255.255", "224.0.0.1", "ff02::1"} {
		src := pingClient4
		if netip.MustParseAddr(dst).Is6() {
			src = pingClient6
		}
		if err := p.Echo("peer-a", src, netip.MustParseAddr(dst), 1, 1, []byte("all of you")); !errors.Is(err, ErrPingGroup) {
			t.Errorf("Echo to %s: %v, want ErrPingGroup", dst, err)
		}
	}
	if p.table.Len() != 0 {
		t.Errorf("%d flows for refused echoes", p.table.Len())
	}
}

// TestPingSendAfterQueuedError: an ICMP error queued for one request and
// not yet read does not fail the next request on the same socket, which
// the kernel would otherwise return it from.
func TestPingSendAfterQueuedError(t *testing.T) {
	enterLoopbackNetns(t)
	setPingGroupRange(t, "0 2147483647")
	s, err := openICMP(false, false, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	id, err := s.localID()
	if err != nil {
		t.Fatal(err)
	}
	msg, err := echoRequest(false, id, 1, []byte("first"))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.sendTo(msg, lo4, 2); err != nil {
		t.Fatal(err)
	}
	// A router's time exceeded for it, quoting it as sent.
	q := make([]byte, 20, 20+len(msg))
	q[0], q[8], q[9] = 0x45, 0, 1
	binary.BigEndian.PutUint16(q[2:4], uint16(20+len(msg)))
	copy(q[12:16], lo4.AsSlice())
	copy(q[16:20], lo4.AsSlice())
	q = append(q, msg...)
	binary.BigEndian.PutUint16(q[24:26], id)
	binary.BigEndian.PutUint16(q[22:24], 0)
	binary.BigEndian.PutUint16(q[22:24], icmpChecksum(q[20:]))
	nattest.SendTimeExceeded(t, netip.Addr{}, lo4, q)
	// Wait until the error is queued, without reading it.
	deadline := time.Now().Add(3 * time.Second)
	for {
		var serr int
		s.rc.Control(func(fd uintptr) { serr, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR) })
		if serr != 0 {
			// SO_ERROR read it; queue another the same way.
			nattest.SendTimeExceeded(t, netip.Addr{}, lo4, q)
			time.Sleep(50 * time.Millisecond)
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the time exceeded was never queued on the socket")
		}
		time.Sleep(5 * time.Millisecond)
	}
	msg2, _ := echoRequest(false, id, 2, []byte("second"))
	if err := s.sendTo(msg2, lo4, 0); err != nil {
		t.Fatalf("the next request failed with the earlier one's error: %v", err)
	}
}
