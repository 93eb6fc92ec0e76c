package gateway

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluice-vpn/sluice/nat"
)

// The many-flows scenario of the benchmark (15,000 flows over a 1,000-port
// slice) at a scale CI can afford. One destination gets as many flows as
// the slice has ports, so that it is full at the end and the next flow to
// it must be refused; the others share the rest, which only fits because
// the pool reuses a port across destinations.
const (
	manyFlows        = 5000
	manyFlowsDests   = 8
	manyFlowsWorkers = 64
)

// TestManyFlowsPortAccounting holds 5,000 TCP flows open at once through
// a gateway whose egress is a 1,000-port slice, to 8 loopback servers, and
// checks that every flow works, that the table, the servers and the pool
// agree on the ports, that no port outside the slice was used, and that a
// destination whose every port is taken is refused. Then it closes the
// full destination's flows at both ends and checks that the table and the
// pool let go of exactly those and that the destination can be reached
// again; finally it closes the gateway, which must close every egress
// socket and leave no goroutine behind.
func TestManyFlowsPortAccounting(t *testing.T) {
	// Each flow holds two descriptors in this process: the gateway's
	// egress socket and the server's accepted socket.
	raiseFileLimit(t, 2*manyFlows+1000)

	before := runtime.NumGoroutine()
	// Registered before start's cleanup, so it runs after the gateway,
	// the client stack and the servers are gone.
	t.Cleanup(func() { waitGoroutinesGone(t, before) })

	h := start(t, func(o *Options) {
		o.Egress = nat.EgressOptions{Ports: slice, DialTimeout: 5 * time.Second}
		// The default per-peer limits (100 new flows a second, 4,096 open)
		// are what this test must get past, not what it is about.
		o.Limits = nat.LimiterOptions{Default: nat.Limits{NewFlowsPerSecond: -1, MaxFlows: -1}}
	})
	egress := h.srv.Stats().Egress
	t.Logf("egress slice %s, kernel picks ports: %v", egress.Slice, egress.KernelPorts)

	servers := make([]*holdServer, manyFlowsDests)
	for i := range servers {
		servers[i] = newHoldServer(t)
	}
	defer func() {
		for _, s := range servers {
			s.close()
		}
	}()

	// First most of the flows, concurrently: server 0 gets fewer than the
	// slice has ports, the other servers share the rest.
	const firstToFull = 900
	want := make([]int, manyFlowsDests)
	want[0] = firstToFull
	rest := manyFlows - slice.Len()
	for i := 1; i < manyFlowsDests; i++ {
		want[i] = rest / (manyFlowsDests - 1)
		if i <= rest%(manyFlowsDests-1) {
			want[i]++
		}
	}
	var jobs []int // destination index of each flow, shuffled
	for d, n := range want {
		for range n {
			jobs = append(jobs, d)
		}
	}
	rand.Shuffle(len(jobs), func(i, j int) { jobs[i], jobs[j] = jobs[j], jobs[i] })

	began := time.Now()
	var conns []heldFlow
	defer func() {
		for _, f := range conns {
			f.Close()
		}
	}()
	var (
		mu       sync.Mutex
		next     atomic.Int64
		failures atomic.Int64
		firstErr sync.Once
		wg       sync.WaitGroup
	)
	for range manyFlowsWorkers {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= len(jobs) || failures.Load() > 0 {
					return
				}
				c, err := openEcho(h, servers[jobs[i]].addr(), byte(i))
				if err != nil {
					failures.Add(1)
					firstErr.Do(func() {
						t.Errorf("flow %d to server %d (%s): %v", i, jobs[i], servers[jobs[i]].addr(), err)
					})
					return
				}
				mu.Lock()
				conns = append(conns, heldFlow{c, jobs[i]})
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if failures.Load() > 0 {
		t.Fatalf("stats after the failure: %+v", h.srv.Stats().Egress)
	}
	t.Logf("%d flows opened and echoed in %v", len(conns), time.Since(began).Round(time.Millisecond))

	// Then fill server 0, one flow at a time, until the gateway refuses
	// one: that happens when every port of the slice has a connection to
	// it, and must happen then.
	for n := firstToFull; ; n++ {
		t0 := time.Now()
		c, err := openEcho(h, servers[0].addr(), byte(n))
		if err == nil {
			conns = append(conns, heldFlow{c, 0})
			if n+1 > slice.Len() {
				t.Fatalf("server 0 accepted flow %d from a %d-port slice", n+1, slice.Len())
			}
			continue
		}
		if !strings.Contains(err.Error(), "refused") || time.Since(t0) > 2*time.Second {
			t.Fatalf("flow %d to server 0: want connection refused at once, got %v after %v", n+1, err, time.Since(t0))
		}
		want[0] = n
		break
	}
	full := want[0]
	total := len(conns)
	t.Logf("server 0 full after %d flows, %d flows in all, %v", full, total, time.Since(began).Round(time.Millisecond))

	// Every port the slice has must have gone to server 0, but for those
	// that another socket on this host holds (a test running in
	// parallel): then the kernel must not choose them.
	used0 := map[uint16]bool{}
	for _, p := range servers[0].ports() {
		used0[p] = true
	}
	var unused []uint16
	for p := int(slice.Lo); p <= int(slice.Hi); p++ {
		if !used0[uint16(p)] {
			unused = append(unused, uint16(p))
		}
	}
	if len(unused) > 0 {
		ours := make([]netip.AddrPort, len(servers))
		for i, s := range servers {
			ours[i] = s.addr()
		}
		foreign := foreignSockets(t, slice, ours)
		for _, p := range unused {
			if foreign[p] == "" {
				t.Errorf("port %d of the slice was never used for server 0, and no other socket on this host holds it", p)
			} else {
				t.Logf("port %d of the slice is held by another socket (%s)", p, foreign[p])
			}
		}
	}

	st := h.srv.Stats()
	if st.Egress.Exhausted != 1 || st.Refused[RefusedPorts] != 1 {
		t.Errorf("after one refusal: pool counts %d exhausted, gateway %d refused for ports; want 1 and 1",
			st.Egress.Exhausted, st.Refused[RefusedPorts])
	}

	// What the servers saw: one source port per connection, each in the
	// slice, distinct per server (a TCP four-tuple is unique) but shared
	// between servers.
	all := map[uint16]bool{}
	seen := make([]map[uint16]bool, len(servers))
	for i, s := range servers {
		ports := s.ports()
		if len(ports) != want[i] {
			t.Errorf("server %d accepted %d connections, want %d", i, len(ports), want[i])
		}
		seen[i] = map[uint16]bool{}
		for _, p := range ports {
			if !slice.Contains(p) {
				t.Errorf("server %d: a connection from port %d, outside the slice %s", i, p, slice)
			}
			if seen[i][p] {
				t.Errorf("server %d: two connections from port %d", i, p)
			}
			seen[i][p] = true
			all[p] = true
		}
	}
	if len(all) > slice.Len() {
		t.Errorf("%d distinct egress ports in use, more than the slice's %d", len(all), slice.Len())
	}
	if len(all) >= total {
		t.Errorf("%d distinct egress ports for %d connections: no port was shared between destinations", len(all), total)
	}
	t.Logf("%d connections over %d distinct egress ports", total, len(all))

	// The table has exactly these flows, with the egress port each server
	// saw.
	byDest := map[netip.AddrPort]int{}
	for i, s := range servers {
		byDest[s.addr()] = i
	}
	tcpFlows := 0
	for _, e := range h.srv.Table().Snapshot() {
		if e.Key.Proto != nat.TCP {
			continue
		}
		tcpFlows++
		i, ok := byDest[e.Key.Dest]
		switch {
		case !ok:
			t.Errorf("flow %v to a destination the test did not dial", e.Key)
		case e.Egress.Addr().Unmap() != netip.AddrFrom4([4]byte{127, 0, 0, 1}):
			t.Errorf("flow %v: egress address %v, want 127.0.0.1", e.Key, e.Egress)
		case !seen[i][e.Egress.Port()]:
			t.Errorf("flow %v: egress port %d, which server %d never saw", e.Key, e.Egress.Port(), i)
		default:
			delete(seen[i], e.Egress.Port()) // each port once per server
		}
	}
	if tcpFlows != total {
		t.Errorf("table has %d TCP flows, want %d", tcpFlows, total)
	}
	for i := range seen {
		if len(seen[i]) > 0 {
			t.Errorf("server %d: %d connections have no flow in the table", i, len(seen[i]))
		}
	}

	// The pool counts the same sockets and ports.
	st = h.srv.Stats()
	conns4, ports4 := egressTCP(st.Egress)
	if conns4 != total || ports4 != len(all) || ports4 > slice.Len() {
		t.Errorf("pool counts %d TCP connections on %d ports; want %d on %d (at most %d)",
			conns4, ports4, total, len(all), slice.Len())
	}

	// The other servers still take new flows on the same ports.
	extra, err := openEcho(h, servers[1].addr(), 0xee)
	if err != nil {
		t.Fatalf("a new flow to server 1 while server 0 is full: %v", err)
	}
	conns = append(conns, heldFlow{extra, 1})
	total++

	// Close server 0's flows at both ends. Their flows end and their
	// sockets close, so server 0 can be reached again; every other flow
	// stays, and so do the ports they use.
	closing := time.Now()
	servers[0].closeConns()
	kept := conns[:0]
	for _, f := range conns {
		if f.dest == 0 {
			f.Close()
		} else {
			kept = append(kept, f)
		}
	}
	conns = kept
	inUse := map[uint16]bool{}
	for _, s := range servers[1:] {
		for _, p := range s.ports() {
			inUse[p] = true
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		// Stats walks every egress socket; the table's count is cheap.
		if h.srv.Table().Len() > len(conns) && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
			continue
		}
		st = h.srv.Stats()
		conns4, ports4 = egressTCP(st.Egress)
		if st.Table.Flows == len(conns) && conns4 == len(conns) && ports4 == len(inUse) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%v after closing server 0's %d flows: %d flows in the table, pool holds %d TCP connections on %d ports; want %d flows on %d ports",
				time.Since(closing).Round(time.Millisecond), full, st.Table.Flows, conns4, ports4, len(conns), len(inUse))
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("server 0's %d flows closed in %v; %d flows left on %d ports",
		full, time.Since(closing).Round(time.Millisecond), len(conns), len(inUse))
	again, err := openEcho(h, servers[0].addr(), 0xaa)
	if err != nil {
		t.Fatalf("a new flow to server 0 after its flows closed: %v", err)
	}
	conns = append(conns, heldFlow{again, 0})
	if p := servers[0].ports(); len(p) != 1 || !slice.Contains(p[0]) {
		t.Errorf("server 0 saw connections from ports %v since its flows closed; want one, in %s", p, slice)
	}

	// Closing the gateway aborts the rest and closes every egress socket.
	h.srv.Close()
	st = h.srv.Stats()
	if conns4, ports4 = egressTCP(st.Egress); st.Table.Flows != 0 || conns4 != 0 || ports4 != 0 {
		t.Errorf("after Close: %d flows in the table, pool holds %d TCP connections on %d ports",
			st.Table.Flows, conns4, ports4)
	}
	t.Logf("all flows opened, checked and closed in %v", time.Since(began).Round(time.Millisecond))
}

// openEcho opens a flow through the gateway to dst and checks that the
// server echoes one byte on it.
func openEcho(h *harness, dst netip.AddrPort, b byte) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := h.client.DialContext(ctx, "tcp4", dst.String())
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	var got [1]byte
	if _, err = c.Write([]byte{b}); err == nil {
		_, err = io.ReadFull(c, got[:])
	}
	if err == nil && got[0] != b {
		err = fmt.Errorf("echo: sent %#x, got %#x", b, got[0])
	}
	if err != nil {
		c.Close()
		return nil, err
	}
	c.SetDeadline(time.Time{})
	return c, nil
}

