package gateway

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/tun"

	"github.com/sluice-vpn/sluice/nat"
	"github.com/sluice-vpn/sluice/netstack/netstacktest"
	"github.com/sluice-vpn/sluice/tunnel/wireguard"
)

// The soak drives one WireGuard gateway with several in-process peers
// through rounds of load and checks, after each, that what the load took
// (goroutines, descriptors, memory, flows) comes back. `make test` runs a
// short version (one round, phases of a few seconds); `make soak` sets
// SOAK_DURATION (10m) and runs rounds until it is spent.
//
// A round is four phases, with connection churn from three peers during
// each: churn alone; a half-open SYN flood from one peer (raw SYNs to a
// destination that never answers) while another downloads; a connect
// flood from one peer while another downloads; and egress-slice
// exhaustion on a second gateway with an 8-port slice, and its recovery.
// At the end the gateway is shut down the SIGTERM way, under a SYN flood
// and with a connection open, and must be done within its grace.

const (
	soakChurnPeers   = 3
	soakChurnWorkers = 3
	soakDownload     = 4 << 20
	soakGrace        = 3 * time.Second
)

// soakTimes returns how long each phase of a round lasts, whether round i
// should run, and how long to wait after a round before measuring memory.
func soakTimes(t *testing.T) (phase time.Duration, rounds func(int) bool, memWait time.Duration) {
	env := os.Getenv("SOAK_DURATION")
	if env == "" {
		return 2 * time.Second, func(i int) bool { return i < 1 }, 0
	}
	d, err := time.ParseDuration(env)
	if err != nil || d <= 0 {
		t.Fatalf("SOAK_DURATION=%q: want a positive duration such as 10m", env)
	}
	end := time.Now().Add(d)
	// Memory is compared once the client stacks' connections have left
	// TIME_WAIT (gVisor's default, 60 s): until then they hold what the
	// churn sent, in proportion to how much it did in the last minute.
	return 20 * time.Second, func(i int) bool { return i == 0 || time.Now().Before(end) }, 65 * time.Second
}

// usage is what the process holds: goroutines, open descriptors, resident
// memory, and the gateway's flows.
type usage struct {
	goroutines, fds int
	rssKB, heapKB   int64 // heap: live objects after a GC
	flows           int
}

func (u usage) String() string {
	return fmt.Sprintf("%d goroutines, %d fds, RSS %d MiB, heap %d MiB, %d flows", u.goroutines, u.fds, u.rssKB>>10, u.heapKB>>10, u.flows)
}

func measure(t *testing.T, srv *Server) usage {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatalf("counting descriptors: %v", err)
	}
	// Twice, so that what sync.Pools keep is gone too, and given back
	// to the kernel, so that RSS is what is in use.
	runtime.GC()
	debug.FreeOSMemory()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	u := usage{goroutines: runtime.NumGoroutine(), fds: len(ents), flows: srv.Table().Len(), heapKB: int64(ms.HeapAlloc >> 10)}
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(status)) {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			u.rssKB, _ = strconv.ParseInt(strings.Fields(v)[0], 10, 64)
		}
	}
	return u
}

