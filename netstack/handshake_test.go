package netstack

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/sluice-vpn/sluice/netstack/netstacktest"
)

// rawSYN builds a TCP SYN (with checksums) from src to dst, as a client
// that will never answer the SYN-ACK sends it.
func rawSYN(src, dst netip.AddrPort, seq uint32) []byte {
	s, d := src.Addr().Unmap(), dst.Addr().Unmap()
	var b []byte
	var th header.TCP
	var sa, da tcpip.Address
	if s.Is4() {
		b = make([]byte, 40)
		sa, da = tcpip.AddrFrom4(s.As4()), tcpip.AddrFrom4(d.As4())
		ip := header.IPv4(b)
		ip.Encode(&header.IPv4Fields{TotalLength: 40, TTL: 64, Protocol: 6, SrcAddr: sa, DstAddr: da})
		ip.SetChecksum(^ip.CalculateChecksum())
		th = header.TCP(b[20:])
	} else {
		b = make([]byte, 60)
		sa, da = tcpip.AddrFrom16(s.As16()), tcpip.AddrFrom16(d.As16())
		header.IPv6(b).Encode(&header.IPv6Fields{PayloadLength: 20, TransportProtocol: 6, HopLimit: 64, SrcAddr: sa, DstAddr: da})
		th = header.TCP(b[40:])
	}
	th.Encode(&header.TCPFields{SrcPort: src.Port(), DstPort: dst.Port(), SeqNum: seq, DataOffset: 20,
		Flags: header.TCPFlagSyn, WindowSize: 65535})
	th.SetChecksum(^th.CalculateChecksum(header.PseudoHeaderChecksum(6, sa, da, 20)))
	return b
}

// drain reads and discards what the stack sends until it is closed: the
// SYN-ACKs, RSTs and ICMP errors meant for clients that never listen.
func drain(s *Stack) (wait func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		bufs, sizes := [][]byte{make([]byte, 65535)}, []int{0}
		for {
			if _, err := s.Read(bufs, sizes, 0); err != nil {
				return
			}
		}
	}()
	return func() { <-done }
}

// slowRefuser refuses every dial after a short pause, the way a
// destination that answers with RST does.
type slowRefuser struct {
	refusingHandler
	pause time.Duration
}

func (h *slowRefuser) DialTCP(ctx context.Context, src, dst netip.AddrPort) (net.Conn, error) {
	h.calls.Add(1)
	select {
	case <-time.After(h.pause):
	case <-ctx.Done():
	}
	return nil, syscall.ECONNREFUSED
}

// waitInFlight polls until the stack has no handshake in flight.
func waitInFlight(t *testing.T, s *Stack, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		n := s.Stats().InFlight
		if n == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d handshakes still in flight %v after the flood", n, within)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// closeWithin closes s and fails the test if that takes longer than d.
func closeWithin(t *testing.T, s *Stack, d time.Duration) {
	t.Helper()
	done := make(chan struct{})
	go func() { s.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("Stack.Close did not return within %v", d)
	}
}

// TestRefusedSYNFloodLeavesNoHandshakeInFlight floods SYNs whose dials are
// refused, each SYN sent again and again while its dial is in progress
// and after its RST, from several writers at once: every handshake slot
// must come back, and Close must return.
func TestRefusedSYNFloodLeavesNoHandshakeInFlight(t *testing.T) {
	h := &slowRefuser{pause: 200 * time.Microsecond}
	s, err := New(Options{Handler: h, MaxInFlight: 16})
	if err != nil {
		t.Fatal(err)
	}
	waitDrain := drain(s)
	dst := netip.MustParseAddrPort("192.0.2.1:443")

	const writers, ports, rounds = 4, 64, 60
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			batch := make([][]byte, 0, ports)
			for range rounds {
				batch = batch[:0]
				for p := range ports {
					src := netip.AddrPortFrom(clientV4, uint16(20000+p))
					batch = append(batch, rawSYN(src, dst, uint32(1000*p+w)))
				}
				s.Write(batch, 0)
			}
		}()
	}
	wg.Wait()
	if h.calls.Load() == 0 {
		t.Fatal("no SYN reached the handler")
	}
	waitInFlight(t, s, 5*time.Second)
	closeWithin(t, s, 5*time.Second)
	waitDrain()
}

// TestSYNWhileRefusingIsNotLost sends a client's SYN again in the window
// between its dial's refusal and the end of its request, where gVisor
// still has the request and ignores the SYN: the stack must not keep a
// handshake slot for it.
func TestSYNWhileRefusingIsNotLost(t *testing.T) {
	h := &refusingHandler{err: syscall.ECONNREFUSED}
	s, err := New(Options{Handler: h})
	if err != nil {
		t.Fatal(err)
	}
	waitDrain := drain(s)
	dst := netip.MustParseAddrPort("192.0.2.1:443")
	syn := func(port uint16) []byte { return rawSYN(netip.AddrPortFrom(clientV4, port), dst, 7) }
	s.tcp.testRefused = func(id stack.TransportEndpointID) {
		s.Write([][]byte{syn(id.RemotePort)}, 0)
	}
	const ports = 50
	for p := range ports {
		s.Write([][]byte{syn(uint16(30000 + p))}, 0)
	}
	deadline := time.Now().Add(5 * time.Second)
	for h.calls.Load() < ports && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if n := h.calls.Load(); n < ports {
		t.Fatalf("%d of %d SYNs reached the handler", n, ports)
	}
	waitInFlight(t, s, 3*time.Second)
	closeWithin(t, s, 5*time.Second)
	waitDrain()
}

