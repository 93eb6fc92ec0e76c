package nat

import (
	"context"
	"errors"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
	"golang.org/x/sys/unix"
)

// The port windows below lie inside Linux's default ephemeral range, because
// the kernel only honours IP_LOCAL_PORT_RANGE there; each test has its own
// window so that TIME_WAIT leftovers of one cannot starve another.

// onFixedPort calls listen with random ports below the ephemeral range until
// one is free. Test servers must not take an ephemeral port: it could fall
// into the slice under test and leave the pool a port short.
func onFixedPort(listen func(port uint16) error) error {
	var err error
	for range 100 {
		if err = listen(uint16(20000 + rand.IntN(10000))); !errors.Is(err, syscall.EADDRINUSE) {
			return err
		}
	}
	return err
}

// tcpServer accepts connections on addr and reports each client's address.
type tcpServer struct {
	ln    net.Listener
	peers chan netip.AddrPort
	mu    sync.Mutex
	conns []net.Conn
}

func newTCPServer(t *testing.T, addr netip.Addr) *tcpServer {
	t.Helper()
	var ln *net.TCPListener
	err := onFixedPort(func(port uint16) (err error) {
		ln, err = net.ListenTCP(network("tcp", addr), net.TCPAddrFromAddrPort(netip.AddrPortFrom(addr, port)))
		return err
	})
	if err != nil {
		t.Fatalf("listen on %s: %v", addr, err)
	}
	s := &tcpServer{ln: ln, peers: make(chan netip.AddrPort, 1024)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.conns = append(s.conns, c)
			s.mu.Unlock()
			s.peers <- c.RemoteAddr().(*net.TCPAddr).AddrPort()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		s.mu.Lock()
		for _, c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
	})
	return s
}

func (s *tcpServer) addr() netip.AddrPort { return s.ln.Addr().(*net.TCPAddr).AddrPort() }

// peer waits for the next accepted connection's client address.
func (s *tcpServer) peer(t *testing.T) netip.AddrPort {
	t.Helper()
	select {
	case p := <-s.peers:
		return p
	case <-time.After(5 * time.Second):
		t.Fatal("server saw no connection")
		return netip.AddrPort{}
	}
}

// closeHard closes c with a RST so that its port leaves no TIME_WAIT behind
// and is free again at once.
func closeHard(c *net.TCPConn) {
	c.SetLinger(0)
	c.Close()
}

func newTestEgress(t *testing.T, opts EgressOptions) *Egress {
	t.Helper()
	e, err := NewEgress(opts)
	if err != nil {
		t.Fatalf("NewEgress(%+v): %v", opts, err)
	}
	if !opts.ExplicitBind && !e.Stats().KernelPorts {
		t.Skip("kernel does not support IP_LOCAL_PORT_RANGE for this slice; the kernel path cannot be tested here")
	}
	if !opts.ExplicitBind {
		// The pool silently falls back to explicit binds when the kernel
		// strays from the slice; a kernel-path test must notice that.
		t.Cleanup(func() {
			if !e.Stats().KernelPorts {
				t.Error("the kernel picked a port outside the slice; the pool fell back to explicit binds")
			}
		})
	}
	return e
}

func have6(t *testing.T) {
	t.Helper()
	c, err := net.ListenUDP("udp6", &net.UDPAddr{IP: net.IPv6loopback})
	if err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	}
	c.Close()
}

// modes runs f once with the kernel choosing ports and once with the pool's
// own allocator, each with and without a configured egress address.
func modes(t *testing.T, f func(t *testing.T, explicit bool, addrs []netip.Addr)) {
	for _, m := range []struct {
		name     string
		explicit bool
		addrs    []netip.Addr
	}{
		{"kernel/any-addr", false, nil},
		{"kernel/addr", false, []netip.Addr{lo4, lo6}},
		{"explicit/any-addr", true, nil},
		{"explicit/addr", true, []netip.Addr{lo4, lo6}},
	} {
		t.Run(m.name, func(t *testing.T) {
			isolatePorts(t)
			f(t, m.explicit, m.addrs)
		})
	}
}