// heldFlow is a client connection through the gateway and the index of
// the server it goes to.
type heldFlow struct {
	net.Conn
	dest int
}

// egressTCP sums the pool's TCP connections and ports over its addresses.
func egressTCP(st nat.EgressStats) (conns, ports int) {
	for _, a := range st.Addrs {
		conns += a.TCPConns
		ports += a.TCPPorts
	}
	return conns, ports
}

// holdServer is a loopback TCP server that echoes the first byte of each
// connection and then holds the connection open, idle, until close. It
// keeps no goroutine per held connection.
type holdServer struct {
	ln *net.TCPListener
	wg sync.WaitGroup

	mu    sync.Mutex
	conns []net.Conn
	from  []uint16 // source port of each accepted connection

	closeOnce sync.Once
}

// newHoldServer listens on 127.0.0.1 on a port outside the egress slice:
// a listener on a port of the slice would take that port from the pool.
func newHoldServer(t *testing.T) *holdServer {
	t.Helper()
	var ln *net.TCPListener
	for ln == nil {
		l, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		if slice.Contains(l.Addr().(*net.TCPAddr).AddrPort().Port()) {
			defer l.Close() // so that the next try gets another port
			continue
		}
		ln = l
	}
	s := &holdServer{ln: ln}
	s.wg.Go(s.serve)
	t.Cleanup(s.close)
	return s
}