// sharingHandler dials like dialHandler and gives each client address a
// share of the handshakes in flight.
type sharingHandler struct {
	*dialHandler
	share int

	mu       sync.Mutex
	inFlight map[netip.Addr]int
	refused  atomic.Int64
}

func (h *sharingHandler) AdmitHandshake(src netip.AddrPort) (func(), error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.inFlight[src.Addr()] >= h.share {
		h.refused.Add(1)
		return nil, Refuse(RefuseReset, errors.New("over its share"))
	}
	h.inFlight[src.Addr()]++
	return sync.OnceFunc(func() {
		h.mu.Lock()
		h.inFlight[src.Addr()]--
		h.mu.Unlock()
	}), nil
}

// acceptAll accepts connections on loopback and keeps them, reporting
// each one's end on ended; it echoes what it reads.
func acceptAll(t *testing.T) (addr netip.AddrPort, accepted *atomic.Int64, ended chan struct{}) {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	accepted = new(atomic.Int64)
	ended = make(chan struct{}, 4096)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			go func() {
				io.Copy(c, c)
				c.Close()
				ended <- struct{}{}
			}()
		}
	}()
	return netip.MustParseAddrPort(ln.Addr().String()), accepted, ended
}

// TestHalfOpenFloodLeavesOtherClientsServed floods half-open handshakes
// from one client (SYNs whose SYN-ACKs nobody answers) to a destination
// that accepts them all: with a share per client, another client's
// connections keep working, the flood's extra SYNs are refused, and
// Close ends the flood's handshakes at once.
func TestHalfOpenFloodLeavesOtherClientsServed(t *testing.T) {
	dh := &dialHandler{udp: map[netip.AddrPort]*net.UDPConn{}, echoFor: map[netip.Addr]bool{}}
	h := &sharingHandler{dialHandler: dh, share: 8, inFlight: map[netip.Addr]int{}}
	s, err := New(Options{Handler: h, MaxInFlight: 64, HandshakeTimeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	dh.s = s
	client, err := netstacktest.NewClient([]netip.Addr{clientV4}, 1420)
	if err != nil {
		t.Fatal(err)
	}
	wait := netstacktest.Join(s, client)
	defer func() {
		client.Close()
		closeWithin(t, s, 5*time.Second)
		wait()
		dh.close()
	}()
	dst, accepted, _ := acceptAll(t)

	flooder := netip.MustParseAddr("100.96.0.9")
	for p := range 1000 {
		s.Write([][]byte{rawSYN(netip.AddrPortFrom(flooder, uint16(10000+p)), dst, 1)}, 0)
	}
	// The flood's share is taken: its handshakes wait for ACKs that
	// never come, each with a connection to the destination.
	deadline := time.Now().Add(5 * time.Second)
	for accepted.Load() < int64(h.share) && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if got := accepted.Load(); got != int64(h.share) {
		t.Fatalf("the flood got %d connections to the destination; want its share, %d", got, h.share)
	}

	const n = 100
	ok := 0
	for i := range n {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, err := client.DialContext(ctx, "tcp", dst.String())
		cancel()
		if err != nil {
			t.Logf("connection %d: %v", i, err)
			continue
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		msg := fmt.Sprintf("request %d\n", i)
		buf := make([]byte, len(msg))
		if _, err := c.Write([]byte(msg)); err == nil {
			if _, err := io.ReadFull(c, buf); err == nil && string(buf) == msg {
				ok++
			}
		}
		c.Close()
	}
	if ok < n*99/100 {
		t.Fatalf("%d of %d connections of the other client worked during the flood", ok, n)
	}
	st := s.Stats()
	if st.InFlightRefused < 1000-uint64(h.share) {
		t.Errorf("%d of the flood's SYNs refused; want %d", st.InFlightRefused, 1000-h.share)
	}
	if st.InFlightDrops != 0 {
		t.Errorf("%d SYNs dropped at the global bound", st.InFlightDrops)
	}
	if st.InFlight != h.share {
		t.Errorf("%d handshakes in flight; want the flood's %d", st.InFlight, h.share)
	}
}

// TestUnansweredHandshakeTimesOut: a client that never answers the
// SYN-ACK loses its handshake after HandshakeTimeout, and the
// destination's connection is closed with it.
func TestUnansweredHandshakeTimesOut(t *testing.T) {
	dh := &dialHandler{udp: map[netip.AddrPort]*net.UDPConn{}, echoFor: map[netip.Addr]bool{}}
	s, err := New(Options{Handler: dh, HandshakeTimeout: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	dh.s = s
	waitDrain := drain(s)
	defer func() {
		closeWithin(t, s, 5*time.Second)
		waitDrain()
		dh.close()
	}()
	dst, accepted, ended := acceptAll(t)
	s.Write([][]byte{rawSYN(netip.AddrPortFrom(clientV4, 5555), dst, 1)}, 0)
	select {
	case <-ended:
	case <-time.After(10 * time.Second):
		t.Fatalf("the destination's connection (%d accepted) is still open 10 s after an unanswered SYN-ACK", accepted.Load())
	}
	waitInFlight(t, s, 2*time.Second)
	if n := s.Stats().HandshakeTimeouts; n != 1 {
		t.Errorf("%d handshake timeouts counted; want 1", n)
	}
}