// isolatePorts moves the calling goroutine, when the tests run as root,
// into a network namespace of its own with loopback up: the fixed egress
// slices of these tests then cannot meet the sockets of other packages'
// tests, which go test runs at the same time and whose ephemeral ports
// may land in them. As another user the tests share the host's ports.
func isolatePorts(t *testing.T) {
	t.Helper()
	if unix.Geteuid() != 0 {
		return
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return
	}
	enterLoopbackNetns(t)
}

func TestEgressDialLandsInSlice(t *testing.T) {
	have6(t)
	base := uint16(40000)
	modes(t, func(t *testing.T, explicit bool, addrs []netip.Addr) {
		ports := PortRange{Lo: base, Hi: base + 9}
		base += 10
		e := newTestEgress(t, EgressOptions{Ports: ports, ExplicitBind: explicit, Addrs: addrs})
		if e.Slice() != ports {
			t.Fatalf("Slice() = %s, want %s", e.Slice(), ports)
		}
		for _, a := range []netip.Addr{lo4, lo6} {
			srv := newTCPServer(t, a)
			c, err := e.DialTCP(context.Background(), srv.addr())
			if err != nil {
				t.Fatalf("DialTCP %s: %v", srv.addr(), err)
			}
			defer closeHard(c)
			p := srv.peer(t)
			if !ports.Contains(p.Port()) {
				t.Errorf("server %s saw source port %d, outside the slice %s", srv.addr(), p.Port(), ports)
			}
			if p.Addr().Unmap() != a {
				t.Errorf("server %s saw source address %s", srv.addr(), p.Addr())
			}
			if got := c.LocalAddr().(*net.TCPAddr).AddrPort().Port(); got != p.Port() {
				t.Errorf("conn local port %d, server saw %d", got, p.Port())
			}
		}
	})
}

func TestEgressShardsDisjoint(t *testing.T) {
	isolatePorts(t)
	whole := PortRange{Lo: 41000, Hi: 41099}
	const perShard = 40
	srv := newTCPServer(t, lo4)
	var slices [2]PortRange
	seen := map[uint16]int{} // port -> shard
	for shard := range 2 {
		e := newTestEgress(t, EgressOptions{Ports: whole, Shard: shard, Shards: 2})
		slices[shard] = e.Slice()
		for range perShard {
			c, err := e.DialTCP(context.Background(), srv.addr())
			if err != nil {
				t.Fatalf("shard %d: DialTCP: %v", shard, err)
			}
			defer closeHard(c)
			p := srv.peer(t).Port()
			if !slices[shard].Contains(p) {
				t.Errorf("shard %d used port %d outside its slice %s", shard, p, slices[shard])
			}
			if other, dup := seen[p]; dup {
				t.Errorf("port %d used by shard %d and shard %d", p, other, shard)
			}
			seen[p] = shard
		}
	}
	if slices[0].Lo != whole.Lo || slices[1].Hi != whole.Hi || slices[0].Hi+1 != slices[1].Lo {
		t.Errorf("slices %s and %s do not split %s", slices[0], slices[1], whole)
	}
	if len(seen) != 2*perShard {
		t.Errorf("%d distinct ports for %d connections to one server", len(seen), 2*perShard)
	}
}