func (s *holdServer) addr() netip.AddrPort {
	ap := s.ln.Addr().(*net.TCPAddr).AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

func (s *holdServer) serve() {
	for {
		c, err := s.ln.AcceptTCP()
		if err != nil {
			return
		}
		s.mu.Lock()
		s.conns = append(s.conns, c)
		s.from = append(s.from, c.RemoteAddr().(*net.TCPAddr).AddrPort().Port())
		s.mu.Unlock()
		s.wg.Go(func() {
			c.SetDeadline(time.Now().Add(10 * time.Second))
			var b [1]byte
			if _, err := io.ReadFull(c, b[:]); err == nil {
				c.Write(b[:])
			}
			c.SetDeadline(time.Time{})
		})
	}
}

// ports returns the source port of every connection accepted so far.
func (s *holdServer) ports() []uint16 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]uint16(nil), s.from...)
}

// closeConns closes every connection held so far and forgets them; the
// server keeps accepting.
func (s *holdServer) closeConns() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.conns {
		c.Close()
	}
	s.conns, s.from = nil, nil
}

// close stops accepting, closes every held connection and waits for the
// server's goroutines.
func (s *holdServer) close() {
	s.closeOnce.Do(func() {
		s.ln.Close()
		s.mu.Lock()
		for _, c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
		s.wg.Wait()
	})
}

