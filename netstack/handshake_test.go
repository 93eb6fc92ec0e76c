package netstack

import (
	"context"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
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