func TestEgressPortReuseAcrossDestinations(t *testing.T) {
	have6(t)
	base := uint16(42000)
	modes(t, func(t *testing.T, explicit bool, addrs []netip.Addr) {
		ports := PortRange{Lo: base, Hi: base + 3}
		base += 10
		core, logs := observer.New(zapcore.WarnLevel)
		e := newTestEgress(t, EgressOptions{Ports: ports, ExplicitBind: explicit, Addrs: addrs, Logger: zap.New(core)})
		a, b := newTCPServer(t, lo4), newTCPServer(t, lo4)

		var conns []*net.TCPConn
		defer func() {
			for _, c := range conns {
				closeHard(c)
			}
		}()
		for _, srv := range []*tcpServer{a, b} {
			used := map[uint16]bool{}
			for i := range 4 {
				c, err := e.DialTCP(context.Background(), srv.addr())
				if err != nil {
					t.Fatalf("connection %d to %s: %v", i+1, srv.addr(), err)
				}
				conns = append(conns, c)
				p := srv.peer(t).Port()
				if !ports.Contains(p) || used[p] {
					t.Errorf("connection %d to %s from port %d (slice %s, used %v)", i+1, srv.addr(), p, ports, used)
				}
				used[p] = true
			}
		}

		st := e.Stats()
		if st.Exhausted != 0 {
			t.Errorf("Exhausted = %d before exhaustion", st.Exhausted)
		}
		if tcpPorts, tcpConns := sumTCP(st); tcpPorts != 4 || tcpConns != 8 {
			t.Errorf("Stats: %d TCP ports for %d conns, want 4 for 8: %+v", tcpPorts, tcpConns, st)
		}

		for i := range 3 {
			c, err := e.DialTCP(context.Background(), a.addr())
			if !errors.Is(err, ErrPortsExhausted) {
				if c != nil {
					conns = append(conns, c)
				}
				t.Fatalf("dial %d to %s with all ports in use: err = %v, want ErrPortsExhausted", 9+i, a.addr(), err)
			}
		}
		st = e.Stats()
		if st.Exhausted != 3 || st.DialErrors != 0 {
			t.Errorf("Exhausted = %d, DialErrors = %d; want 3, 0", st.Exhausted, st.DialErrors)
		}
		if n := logs.FilterMessage("egress ports exhausted").Len(); n != 1 {
			t.Errorf("%d exhaustion warnings for 3 failures, want 1 (rate-limited)", n)
		}

		// Freeing one port makes room again.
		closeHard(conns[0])
		if _, conns := sumTCP(e.Stats()); conns != 7 {
			t.Errorf("after closing one connection Stats counts %d, want 7", conns)
		}
		c, err := e.DialTCP(context.Background(), a.addr())
		if err != nil {
			t.Fatalf("dial after freeing a port: %v", err)
		}
		conns[0] = c
	})
}

func sumTCP(st EgressStats) (ports, conns int) {
	for _, a := range st.Addrs {
		ports += a.TCPPorts
		conns += a.TCPConns
	}
	return ports, conns
}