// settle waits for the load's traces to go: no flows, and goroutines and
// descriptors back within slack of base. It fails with what is left.
func settle(t *testing.T, srv *Server, base usage, what string) usage {
	t.Helper()
	const goSlack, fdSlack = 8, 4
	deadline := time.Now().Add(15 * time.Second)
	for {
		u := measure(t, srv)
		if u.flows == 0 && u.goroutines <= base.goroutines+goSlack && u.fds <= base.fds+fdSlack {
			return u
		}
		if time.Now().After(deadline) {
			var flows []string
			for i, e := range srv.Table().Snapshot() {
				if i == 10 {
					break
				}
				flows = append(flows, fmt.Sprintf("%v %v", e.Key, e.State))
			}
			buf := make([]byte, 1<<20)
			t.Errorf("%s: not back to baseline 15 s after the load stopped: %v, baseline %v; flows left (first 10): %v\n%s",
				what, u, base, flows, buf[:runtime.Stack(buf, true)])
			return u
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// injectTun is a peer's tun.Device that can also send raw packets, as a
// misbehaving client's kernel would: SYNs that no socket stands behind.
type injectTun struct {
	*netstacktest.Client
	inject chan []byte
	in     chan []byte
	done   chan struct{}
	wg     sync.WaitGroup
}

func newInjectTun(c *netstacktest.Client) *injectTun {
	d := &injectTun{Client: c, inject: make(chan []byte, 1024), in: make(chan []byte, 128), done: make(chan struct{})}
	d.wg.Go(func() {
		defer close(d.in)
		bufs, sizes := [][]byte{make([]byte, 65536)}, []int{0}
		for {
			n, err := c.Read(bufs, sizes, 0)
			if err != nil {
				return
			}
			for i := range n {
				select {
				case d.in <- bytes.Clone(bufs[i][:sizes[i]]):
				case <-d.done:
					return
				}
			}
		}
	})
	return d
}

// Read implements tun.Device: the client stack's packets and the
// injected ones, whichever come first.
func (d *injectTun) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	var p []byte
	var ok bool
	select {
	case p, ok = <-d.in:
		if !ok {
			return 0, os.ErrClosed
		}
	case p = <-d.inject:
	}
	sizes[0] = copy(bufs[0][offset:], p)
	n := 1
	for n < len(bufs) {
		select {
		case p = <-d.inject:
			sizes[n] = copy(bufs[n][offset:], p)
			n++
		default:
			return n, nil
		}
	}
	return n, nil
}

func (d *injectTun) BatchSize() int { return 64 }

func (d *injectTun) Close() error {
	select {
	case <-d.done:
	default:
		close(d.done)
	}
	err := d.Client.Close()
	d.wg.Wait()
	return err
}

var _ tun.Device = (*injectTun)(nil)

// synPacket is an IPv4 TCP SYN from src to dst, checksums done.
func synPacket(src, dst netip.AddrPort, seq uint32) []byte {
	b := make([]byte, 40)
	b[0], b[8], b[9] = 0x45, 64, 6
	binary.BigEndian.PutUint16(b[2:], 40)
	s4, d4 := src.Addr().As4(), dst.Addr().As4()
	copy(b[12:16], s4[:])
	copy(b[16:20], d4[:])
	binary.BigEndian.PutUint16(b[10:], ^onesSum(0, b[:20]))
	tcp := b[20:]
	binary.BigEndian.PutUint16(tcp[0:], src.Port())
	binary.BigEndian.PutUint16(tcp[2:], dst.Port())
	binary.BigEndian.PutUint32(tcp[4:], seq)
	tcp[12], tcp[13] = 5<<4, 0x02
	binary.BigEndian.PutUint16(tcp[14:], 65535)
	pseudo := append(append(append([]byte{}, s4[:]...), d4[:]...), 0, 6, 0, 20)
	binary.BigEndian.PutUint16(tcp[16:], ^onesSum(uint32(onesSum(0, pseudo)), tcp))
	return b
}

func onesSum(s uint32, b []byte) uint16 {
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s > 0xffff {
		s = s>>16 + s&0xffff
	}
	return uint16(s)
}

// soakPeer is a WireGuard client of the gateway.
type soakPeer struct {
	name   string
	n      byte
	client *netstacktest.Client
	tun    *injectTun // nil unless the peer floods raw SYNs
	dev    *wireguard.Device
}

func newSoakPeer(t *testing.T, srv *Server, name string, n byte, raw bool) *soakPeer {
	t.Helper()
	key, err := wireguard.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	c, err := netstacktest.NewClient(peerAddrs(n), 1420)
	if err != nil {
		t.Fatal(err)
	}
	p := &soakPeer{name: name, n: n, client: c}
	var dev tun.Device = c
	if raw {
		p.tun = newInjectTun(c)
		dev = p.tun
	}
	p.dev, err = wireguard.New(dev, wireguard.Options{
		PrivateKey: key,
		Peers: []wireguard.Peer{{
			PublicKey:  srv.PublicKey(),
			Endpoint:   netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(srv.ListenPort())),
			AllowedIPs: []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")},
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.AddPeer(Peer{Name: name, PublicKey: key.PublicKey(), Addrs: peerAddrs(n)}); err != nil {
		t.Fatal(err)
	}
	return p
}

func (p *soakPeer) close() {
	p.dev.Close() // closes its tun.Device too
}

// soakServers are the destinations on loopback, all on ports outside the
// egress slice.
type soakServers struct {
	echo, bulk, hold net.Listener
	black            netip.AddrPort
	wg               sync.WaitGroup
	mu               sync.Mutex
	conns            map[net.Conn]bool
}

func listenSoak(t *testing.T) net.Listener {
	t.Helper()
	for {
		ln, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		if !slice.Contains(ln.Addr().(*net.TCPAddr).AddrPort().Port()) {
			return ln
		}
		defer ln.Close()
	}
}

func startSoakServers(t *testing.T) *soakServers {
	s := &soakServers{echo: listenSoak(t), bulk: listenSoak(t), hold: listenSoak(t), black: blackhole(t), conns: map[net.Conn]bool{}}
	serve := func(ln net.Listener, fn func(net.Conn)) {
		s.wg.Go(func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				s.mu.Lock()
				s.conns[c] = true
				s.mu.Unlock()
				s.wg.Go(func() {
					defer func() {
						c.Close()
						s.mu.Lock()
						delete(s.conns, c)
						s.mu.Unlock()
					}()
					fn(c)
				})
			}
		})
	}
	// Echo until the client's FIN, then close: a client's half-close
	// gets its echo and then the server's FIN.
	serve(s.echo, func(c net.Conn) { io.Copy(c, c) })
	// Send soakDownload bytes, then close.
	serve(s.bulk, func(c net.Conn) {
		io.CopyN(c, rand.NewChaCha8([32]byte{1}), soakDownload)
	})
	// Hold the connection until the client ends it.
	serve(s.hold, func(c net.Conn) { io.Copy(io.Discard, c) })
	t.Cleanup(s.close)
	return s
}

func (s *soakServers) close() {
	s.echo.Close()
	s.bulk.Close()
	s.hold.Close()
	s.mu.Lock()
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

func addrOfListener(ln net.Listener) string { return ln.Addr().String() }

// churnCounts counts the churn's connections by how they ended.
type churnCounts struct {
	fin, rst, half, failed atomic.Int64
	firstErr               atomic.Pointer[string]
}

// churn opens, uses and ends connections to the echo server until ctx
// ends, in turn with a clean FIN after the echo, an abort with unread
// data (which gVisor, like Linux, turns into a RST), and a half-close
// that waits for the server's FIN.
func churn(ctx context.Context, p *soakPeer, echo string, worker int, cc *churnCounts) {
	rng := rand.New(rand.NewPCG(uint64(p.n), uint64(worker)))
	for i := 0; ctx.Err() == nil; i++ {
		err := churnOnce(ctx, p, echo, i%3, rng)
		switch {
		case err != nil && ctx.Err() != nil:
			return
		case err != nil:
			cc.failed.Add(1)
			msg := fmt.Sprintf("%s: %v", p.name, err)
			cc.firstErr.CompareAndSwap(nil, &msg)
		case i%3 == 0:
			cc.fin.Add(1)
		case i%3 == 1:
			cc.rst.Add(1)
		default:
			cc.half.Add(1)
		}
	}
}

func churnOnce(ctx context.Context, p *soakPeer, echo string, mode int, rng *rand.Rand) error {
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	c, err := p.client.DialContext(dctx, "tcp4", echo)
	if err != nil {
		return fmt.Errorf("dial: %w", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	msg := make([]byte, 1+rng.IntN(32<<10))
	for i := range msg {
		msg[i] = byte(rng.Uint32())
	}
	switch mode {
	case 0: // FIN after the whole echo
		if _, err := c.Write(msg); err != nil {
			return fmt.Errorf("write: %w", err)
		}
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(c, got); err != nil {
			return fmt.Errorf("read echo: %w", err)
		}
		if !bytes.Equal(got, msg) {
			return errors.New("echo differs")
		}
	case 1: // RST: close with echoed data unread
		if len(msg) < 4<<10 {
			msg = append(msg, make([]byte, 4<<10)...)
		}
		if _, err := c.Write(msg); err != nil {
			return fmt.Errorf("write: %w", err)
		}
		var one [1]byte
		if _, err := io.ReadFull(c, one[:]); err != nil {
			return fmt.Errorf("read: %w", err)
		}
		// Let more of the echo arrive: gVisor, like Linux, resets a
		// connection closed with data unread, and ends it with a FIN
		// otherwise.
		time.Sleep(20 * time.Millisecond)
	case 2: // half-close, then the rest of the echo and the server's FIN
		if _, err := c.Write(msg); err != nil {
			return fmt.Errorf("write: %w", err)
		}
		cw, ok := c.(interface{ CloseWrite() error })
		if !ok {
			return fmt.Errorf("%T has no CloseWrite", c)
		}
		if err := cw.CloseWrite(); err != nil {
			return fmt.Errorf("close write: %w", err)
		}
		got, err := io.ReadAll(c)
		if err != nil {
			return fmt.Errorf("read to EOF: %w", err)
		}
		if !bytes.Equal(got, msg) {
			return fmt.Errorf("echo after half-close: %d bytes, want %d", len(got), len(msg))
		}
	}
	return nil
}

// download fetches soakDownload bytes from the bulk server.
func download(p *soakPeer, bulk string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := p.client.DialContext(ctx, "tcp4", bulk)
	if err != nil {
		return fmt.Errorf("dial: %w", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	n, err := io.Copy(io.Discard, c)
	if err == nil && n != soakDownload {
		err = fmt.Errorf("%d bytes, want %d", n, soakDownload)
	}
	return err
}

// synFlood injects SYNs from p to dst, from ever new ports, at about rate
// a second, until ctx ends; it returns how many.
func synFlood(ctx context.Context, p *soakPeer, dst netip.AddrPort, rate int) int {
	src := peerAddrs(p.n)[0]
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	sent := 0
	for port := uint32(0); ; {
		select {
		case <-ctx.Done():
			return sent
		case <-tick.C:
		}
		for range max(1, rate/100) {
			port++
			pkt := synPacket(netip.AddrPortFrom(src, uint16(20000+port%40000)), dst, rand.Uint32())
			select {
			case p.tun.inject <- pkt:
				sent++
			default: // WireGuard is behind; a flood does not wait
			}
		}
	}
}

// connectFlood opens connections from p to the hold server as fast as it
// can, keeping them, until ctx ends; it returns them and how many dials
// failed.
func connectFlood(ctx context.Context, p *soakPeer, hold string) (conns []net.Conn, failed int) {
	var mu sync.Mutex
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for ctx.Err() == nil {
				dctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
				c, err := p.client.DialContext(dctx, "tcp4", hold)
				cancel()
				mu.Lock()
				if err == nil {
					conns = append(conns, c)
				} else {
					failed++
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return conns, failed
}

// exhaustSlice fills the 8-port egress slice of a second gateway with
// flows to one destination until it refuses, then closes them and checks
// that the ports come back and a new flow gets through.
func exhaustSlice(t *testing.T) {
	tiny := nat.PortRange{Lo: 41990, Hi: 41997}
	h := start(t, func(o *Options) {
		o.Egress = nat.EgressOptions{Ports: tiny, DialTimeout: 2 * time.Second}
		o.Limits = nat.LimiterOptions{Default: nat.Limits{NewFlowsPerSecond: -1, MaxFlows: -1}}
	})
	dst := newHoldServer(t)
	defer dst.close()
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for i := 0; ; i++ {
		c, err := openEcho(h, dst.addr(), byte(i))
		if err == nil {
			conns = append(conns, c)
			if i > tiny.Len() {
				t.Fatalf("exhaustion: flow %d got through an %d-port slice", i+1, tiny.Len())
			}
			continue
		}
		if !strings.Contains(err.Error(), "refused") {
			t.Fatalf("exhaustion: flow %d: want connection refused, got %v", i+1, err)
		}
		break
	}
	if len(conns) == 0 {
		t.Fatal("exhaustion: no flow got through at all")
	}
	full := len(conns)
	dst.closeConns()
	for _, c := range conns {
		c.Close()
	}
	conns = nil
	deadline := time.Now().Add(10 * time.Second)
	for {
		st := h.srv.Stats()
		if n, ports := egressTCP(st.Egress); st.Table.Flows == 0 && n == 0 && ports == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("exhaustion: 10 s after closing %d flows: %d flows, pool %+v", full, st.Table.Flows, st.Egress)
		}
		time.Sleep(50 * time.Millisecond)
	}
	for i := range full {
		c, err := openEcho(h, dst.addr(), byte(i))
		if err != nil {
			t.Fatalf("exhaustion: after recovery, flow %d of %d: %v", i+1, full, err)
		}
		conns = append(conns, c)
	}
	t.Logf("exhaustion: %d flows filled the %d-port slice, the next was refused; all %d came back", full, tiny.Len(), full)
}

func TestSoak(t *testing.T) {
	if testing.Short() {
		t.Skip("soak skipped in -short mode")
	}
	phase, more, memWait := soakTimes(t)
	raiseFileLimit(t, 4096)
	before := runtime.NumGoroutine()
	t.Cleanup(func() { waitGoroutinesGone(t, before) })

	key, err := wireguard.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	srv, err := New(Options{
		WireGuard: &WireGuardOptions{PrivateKey: key},
		Addrs:     []netip.Addr{gatewayV4},
		Egress:    nat.EgressOptions{Ports: slice, DialTimeout: time.Second},
		Policy:    nat.PolicyOptions{Allow: loopback},
		// Churn must fit under the rate; the connect flood meets the
		// concurrent-flow limit.
		Limits: nat.LimiterOptions{Default: nat.Limits{NewFlowsPerSecond: 2000, Burst: 1000, MaxFlows: 256}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			srv.Close()
		}
	}()
	servers := startSoakServers(t)
	echo, bulk, hold := addrOfListener(servers.echo), addrOfListener(servers.bulk), addrOfListener(servers.hold)

	var churners []*soakPeer
	for i := range soakChurnPeers {
		churners = append(churners, newSoakPeer(t, srv, fmt.Sprintf("churn%d", i), byte(2+i), false))
	}
	flooder := newSoakPeer(t, srv, "flooder", 6, true)
	victim := newSoakPeer(t, srv, "victim", 7, false)
	peers := append(append([]*soakPeer{}, churners...), flooder, victim)
	defer func() {
		for _, p := range peers {
			p.close()
		}
	}()

	// Warm up: every peer's handshake done, one flow each, the servers'
	// and the gateway's lazily made things made.
	rng := rand.New(rand.NewPCG(1, 2))
	for _, p := range peers {
		if err := churnOnce(context.Background(), p, echo, 0, rng); err != nil {
			t.Fatalf("warm-up through %s: %v", p.name, err)
		}
	}
	if err := download(victim, bulk); err != nil {
		t.Fatalf("warm-up download: %v", err)
	}
	t.Run("exhaustion", exhaustSlice)
	for deadline := time.Now().Add(10 * time.Second); srv.Table().Len() > 0 && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
	}
	runtime.GC()
	base := measure(t, srv)
	t.Logf("baseline: %v", base)
	peakRSS := base.rssKB
	var first usage // after round 0

	rounds := 0
	for round := 0; more(round); round++ {
		rounds++
		var cc churnCounts
		ctx, stopChurn := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		for _, p := range churners {
			for w := range soakChurnWorkers {
				wg.Go(func() { churn(ctx, p, echo, w, &cc) })
			}
		}

		// Phase 1: churn alone.
		time.Sleep(phase)

		// Phase 2: a half-open SYN flood from one peer while another
		// downloads and churn goes on.
		fctx, stopFlood := context.WithCancel(context.Background())
		var syns int
		var fwg sync.WaitGroup
		fwg.Go(func() { syns = synFlood(fctx, flooder, servers.black, 2000) })
		time.Sleep(phase / 4)
		t0 := time.Now()
		var downloads int
		var synErr error
		for time.Since(t0) < phase && synErr == nil {
			if synErr = download(victim, bulk); synErr == nil {
				downloads++
			}
		}
		stopFlood()
		fwg.Wait()
		if synErr != nil {
			t.Errorf("round %d: the victim's download during a SYN flood from another peer failed: %v", round, synErr)
		}
		t.Logf("round %d: SYN flood: %d SYNs injected; victim downloaded %d × %d MiB meanwhile; stack %+v", round, syns, downloads, soakDownload>>20, srv.Stats().Stack)

		// Phase 3: a connect flood from one peer while another downloads.
		fctx, stopFlood = context.WithCancel(context.Background())
		var held []net.Conn
		var floodFailed int
		fwg.Go(func() { held, floodFailed = connectFlood(fctx, flooder, hold) })
		time.Sleep(phase / 4)
		t0, downloads = time.Now(), 0
		var connErr error
		for time.Since(t0) < phase && connErr == nil {
			if connErr = download(victim, bulk); connErr == nil {
				downloads++
			}
		}
		var flood nat.PeerLimitStats
		for _, l := range srv.Stats().Limits {
			if l.Peer == "flooder" {
				flood = l
			}
		}
		stopFlood()
		fwg.Wait()
		for _, c := range held {
			c.Close()
		}
		if connErr != nil {
			t.Errorf("round %d: the victim's download during a connect flood from another peer failed: %v", round, connErr)
		}
		if flood.Flows > 256 {
			t.Errorf("round %d: the flooder held %d flows; its limit is 256", round, flood.Flows)
		}
		t.Logf("round %d: connect flood: %d connections held, %d dials failed, limits %+v; victim downloaded %d × %d MiB meanwhile",
			round, len(held), floodFailed, flood, downloads, soakDownload>>20)

		// Phase 4: egress-slice exhaustion and recovery, on a gateway of
		// its own that the subtest's end takes down.
		t.Run(fmt.Sprintf("exhaustion-%d", round), exhaustSlice)

		stopChurn()
		wg.Wait()
		st := srv.Stats()
		refused := map[string]uint64{}
		for i, n := range st.Refused {
			if n > 0 {
				refused[RefusalNames[i]] = n
			}
		}
		t.Logf("round %d: churn: %d FIN, %d RST, %d half-close, %d failed; refusals so far %v; egress exhausted %d times",
			round, cc.fin.Load(), cc.rst.Load(), cc.half.Load(), cc.failed.Load(), refused, st.Egress.Exhausted)
		for _, l := range st.Limits {
			if strings.HasPrefix(l.Peer, "churn") {
				t.Logf("round %d: %s limits %+v", round, l.Peer, l)
			}
		}
		if cc.fin.Load() == 0 || cc.rst.Load() == 0 || cc.half.Load() == 0 {
			t.Errorf("round %d: a churn mode never completed", round)
		}
		if f := cc.failed.Load(); f > (cc.fin.Load()+cc.rst.Load()+cc.half.Load())/100 {
			t.Errorf("round %d: %d churn connections failed, first: %s", round, f, *cc.firstErr.Load())
		}
		u := settle(t, srv, base, fmt.Sprintf("round %d", round))
		t.Logf("round %d: after the load: %v", round, u)
		if memWait > 0 {
			time.Sleep(memWait)
			u = measure(t, srv)
			t.Logf("round %d: %v later: %v", round, memWait, u)
		}
		// Memory is bounded by limits, not by how long the gateway ran.
		// Right after a round most of what is held is the test's own
		// client stacks' closed connections in TIME_WAIT with their
		// buffers (a heap profile, SOAK_HEAPPROFILE, shows it), so the
		// short version only bounds it loosely; the long one waits for
		// TIME_WAIT to pass, and then memory must be back near where it
		// started, and must not creep up from round to round.
		heapSlack, rssSlack := int64(1<<20), int64(2<<20)
		if memWait > 0 {
			heapSlack, rssSlack = 128<<10, 256<<10
		}
		if soakRace {
			rssSlack *= 3 // -race's shadow memory
		}
		if u.heapKB > base.heapKB+heapSlack {
			t.Errorf("round %d: live heap %d MiB, from %d MiB at the start", round, u.heapKB>>10, base.heapKB>>10)
		}
		if u.rssKB > base.rssKB+rssSlack {
			t.Errorf("round %d: RSS %d MiB, from %d MiB at the start", round, u.rssKB>>10, base.rssKB>>10)
		}
		if round == 0 {
			first = u
		} else if u.rssKB > first.rssKB+first.rssKB/4+64<<10 || u.heapKB > first.heapKB+first.heapKB/4+32<<10 {
			t.Errorf("round %d: RSS %d MiB and heap %d MiB still growing after round 0's %d MiB and %d MiB",
				round, u.rssKB>>10, u.heapKB>>10, first.rssKB>>10, first.heapKB>>10)
		}
		if path := os.Getenv("SOAK_HEAPPROFILE"); path != "" {
			writeHeapProfile(t, fmt.Sprintf("%s.%d", path, round))
		}
		peakRSS = max(peakRSS, u.rssKB)
		if t.Failed() {
			break
		}
	}

	// SIGTERM's path: shut down with a connection open and a SYN flood
	// on; Shutdown must return within its grace.
	open, err := victim.client.DialContext(context.Background(), "tcp4", hold)
	if err != nil {
		t.Fatalf("a connection to hold open over the shutdown: %v", err)
	}
	defer open.Close()
	fctx, stopFlood := context.WithCancel(context.Background())
	var fwg sync.WaitGroup
	fwg.Go(func() { synFlood(fctx, flooder, servers.black, 2000) })
	time.Sleep(500 * time.Millisecond)
	grace, cancel := context.WithTimeout(context.Background(), soakGrace)
	defer cancel()
	t0 := time.Now()
	done := make(chan error, 1)
	go func() { done <- srv.Shutdown(grace) }()
	select {
	case <-done:
		closed = true
		took := time.Since(t0)
		t.Logf("shutdown with a connection open and a SYN flood on: %v (grace %v)", took.Round(time.Millisecond), soakGrace)
		if took > soakGrace+time.Second {
			t.Errorf("Shutdown took %v with a grace of %v", took, soakGrace)
		}
	case <-time.After(soakGrace + 10*time.Second):
		stopFlood()
		buf := make([]byte, 1<<20)
		t.Fatalf("Shutdown with a %v grace had not returned after %v:\n%s", soakGrace, time.Since(t0), buf[:runtime.Stack(buf, true)])
	}
	stopFlood()
	fwg.Wait()
	if n := srv.Table().Len(); n != 0 {
		t.Errorf("after Shutdown: %d flows in the table", n)
	}
	t.Logf("peak RSS after a round %d MiB, baseline %d MiB; rounds: %d", peakRSS>>10, base.rssKB>>10, rounds)
}

// writeHeapProfile writes a heap profile to path, for a soak whose memory
// needs explaining (SOAK_HEAPPROFILE=/tmp/heap).
func writeHeapProfile(t *testing.T, path string) {
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
		t.Fatal(err)
	}
	t.Logf("heap profile: %s", path)
}
