package nat

import (
	"errors"
	"os"
	"testing"
	"time"
)

// setPingGroupRange writes the sysctl of the namespace the calling thread
// is in (enterFreshNetns's, never the host's).
func setPingGroupRange(t *testing.T, r string) {
	t.Helper()
	if err := os.WriteFile("/proc/sys/net/ipv4/ping_group_range", []byte(r), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestPingerFollowsPingGroupRange: ping_group_range is read when it
// matters, not once. Allowed after the first echo found it closed, the
// next echo after the reprobe interval goes out; closed again, a new
// session fails with ErrPingUnavailable (no raw socket here), not with
// the socket's EACCES.
func TestPingerFollowsPingGroupRange(t *testing.T) {
	enterFreshNetns(t, "1 0")
	tab := pingTable(t, TableOptions{})
	p, replies := newTestPinger(t, tab, false, nil)
	p.reprobe = 50 * time.Millisecond
	if err := p.Echo("peer-a", pingClient4, lo4, 1, 1, []byte("x")); !errors.Is(err, ErrPingUnavailable) {
		t.Fatalf("Echo with ping sockets closed: %v, want ErrPingUnavailable", err)
	}

	setPingGroupRange(t, "0 2147483647")
	// Within the interval the answer stands.
	if err := p.Echo("peer-a", pingClient4, lo4, 1, 2, []byte("x")); !errors.Is(err, ErrPingUnavailable) {
		t.Fatalf("Echo at once after the change: %v, want ErrPingUnavailable until the reprobe", err)
	}
	time.Sleep(60 * time.Millisecond)
	checkEcho(t, p, tab, replies, pingClient4, lo4, 0x4242)
	if m := p.modeOf(false); m != pingDatagram {
		t.Fatalf("mode %s after the sysctl opened, want datagram", m)
	}

	setPingGroupRange(t, "1 0")
	// The open session keeps its socket; a new one cannot have one.
	if err := p.Echo("peer-a", pingClient4b, lo4, 9, 1, []byte("x")); !errors.Is(err, ErrPingUnavailable) {
		t.Fatalf("new session with ping sockets closed again: %v, want ErrPingUnavailable", err)
	}
	if m := p.modeOf(false); m != pingUnavailable {
		t.Fatalf("mode %s after the sysctl closed, want unavailable", m)
	}
}
