package nat

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
	"golang.org/x/sys/unix"
)

// Client addresses as they would be inside the tunnel. They only name
// sessions: nothing is ever sent to them.
var (
	pingClient4  = netip.MustParseAddr("10.99.0.2")
	pingClient4b = netip.MustParseAddr("10.99.0.3")
	pingClient6  = netip.MustParseAddr("fd00:99::2")
)

type echoReply struct {
	src, dst netip.Addr
	id, seq  uint16
	payload  []byte
}

func (r echoReply) String() string {
	return fmt.Sprintf("%s->%s id %d seq %d %q", r.src, r.dst, r.id, r.seq, r.payload)
}

func pingTable(t *testing.T, opts TableOptions) *Table {
	t.Helper()
	tab, err := NewTable(opts)
	if err != nil {
		t.Fatal(err)
	}
	tab.Start(context.Background())
	t.Cleanup(tab.Close)
	return tab
}

// pingSocketAllowed tells whether this process may open an unprivileged
// ICMP socket (net.ipv4.ping_group_range).
func pingSocketAllowed() bool {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, unix.IPPROTO_ICMP)
	if err != nil {
		return false
	}
	unix.Close(fd)
	return true
}

// newTestPinger returns a Pinger whose replies arrive on the channel. With
// raw set it never uses datagram sockets, so the raw path is tested even
// where the host allows both; it skips unless the process may open raw
// sockets.
func newTestPinger(t *testing.T, tab *Table, raw bool, log *zap.Logger) (*Pinger, chan echoReply) {
	t.Helper()
	if raw && os.Geteuid() != 0 {
		t.Skip("the raw ICMP path needs CAP_NET_RAW; run as root")
	}
	if !raw && os.Geteuid() != 0 && !pingSocketAllowed() {
		t.Skip("an ICMP echo needs an unprivileged ICMP socket, and net.ipv4.ping_group_range does not include this user's groups, or CAP_NET_RAW; run as root")
	}
	replies := make(chan echoReply, 64)
	p, err := NewPinger(PingerOptions{
		Table:  tab,
		Logger: log,
		Deliver: func(src, dst netip.Addr, id, seq uint16, payload []byte) {
			// payload is only valid during the call.
			replies <- echoReply{src, dst, id, seq, bytes.Clone(payload)}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	p.noDatagram = raw
	t.Cleanup(func() { p.Close() })
	return p, replies
}

func waitReply(t *testing.T, replies <-chan echoReply) echoReply {
	t.Helper()
	select {
	case r := <-replies:
		return r
	case <-time.After(5 * time.Second):
		t.Fatal("no echo reply within 5s")
		return echoReply{}
	}
}

// noMoreReplies fails if anything is delivered within a short while.
func noMoreReplies(t *testing.T, replies <-chan echoReply) {
	t.Helper()
	select {
	case r := <-replies:
		t.Errorf("unexpected reply delivered: %v", r)
	case <-time.After(100 * time.Millisecond):
	}
}

func (p *Pinger) modeOf(v6 bool) pingMode {
	p.mu.Lock()
	defer p.mu.Unlock()
	i := 0
	if v6 {
		i = 1
	}
	if p.fams[i] == nil {
		return 0
	}
	return p.fams[i].mode
}

func echoKey(src, dst netip.Addr, id uint16) Key {
	return Key{Proto: ICMP, Client: netip.AddrPortFrom(src, id), Dest: netip.AddrPortFrom(dst, id)}
}

func checkEcho(t *testing.T, p *Pinger, tab *Table, replies chan echoReply, src, dst netip.Addr, id uint16) {
	t.Helper()
	key := echoKey(src, dst, id)
	for seq := uint16(7); seq <= 8; seq++ {
		payload := []byte(fmt.Sprintf("sluice echo %d to %s", seq, dst))
		if err := p.Echo("peer-a", src, dst, id, seq, payload); err != nil {
			t.Fatalf("Echo to %s: %v", dst, err)
		}
		r := waitReply(t, replies)
		want := echoReply{dst, src, id, seq, payload}
		if r.src != want.src || r.dst != want.dst || r.id != want.id || r.seq != want.seq || !bytes.Equal(r.payload, want.payload) {
			t.Fatalf("reply %v, want %v", r, want)
		}
		f := tab.Lookup(key)
		if f == nil {
			t.Fatalf("no flow for %s", key)
		}
		e := f.Entry()
		n := uint64(seq - 6)
		if e.OrigPackets != n || e.ReplyPackets != n || e.State != StateAssured || e.Peer != "peer-a" {
			t.Errorf("after %d echoes flow is %+v; want %d packets each way, assured, peer-a", n, e, n)
		}
		if e.OrigBytes != n*uint64(8+len(payload)) || e.ReplyBytes != e.OrigBytes {
			t.Errorf("after %d echoes flow counts %d bytes out, %d back; want %d each", n, e.OrigBytes, e.ReplyBytes, n*uint64(8+len(payload)))
		}
	}
	t.Logf("%s echo went through the %s path", dst, p.modeOf(dst.Is6()))
}

func TestPingerEchoLoopback(t *testing.T) {
	have6(t)
	for _, raw := range []bool{false, true} {
		name := "auto"
		if raw {
			name = "raw"
		}
		t.Run(name, func(t *testing.T) {
			tab := pingTable(t, TableOptions{})
			p, replies := newTestPinger(t, tab, raw, nil)
			checkEcho(t, p, tab, replies, pingClient4, lo4, 0x4242)
			checkEcho(t, p, tab, replies, pingClient6, lo6, 0x4243)
			if raw && (p.modeOf(false) != pingRaw || p.modeOf(true) != pingRaw) {
				t.Errorf("modes %s/%s, want raw", p.modeOf(false), p.modeOf(true))
			}
			if n := tab.Len(); n != 2 {
				t.Errorf("table holds %d flows, want one per session (2)", n)
			}
			noMoreReplies(t, replies)
		})
	}
}

// TestPingerRawDemux checks that the shared raw socket hands each client
// only replies to its own session: same destination with different
// identifiers, the same identifier from two clients, and foreign replies
// (another program's identifier, or our identifier from another source)
// that must not be delivered.
func TestPingerRawDemux(t *testing.T) {
	tab := pingTable(t, TableOptions{})
	p, replies := newTestPinger(t, tab, true, nil)

	type client struct {
		src netip.Addr
		id  uint16
	}
	clients := []client{{pingClient4, 1}, {pingClient4, 2}, {pingClient4b, 1}}
	for i, c := range clients {
		if err := p.Echo("peer-a", c.src, lo4, c.id, uint16(100+i), []byte("hello")); err != nil {
			t.Fatal(err)
		}
	}
	got := map[client]uint16{}
	for range clients {
		r := waitReply(t, replies)
		if r.src != lo4 {
			t.Errorf("reply from %s, want %s", r.src, lo4)
		}
		got[client{r.dst, r.id}] = r.seq
	}
	for i, c := range clients {
		if got[c] != uint16(100+i) {
			t.Errorf("client %v got seq %d, want %d (all: %v)", c, got[c], 100+i, got)
		}
	}

	// Foreign echoes, answered by the kernel and seen by the Pinger's raw
	// socket: an identifier no session uses, and a session's identifier
	// from another loopback address.
	p.mu.Lock()
	used := map[uint16]bool{}
	var sessionID uint16
	for k := range p.fams[0].sessions {
		used[k.id] = true
		sessionID = k.id
	}
	p.mu.Unlock()
	foreignID := uint16(0x7777)
	for used[foreignID] {
		foreignID++
	}
	other, err := openICMP(false, true, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer other.close()
	for _, f := range []struct {
		dst netip.Addr
		id  uint16
	}{{lo4, foreignID}, {netip.MustParseAddr("127.0.0.2"), sessionID}} {
		msg, err := echoRequest(false, f.id, 9, []byte("not yours"))
		if err != nil {
			t.Fatal(err)
		}
		if err := other.sendTo(msg, f.dst, 0); err != nil {
			t.Fatal(err)
		}
		// Once our own socket has the reply, the Pinger's has it too.
		deadline := time.Now().Add(5 * time.Second)
		for {
			buf, msg, from, err := other.recv(&p.bufs, nil)
			if err != nil {
				t.Fatal(err)
			}
			id, ok := echoReplyID(false, msg)
			p.bufs.Put(buf)
			if ok && id == f.id && from == f.dst {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("no reply to the foreign echo to %s", f.dst)
			}
		}
	}
	// A real echo after the foreign ones: the socket is read in order, so
	// when its reply is delivered the foreign ones have been dropped.
	if err := p.Echo("peer-a", pingClient4, lo4, 1, 200, []byte("again")); err != nil {
		t.Fatal(err)
	}
	if r := waitReply(t, replies); r.dst != pingClient4 || r.id != 1 || r.seq != 200 {
		t.Errorf("got %v, want the reply to seq 200 (a foreign reply was delivered?)", r)
	}
	noMoreReplies(t, replies)
}

func TestPingerSessionExpiry(t *testing.T) {
	for _, raw := range []bool{false, true} {
		t.Run(fmt.Sprintf("raw=%v", raw), func(t *testing.T) { checkExpiry(t, raw) })
	}
}

// checkExpiry checks that the table's idle expiry ends a session and
// releases its socket or identifier, and that the next echo starts afresh.
func checkExpiry(t *testing.T, raw bool) {
	tab := pingTable(t, TableOptions{Timeouts: Timeouts{ICMP: 100 * time.Millisecond}, ScanInterval: 20 * time.Millisecond})
	p, replies := newTestPinger(t, tab, raw, nil)
	key := echoKey(pingClient4, lo4, 5)
	if err := p.Echo("peer-a", pingClient4, lo4, 5, 1, []byte("x")); err != nil {
		t.Fatal(err)
	}
	waitReply(t, replies)
	first := tab.Lookup(key)
	p.mu.Lock()
	s := p.sessions[key]
	p.mu.Unlock()
	if first == nil || s == nil {
		t.Fatalf("no flow (%v) or session (%v) after an echo", first, s)
	}

	deadline := time.Now().Add(3 * time.Second)
	for tab.Lookup(key) != nil {
		if time.Now().After(deadline) {
			t.Fatal("idle ICMP flow did not expire")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// The table's closer released the session.
	p.mu.Lock()
	nsess, nraw := len(p.sessions), 0
	if fam := p.fams[0]; fam.sessions != nil {
		nraw = len(fam.sessions)
	}
	p.mu.Unlock()
	if !s.dead.Load() || nsess != 0 || nraw != 0 {
		t.Errorf("after expiry: session dead %v, %d sessions, %d raw identifiers", s.dead.Load(), nsess, nraw)
	}
	if mode := p.modeOf(false); mode == pingDatagram && s.sock.rc.Control(func(uintptr) {}) == nil {
		t.Error("expired session's socket is still open")
	}

	if err := p.Echo("peer-a", pingClient4, lo4, 5, 2, []byte("y")); err != nil {
		t.Fatal(err)
	}
	if r := waitReply(t, replies); r.seq != 2 || r.id != 5 {
		t.Errorf("reply %v after a new session", r)
	}
	if f := tab.Lookup(key); f == nil || f.ID() == first.ID() {
		t.Errorf("echo after expiry did not start a new flow")
	}
	t.Logf("expiry checked on the %s path", p.modeOf(false))
}

func TestPingerClose(t *testing.T) {
	have6(t)
	tab := pingTable(t, TableOptions{})
	p, replies := newTestPinger(t, tab, false, nil)
	rawP, rawReplies := newTestPinger(t, tab, os.Geteuid() == 0, nil)
	for _, x := range []struct {
		p       *Pinger
		replies chan echoReply
		id      uint16
	}{{p, replies, 1}, {rawP, rawReplies, 2}} {
		for _, dst := range []netip.Addr{lo4, lo6} {
			src := pingClient4
			if dst.Is6() {
				src = pingClient6
			}
			if err := x.p.Echo("peer-a", src, dst, x.id, 1, nil); err != nil {
				t.Fatal(err)
			}
			waitReply(t, x.replies)
		}
	}
	if tab.Len() != 4 {
		t.Fatalf("%d flows, want 4", tab.Len())
	}

	for _, pp := range []*Pinger{p, rawP} {
		done := make(chan struct{})
		go func() {
			pp.Close()
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("Close did not return: a reader did not stop")
		}
		if err := pp.Echo("peer-a", pingClient4, lo4, 1, 2, nil); !errors.Is(err, net.ErrClosed) {
			t.Errorf("Echo after Close: %v, want net.ErrClosed", err)
		}
		if err := pp.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
	}
	if n := tab.Len(); n != 0 {
		t.Errorf("%d flows left after Close, want 0", n)
	}
}

func TestPingerValidation(t *testing.T) {
	if _, err := NewPinger(PingerOptions{}); err == nil || !strings.Contains(err.Error(), "PingerOptions.Table") {
		t.Errorf("NewPinger without a table: %v, want an error naming PingerOptions.Table", err)
	}
	tab := pingTable(t, TableOptions{})
	p, _ := newTestPinger(t, tab, false, nil)
	if err := p.Echo("peer-a", pingClient4, lo6, 1, 1, nil); err == nil {
		t.Error("Echo from an IPv4 client to an IPv6 destination succeeded")
	}
	if tab.Len() != 0 {
		t.Errorf("a refused echo left %d flows", tab.Len())
	}
}

func TestPingerTableFull(t *testing.T) {
	tab := pingTable(t, TableOptions{MaxFlows: 1})
	p, replies := newTestPinger(t, tab, false, nil)
	if err := p.Echo("peer-a", pingClient4, lo4, 1, 1, nil); err != nil {
		t.Fatal(err)
	}
	waitReply(t, replies)
	if err := p.Echo("peer-a", pingClient4, lo4, 2, 1, nil); !errors.Is(err, ErrTableFull) {
		t.Errorf("second session with a full table: %v, want ErrTableFull", err)
	}
	p.mu.Lock()
	n := len(p.sessions)
	p.mu.Unlock()
	if n != 1 {
		t.Errorf("%d sessions after a refused one, want 1", n)
	}
	noMoreReplies(t, replies)
}

// enterFreshNetns moves the calling goroutine, locked to its thread for
// good, into a new network namespace with loopback up and the given
// ping_group_range, and takes CAP_NET_RAW out of the thread's effective
// set. The thread is thrown away when the test's goroutine ends, so nothing
// leaks into the host's namespace; sockets opened from this goroutine
// (the Pinger opens them inside Echo) live in the new namespace.
func enterFreshNetns(t *testing.T, pingGroupRange string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("creating a network namespace needs root")
	}
	const sysctl = "/proc/sys/net/ipv4/ping_group_range"
	hostRange, err := os.ReadFile(sysctl)
	if err != nil {
		t.Fatal(err)
	}
	runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		t.Skipf("cannot create a network namespace: %v", err)
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		t.Fatal(err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		t.Fatalf("bring lo up: %v", err)
	}
	if err := os.WriteFile(sysctl, []byte(pingGroupRange), 0o644); err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(sysctl); err != nil || strings.Join(strings.Fields(string(got)), " ") != pingGroupRange {
		t.Fatalf("ping_group_range in the new namespace is %q (%v), want %q", got, err, pingGroupRange)
	}
	// Another goroutine runs on another thread, in the host's namespace,
	// whose setting must be untouched.
	hostNow := make(chan []byte)
	go func() {
		b, _ := os.ReadFile(sysctl)
		hostNow <- b
	}()
	if b := <-hostNow; !bytes.Equal(b, hostRange) {
		t.Fatalf("host ping_group_range changed from %q to %q", hostRange, b)
	}

	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var caps [2]unix.CapUserData
	if err := unix.Capget(&hdr, &caps[0]); err != nil {
		t.Fatal(err)
	}
	caps[0].Effective &^= 1 << unix.CAP_NET_RAW
	if err := unix.Capset(&hdr, &caps[0]); err != nil {
		t.Fatal(err)
	}
	if s, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMP); err == nil {
		unix.Close(s)
		t.Fatal("raw socket still allowed after dropping CAP_NET_RAW")
	}
}

// TestPingerDatagramPath runs the unprivileged path where it is allowed and
// raw sockets are not: a fresh network namespace whose ping_group_range
// includes every group, on a thread without CAP_NET_RAW.
func TestPingerDatagramPath(t *testing.T) {
	enterFreshNetns(t, "0 2147483647")
	have6(t)
	tab := pingTable(t, TableOptions{})
	p, replies := newTestPinger(t, tab, false, nil)
	checkEcho(t, p, tab, replies, pingClient4, lo4, 0x4242)
	checkEcho(t, p, tab, replies, pingClient6, lo6, 0x4243)
	if p.modeOf(false) != pingDatagram || p.modeOf(true) != pingDatagram {
		t.Fatalf("modes %s/%s, want datagram", p.modeOf(false), p.modeOf(true))
	}

	// Two clients using the same identifier towards one destination get
	// a socket, and a kernel identifier, each; replies come back to each
	// with its own identifier.
	for i, src := range []netip.Addr{pingClient4, pingClient4b} {
		if err := p.Echo("peer-b", src, lo4, 77, uint16(i), []byte("same id")); err != nil {
			t.Fatal(err)
		}
	}
	seen := map[netip.Addr]uint16{}
	for range 2 {
		r := waitReply(t, replies)
		if r.id != 77 {
			t.Errorf("reply %v: client identifier not restored", r)
		}
		seen[r.dst] = r.seq
	}
	if len(seen) != 2 || seen[pingClient4] != 0 || seen[pingClient4b] != 1 {
		t.Errorf("replies by client: %v", seen)
	}
	p.mu.Lock()
	a, b := p.sessions[echoKey(pingClient4, lo4, 77)], p.sessions[echoKey(pingClient4b, lo4, 77)]
	p.mu.Unlock()
	if a == nil || b == nil || a.sock == b.sock || a.wireID == b.wireID {
		t.Errorf("sessions of two clients share a socket or identifier: %+v %+v", a, b)
	}
	noMoreReplies(t, replies)

	// Not a subtest: that would run on another thread, outside the namespace.
	checkExpiry(t, false)
}

// TestPingerUnavailable checks that with neither kind of ICMP socket
// allowed, Echo fails with ErrPingUnavailable, nothing is delivered, and
// one line is logged however often it fails.
func TestPingerUnavailable(t *testing.T) {
	enterFreshNetns(t, "1 0")
	tab := pingTable(t, TableOptions{})
	core, logs := observer.New(zapcore.WarnLevel)
	p, replies := newTestPinger(t, tab, false, zap.New(core))
	for _, c := range []struct{ src, dst netip.Addr }{{pingClient4, lo4}, {pingClient4, lo4}, {pingClient6, lo6}, {pingClient6, lo6}} {
		if err := p.Echo("peer-a", c.src, c.dst, 1, 1, []byte("x")); !errors.Is(err, ErrPingUnavailable) {
			t.Errorf("Echo to %s: %v, want ErrPingUnavailable", c.dst, err)
		}
	}
	if n := logs.Len(); n != 1 {
		t.Errorf("%d warnings logged, want 1: %v", n, logs.All())
	}
	if tab.Len() != 0 {
		t.Errorf("%d flows for unavailable echoes", tab.Len())
	}
	noMoreReplies(t, replies)
}

// A session's ICMP socket leaves the descriptors below the open file limit
// free for the admin API, as egress sockets do: with a reserve as large as
// the limit, every socket falls in it and is refused.
func TestPingSocketKeepsFileReserve(t *testing.T) {
	if os.Geteuid() != 0 && !pingSocketAllowed() {
		t.Skip("an ICMP socket needs ping_group_range to include this user's groups, or CAP_NET_RAW; run as root")
	}
	limit := fileLimit()
	if limit <= 0 {
		t.Skip("no open file limit to keep a reserve under")
	}
	if _, err := openICMP(false, os.Geteuid() == 0 && !pingSocketAllowed(), int(limit)); !errors.Is(err, ErrFileReserve) {
		t.Fatalf("openICMP with a reserve of the whole limit: %v, want ErrFileReserve", err)
	}
	s, err := openICMP(false, os.Geteuid() == 0 && !pingSocketAllowed(), 1)
	if err != nil {
		t.Fatalf("openICMP with a reserve of 1: %v", err)
	}
	s.close()
}