// raiseFileLimit raises the soft limit on open files to the hard limit,
// and skips the test if even that is below need. The Go runtime already
// does this at start on Linux; the test does not rely on it.
func raiseFileLimit(t *testing.T, need uint64) {
	t.Helper()
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if lim.Cur < lim.Max {
		old := lim.Cur
		lim.Cur = lim.Max
		if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
			t.Fatalf("raising the open-file limit from %d to %d: %v", old, lim.Max, err)
		}
		t.Cleanup(func() {
			unix.Setrlimit(unix.RLIMIT_NOFILE, &unix.Rlimit{Cur: old, Max: lim.Max})
		})
	}
	if lim.Cur < need {
		t.Skipf("needs %d open files; the hard limit is %d", need, lim.Max)
	}
}

// foreignSockets returns the ports of r that TCP sockets on this host
// other than connections to ours hold, as /proc/net/tcp and tcp6 show
// them, each with a description of one such socket. A socket bound to a
// port by bind(2), a listener for instance, keeps the kernel from choosing
// that port for any outgoing connection.
func foreignSockets(t *testing.T, r nat.PortRange, ours []netip.AddrPort) map[uint16]string {
	t.Helper()
	// /proc/net/tcp writes an IPv4 address as the hex of its in-memory
	// 32-bit word: 127.0.0.1 is 0100007F on a little-endian machine.
	mine := map[string]bool{}
	for _, ap := range ours {
		a := ap.Addr().As4()
		mine[fmt.Sprintf("%02X%02X%02X%02X:%04X", a[3], a[2], a[1], a[0], ap.Port())] = true
	}
	held := map[uint16]string{}
	for _, name := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		f, err := os.Open(name)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(f)
		sc.Scan() // the header line
		for sc.Scan() {
			// "sl local_address rem_address st ...", addresses as HEX:PORT.
			fields := strings.Fields(sc.Text())
			if len(fields) < 4 {
				continue
			}
			local, remote, state := fields[1], fields[2], fields[3]
			i := strings.LastIndexByte(local, ':')
			if i < 0 {
				continue
			}
			p, err := strconv.ParseUint(local[i+1:], 16, 16)
			if err != nil || !r.Contains(uint16(p)) || (state != "0A" && mine[remote]) {
				continue
			}
			held[uint16(p)] = fmt.Sprintf("%s %s -> %s, state %s", name, local, remote, state)
		}
		f.Close()
		if err := sc.Err(); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
	return held
}

// waitGoroutinesGone waits for the number of goroutines to fall back to
// what it was before the test, and fails with every goroutine's stack if
// it does not.
func waitGoroutinesGone(t *testing.T, before int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Errorf("%d goroutines left, %d before the test:\n%s",
				runtime.NumGoroutine(), before, buf[:runtime.Stack(buf, true)])
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}
