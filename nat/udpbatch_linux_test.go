package nat

import (
	"bytes"
	"os/exec"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestSendLaterSmallMTU: where the route's MTU is smaller than a batch's
// segments, the kernel refuses the GSO send; the datagrams then leave one
// by one (fragmented), none is lost, and that client stops batching.
func TestSendLaterSmallMTU(t *testing.T) {
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("iproute2's ip is not installed")
	}
	enterLoopbackNetns(t)
	// Packets to 127.0.0.9 go through a local route with MTU 1400.
	if out, err := exec.Command("ip", "route", "replace", "local", "127.0.0.9", "dev", "lo", "mtu", "1400", "table", "local").CombinedOutput(); err != nil {
		t.Skipf("cannot set a route MTU: %v: %s", err, out)
	}
	f := newUDPFixture(t, FilterAddressPortDependent, TableOptions{})
	a := newRawSink(t, "udp4", "127.0.0.9:0")
	p := bytes.Repeat([]byte{7}, 1440) // fits 1500, not 1400
	for range 4 {
		if err := f.udp.SendLater("peer", client1, a.addr, p); err != nil {
			t.Fatal(err)
		}
	}
	f.udp.Flush()
	for i := range 4 {
		if got := a.read(time.Second); !bytes.Equal(got, p) {
			t.Fatalf("datagram %d: %d bytes, want %d", i, len(got), len(p))
		}
	}
	if st := f.udp.Stats(); st.SendErrors != 0 {
		t.Fatalf("stats %+v: no datagram may be lost", st)
	}
}

// enterLoopbackNetns moves the test's goroutine, locked to its thread for
// good, into a new network namespace with loopback up. Sockets the
// goroutine opens, and commands it runs, live there.
func enterLoopbackNetns(t *testing.T) {
	t.Helper()
	if unix.Geteuid() != 0 {
		t.Skip("creating a network namespace needs root")
	}
	runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		t.Skipf("cannot create a network namespace: %v", err)
	}
	if out, err := exec.Command("ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("bring lo up: %v: %s", err, out)
	}
}