func TestEgressListenUDP(t *testing.T) {
	have6(t)
	base := uint16(43000)
	modes(t, func(t *testing.T, explicit bool, addrs []netip.Addr) {
		ports := PortRange{Lo: base, Hi: base + 3}
		base += 10
		e := newTestEgress(t, EgressOptions{Ports: ports, ExplicitBind: explicit, Addrs: addrs})
		for _, dst := range []netip.Addr{lo4, lo6} {
			var srv *net.UDPConn
			err := onFixedPort(func(port uint16) (err error) {
				srv, err = net.ListenUDP(network("udp", dst), net.UDPAddrFromAddrPort(netip.AddrPortFrom(dst, port)))
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			defer srv.Close()

			var socks []*net.UDPConn
			used := map[uint16]bool{}
			for i := range 4 {
				c, err := e.ListenUDP(context.Background(), dst)
				if err != nil {
					t.Fatalf("ListenUDP %d for %s: %v", i+1, dst, err)
				}
				defer c.Close()
				socks = append(socks, c)
				// The server sees the source port, proving the socket
				// really sends from the slice.
				if _, err := c.WriteToUDPAddrPort([]byte("hi"), srv.LocalAddr().(*net.UDPAddr).AddrPort()); err != nil {
					t.Fatal(err)
				}
				srv.SetReadDeadline(time.Now().Add(5 * time.Second))
				_, from, err := srv.ReadFromUDPAddrPort(make([]byte, 16))
				if err != nil {
					t.Fatal(err)
				}
				if !ports.Contains(from.Port()) || used[from.Port()] {
					t.Errorf("UDP socket %d for %s sends from %s (slice %s, used %v)", i+1, dst, from, ports, used)
				}
				if from.Addr().Unmap() != dst {
					t.Errorf("UDP socket for %s sends from address %s", dst, from.Addr())
				}
				used[from.Port()] = true
			}
			if _, err := e.ListenUDP(context.Background(), dst); !errors.Is(err, ErrPortsExhausted) {
				t.Fatalf("fifth ListenUDP for %s: err = %v, want ErrPortsExhausted", dst, err)
			}
			var udp int
			for _, a := range e.Stats().Addrs {
				udp += a.UDPPorts
			}
			if udp != 4 {
				t.Errorf("Stats counts %d UDP ports, want 4", udp)
			}
			socks[2].Close()
			c, err := e.ListenUDP(context.Background(), dst)
			if err != nil {
				t.Fatalf("ListenUDP after closing one: %v", err)
			}
			c.Close()
			for _, s := range socks {
				s.Close()
			}
		}
	})
}

func TestEgressDialErrorsClassify(t *testing.T) {
	isolatePorts(t)
	e := newTestEgress(t, EgressOptions{Ports: PortRange{Lo: 44000, Hi: 44009}, Addrs: []netip.Addr{lo4}, DialTimeout: 300 * time.Millisecond})

	// Refused: a port nobody listens on any more.
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().(*net.TCPAddr).AddrPort()
	ln.Close()
	if _, err := e.DialTCP(context.Background(), closed); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("dial to closed port: err = %v, want ECONNREFUSED", err)
	}

	// No address of the family: unreachable, as a missing route would be.
	if _, err := e.DialTCP(context.Background(), netip.AddrPortFrom(lo6, 9)); !errors.Is(err, syscall.ENETUNREACH) {
		t.Errorf("IPv6 dial from a v4-only pool: err = %v, want ENETUNREACH", err)
	}
	if _, err := e.ListenUDP(context.Background(), lo6); !errors.Is(err, syscall.ENETUNREACH) {
		t.Errorf("IPv6 UDP from a v4-only pool: err = %v, want ENETUNREACH", err)
	}

	// Timeout: a listener whose accept queue is full drops further SYNs,
	// so the handshake never completes — without leaving loopback.
	full := fullListener(t)
	start := time.Now()
	_, err = e.DialTCP(context.Background(), full)
	if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("dial to a full accept queue: err = %v, want context.DeadlineExceeded and os.ErrDeadlineExceeded", err)
	}
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Errorf("dial timeout error %v is not a net.Error with Timeout()", err)
	}
	if el := time.Since(start); el > 3*time.Second {
		t.Errorf("dial took %v with DialTimeout 300ms", el)
	}

	// A cancelled context stops the dial.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := e.DialTCP(ctx, full); !errors.Is(err, context.Canceled) {
		t.Errorf("dial with cancelled context: err = %v, want context.Canceled", err)
	}

	if st := e.Stats(); st.DialErrors != 5 || st.Exhausted != 0 {
		t.Errorf("DialErrors = %d, Exhausted = %d; want 5, 0", st.DialErrors, st.Exhausted)
	}
}

// fullListener returns the address of a loopback listener with a backlog of
// zero whose single queue slot is taken, so that new SYNs are dropped.
func fullListener(t *testing.T) netip.AddrPort {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.AddrPortFrom(lo4, uint16(sa.(*syscall.SockaddrInet4).Port))
	filler, err := net.DialTimeout("tcp4", addr.String(), 2*time.Second)
	if err != nil {
		t.Fatalf("filling the accept queue: %v", err)
	}
	t.Cleanup(func() { filler.Close() })
	return addr
}

func TestEgressTracksWithoutLeaking(t *testing.T) {
	isolatePorts(t)
	// Sockets closed without Stats ever being called must not pile up in
	// the pool's bookkeeping.
	e := newTestEgress(t, EgressOptions{Ports: PortRange{Lo: 44100, Hi: 44109}, ExplicitBind: true})
	for range 500 {
		c, err := e.ListenUDP(context.Background(), lo4)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	e.mu.Lock()
	n, h := len(e.socks), len(e.udpHeld)
	e.mu.Unlock()
	if n > 64 || h > 10 {
		t.Errorf("after 500 closed sockets the pool tracks %d sockets and %d held ports", n, h)
	}
}
