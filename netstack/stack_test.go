package netstack

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/tun"

	"github.com/sluice-vpn/sluice/netstack/netstacktest"
	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
)

var (
	clientV4 = netip.MustParseAddr("100.96.0.2")
	clientV6 = netip.MustParseAddr("fd5c:1ce::2")
)

// dialHandler is a Handler that dials destinations directly, the simplest
// gateway there is. Echo requests are answered only for destinations in
// echoFor, standing in for a host that answers pings.
type dialHandler struct {
	s       *Stack
	dialer  net.Dialer
	echoFor map[netip.Addr]bool
	dialErr func(dst netip.AddrPort) error

	mu  sync.Mutex
	udp map[netip.AddrPort]*net.UDPConn
	wg  sync.WaitGroup

	segIn, segOut atomic.Uint64
}

type countingConn struct {
	*net.TCPConn
	h *dialHandler
}

func (c countingConn) CountSegments(in, out uint64) {
	c.h.segIn.Add(in)
	c.h.segOut.Add(out)
}

func (h *dialHandler) DialTCP(ctx context.Context, src, dst netip.AddrPort) (net.Conn, error) {
	if h.dialErr != nil {
		if err := h.dialErr(dst); err != nil {
			return nil, err
		}
	}
	c, err := h.dialer.DialContext(ctx, "tcp", dst.String())
	if err != nil {
		return nil, err
	}
	return countingConn{c.(*net.TCPConn), h}, nil
}

func (h *dialHandler) HandleUDP(src, dst netip.AddrPort, payload []byte) error {
	h.mu.Lock()
	c, ok := h.udp[src]
	if !ok {
		var err error
		network := "udp4"
		if dst.Addr().Is6() {
			network = "udp6"
		}
		c, err = net.ListenUDP(network, nil)
		if err != nil {
			h.mu.Unlock()
			return err
		}
		h.udp[src] = c
		h.wg.Add(1)
		go func() {
			defer h.wg.Done()
			buf := make([]byte, 65535)
			for {
				n, from, err := c.ReadFromUDPAddrPort(buf)
				if err != nil {
					return
				}
				h.s.WriteUDP(netip.AddrPortFrom(from.Addr().Unmap(), from.Port()), src, buf[:n])
			}
		}()
	}
	h.mu.Unlock()
	_, err := c.WriteToUDPAddrPort(payload, dst)
	return err
}

func (h *dialHandler) HandleEcho(src, dst netip.Addr, id, seq uint16, payload []byte) error {
	if !h.echoFor[dst] {
		return Refuse(RefuseDrop, errors.New("no answer"))
	}
	return h.s.WriteEchoReply(dst, src, id, seq, payload)
}

func (h *dialHandler) close() {
	h.mu.Lock()
	for _, c := range h.udp {
		c.Close()
	}
	h.mu.Unlock()
	h.wg.Wait()
}

type fixture struct {
	s      *Stack
	h      *dialHandler
	client *netstacktest.Client
}

func newFixture(t *testing.T, mod func(*Options, *dialHandler)) *fixture {
	t.Helper()
	h := &dialHandler{udp: map[netip.AddrPort]*net.UDPConn{}, echoFor: map[netip.Addr]bool{}}
	opts := Options{Handler: h}
	if mod != nil {
		mod(&opts, h)
	}
	s, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	h.s = s
	newClient := netstacktest.NewClient
	if opts.VirtioNetHdr {
		newClient = netstacktest.NewVirtioClient
	}
	client, err := newClient([]netip.Addr{clientV4, clientV6}, 1420)
	if err != nil {
		t.Fatal(err)
	}
	wait := netstacktest.Join(s, client)
	t.Cleanup(func() {
		client.Close()
		s.Close()
		wait()
		h.close()
	})
	return &fixture{s: s, h: h, client: client}
}

func TestTCPHTTPGet(t *testing.T) {
	f := newFixture(t, nil)
	body := bytes.Repeat([]byte("sluice!\n"), 1<<17) // 1 MiB
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write(body)
	}))
	defer srv.Close()

	hc := &http.Client{Transport: &http.Transport{DialContext: f.client.DialContext, DisableKeepAlives: true}}
	resp, err := hc.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(got) != sha256.Sum256(body) {
		t.Fatalf("body: got %d bytes, want %d identical bytes", len(got), len(body))
	}
	// The segment counts are final once the relay is done.
	for deadline := time.Now().Add(5 * time.Second); f.s.Stats().TCPRelays > 0; {
		if time.Now().After(deadline) {
			t.Fatal("the relay did not end after the client closed")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if in, out := f.h.segIn.Load(), f.h.segOut.Load(); in == 0 || out < 1<<20/1420 {
		t.Errorf("segments reported: %d from client, %d to client; want >0 and >= %d", in, out, 1<<20/1420)
	}
}

func TestTCPIPv6(t *testing.T) {
	f := newFixture(t, nil)
	ln, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		t.Skip("no IPv6 loopback:", err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			io.Copy(c, c)
			c.Close()
		}
	}()
	c, err := f.client.DialContext(context.Background(), "tcp6", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("ping6"))
	buf := make([]byte, 5)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping6" {
		t.Fatalf("echo over v6: %q %v", buf, err)
	}
}

func TestTCPHalfClose(t *testing.T) {
	f := newFixture(t, nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	// The server reads to EOF (the client's FIN), then answers: only a
	// relay that passes the half-close on lets this finish.
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		got, _ := io.ReadAll(c)
		c.Write([]byte(strings.ToUpper(string(got))))
	}()
	c, err := f.client.DialContext(context.Background(), "tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("half closed"))
	if err := c.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	reply, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	if string(reply) != "HALF CLOSED" {
		t.Fatalf("reply %q", reply)
	}
}

func TestTCPRefusedGetsReset(t *testing.T) {
	f := newFixture(t, nil)
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close() // nothing listens there now

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	_, err := f.client.DialContext(ctx, "tcp", addr)
	if err == nil {
		t.Fatal("dial to a closed port succeeded")
	}
	if !strings.Contains(err.Error(), "refused") {
		t.Fatalf("want connection refused, got %v", err)
	}
	if time.Since(start) > 2*time.Second {
		t.Fatalf("refusal took %v; a RST answers at once", time.Since(start))
	}
}

func TestTCPUnreachableGetsICMP(t *testing.T) {
	// A gVisor client aborts a connection attempt on these errors, like
	// Linux does, except that for IPv6 it only acts on "no route";
	// TestICMPErrorCodes checks the other IPv6 codes on the wire.
	for _, tc := range []struct {
		name string
		err  error
		dsts []string
	}{
		{"timeout", os.ErrDeadlineExceeded, []string{"127.0.0.1:9"}},
		{"prohibited", Refuse(RefuseProhibited, errors.New("policy")), []string{"127.0.0.1:9"}},
		{"net", syscall.ENETUNREACH, []string{"127.0.0.1:9", "[::1]:9"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t, func(o *Options, h *dialHandler) {
				h.dialErr = func(netip.AddrPort) error { return tc.err }
			})
			for _, dst := range tc.dsts {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				start := time.Now()
				_, err := f.client.DialContext(ctx, "tcp", dst)
				cancel()
				if err == nil || !(strings.Contains(err.Error(), "unreachable") || strings.Contains(err.Error(), "no route")) {
					t.Errorf("%s: want an unreachable error, got %v", dst, err)
				}
				if time.Since(start) > 2*time.Second {
					t.Errorf("%s: refusal took %v", dst, time.Since(start))
				}
			}
			// The counter goes up once the write returns, which can be
			// after the client has read the error.
			deadline := time.Now().Add(2 * time.Second)
			for f.s.Stats().ICMPErrorsSent < uint64(len(tc.dsts)) && time.Now().Before(deadline) {
				time.Sleep(time.Millisecond)
			}
			if got := f.s.Stats().ICMPErrorsSent; got < uint64(len(tc.dsts)) {
				t.Errorf("ICMP errors sent: %d, want %d", got, len(tc.dsts))
			}
		})
	}
}

// TestICMPErrorCodes checks the type and code of the ICMP error for each
// refusal of a TCP SYN, and that it quotes the SYN.
func TestICMPErrorCodes(t *testing.T) {
	for _, tc := range []struct {
		err            error
		v4type, v4code int
		v6type, v6code int
	}{
		{syscall.ENETUNREACH, 3, 0, 1, 0},
		{syscall.EHOSTUNREACH, 3, 1, 1, 3},
		{os.ErrDeadlineExceeded, 3, 1, 1, 3},
		{Refuse(RefuseProhibited, nil), 3, 13, 1, 1},
	} {
		h := &refusingHandler{err: tc.err}
		s, err := New(Options{Handler: h})
		if err != nil {
			t.Fatal(err)
		}
		for _, fam := range []int{4, 6} {
			syn := buildSYN(t, fam)
			s.Write([][]byte{syn}, 0)
			got := readOne(t, s)
			hl, typ, code := 20, tc.v4type, tc.v4code
			if fam == 6 {
				hl, typ, code = 40, tc.v6type, tc.v6code
			}
			if int(got[hl]) != typ || int(got[hl+1]) != code {
				t.Errorf("%v over IPv%d: got ICMP %d/%d, want %d/%d", tc.err, fam, got[hl], got[hl+1], typ, code)
			}
			if q := got[hl+8:]; len(q) < hl+8 || !bytes.Equal(q[:hl+8], syn[:hl+8]) {
				t.Errorf("%v over IPv%d: the error does not quote the SYN", tc.err, fam)
			}
		}
		s.Close()
	}
}

func TestUDPEchoAndFragments(t *testing.T) {
	f := newFixture(t, nil)
	for _, network := range []string{"udp4", "udp6"} {
		t.Run(network, func(t *testing.T) {
			laddr := "127.0.0.1:0"
			if network == "udp6" {
				laddr = "[::1]:0"
			}
			srv, err := net.ListenPacket(network, laddr)
			if err != nil {
				t.Fatal(err)
			}
			defer srv.Close()
			go func() {
				buf := make([]byte, 65535)
				for {
					n, from, err := srv.ReadFrom(buf)
					if err != nil {
						return
					}
					srv.WriteTo(buf[:n], from)
				}
			}()
			c, err := f.client.DialContext(context.Background(), network, srv.LocalAddr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			// 4000 bytes do not fit the 1420-byte tunnel either way: the
			// client fragments them going in, the stack coming back.
			for _, size := range []int{1, 512, 4000} {
				msg := bytes.Repeat([]byte{byte(size)}, size)
				c.SetDeadline(time.Now().Add(3 * time.Second))
				if _, err := c.Write(msg); err != nil {
					t.Fatal(err)
				}
				buf := make([]byte, 65535)
				n, err := c.Read(buf)
				if err != nil {
					t.Fatalf("size %d: %v", size, err)
				}
				if !bytes.Equal(buf[:n], msg) {
					t.Fatalf("size %d: got %d bytes back", size, n)
				}
			}
		})
	}
}

func TestUDPRefusedGetsICMP(t *testing.T) {
	h := &refusingHandler{err: Refuse(RefuseProhibited, errors.New("denied"))}
	s, err := New(Options{Handler: h})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	pkt := buildUDP4(t, netip.MustParseAddrPort("100.96.0.2:5000"), netip.MustParseAddrPort("10.1.2.3:53"), []byte("query"))
	s.Write([][]byte{pkt}, 0)
	got := readOne(t, s)
	m, err := icmp.ParseMessage(1, got[20:])
	if err != nil {
		t.Fatal(err)
	}
	if m.Type != ipv4.ICMPTypeDestinationUnreachable || m.Code != 13 {
		t.Fatalf("got ICMP type %v code %d, want destination unreachable, administratively prohibited", m.Type, m.Code)
	}
	body := m.Body.(*icmp.DstUnreach)
	if !bytes.Equal(body.Data[:20+8], pkt[:20+8]) {
		t.Fatal("the error does not quote the refused datagram")
	}
	if src := netip.AddrFrom4([4]byte(got[12:16])); src != netip.MustParseAddr("10.1.2.3") {
		t.Fatalf("error from %s", src)
	}
}

func TestEcho(t *testing.T) {
	answered := []netip.Addr{netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8::1")}
	silent := []netip.Addr{netip.MustParseAddr("192.0.2.2"), netip.MustParseAddr("2001:db8::2")}
	f := newFixture(t, func(o *Options, h *dialHandler) {
		for _, a := range answered {
			h.echoFor[a] = true
		}
	})
	ping := func(dst netip.Addr) error {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		reply, err := f.client.Ping(ctx, dst, 42, []byte("are you there"))
		if err != nil {
			return err
		}
		if string(reply) != "are you there" {
			return fmt.Errorf("reply %q does not match the request", reply)
		}
		return nil
	}
	for _, dst := range answered {
		if err := ping(dst); err != nil {
			t.Errorf("ping %s: %v", dst, err)
		}
	}
	// The stack must not answer on a destination's behalf.
	for _, dst := range silent {
		if err := ping(dst); err == nil {
			t.Errorf("ping %s was answered, but its handler dropped it", dst)
		}
	}
}

func TestMalformedPacketsAreCounted(t *testing.T) {
	h := &refusingHandler{err: Refuse(RefuseDrop, errors.New("no"))}
	s, err := New(Options{Handler: h})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	good := buildUDP4(t, netip.MustParseAddrPort("100.96.0.2:5000"), netip.MustParseAddrPort("192.0.2.1:53"), []byte("x"))
	badSum := bytes.Clone(good)
	badSum[len(badSum)-1] ^= 0xff
	truncated := good[:len(good)-3]
	bad := [][]byte{{}, {0x45}, {0x60, 0, 0}, bytes.Repeat([]byte{0xff}, 60), truncated, badSum}
	s.Write(bad, 0)
	if got := s.Stats().Malformed; got != uint64(len(bad)) {
		t.Fatalf("malformed: %d, want %d", got, len(bad))
	}
	s.Write([][]byte{good}, 0)
	if h.calls.Load() != 1 {
		t.Fatalf("the well-formed datagram reached the handler %d times", h.calls.Load())
	}
}

type refusingHandler struct {
	err   error
	calls atomic.Int32
}

func (h *refusingHandler) DialTCP(context.Context, netip.AddrPort, netip.AddrPort) (net.Conn, error) {
	h.calls.Add(1)
	return nil, h.err
}
func (h *refusingHandler) HandleUDP(netip.AddrPort, netip.AddrPort, []byte) error {
	h.calls.Add(1)
	return h.err
}
func (h *refusingHandler) HandleEcho(netip.Addr, netip.Addr, uint16, uint16, []byte) error {
	h.calls.Add(1)
	return h.err
}

func readOne(t *testing.T, d tun.Device) []byte {
	t.Helper()
	got := make(chan []byte, 1)
	go func() {
		bufs, sizes := [][]byte{make([]byte, 65535)}, []int{0}
		if n, err := d.Read(bufs, sizes, 0); err == nil && n == 1 {
			got <- bufs[0][:sizes[0]]
		}
	}()
	select {
	case b := <-got:
		return b
	case <-time.After(3 * time.Second):
		t.Fatal("no packet from the stack")
	}
	return nil
}

// TestTCPClientReusesItsPort closes connections from the server's side,
// which leaves the gateway's end in TIME_WAIT, and reconnects from the
// same client port: gVisor hands such a SYN only to a listener, so the
// gateway keeps TIME_WAIT short enough for clients that cycle their ports.
func TestTCPClientReusesItsPort(t *testing.T) {
	f := newFixture(t, nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("bye"))
			c.Close() // the server closes first
		}
	}()
	local := netip.AddrPortFrom(clientV4, 40404)
	remote := netip.MustParseAddrPort(ln.Addr().String())
	for i := range 2 {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		c, err := f.client.DialTCPFrom(ctx, local, remote)
		cancel()
		if err != nil {
			t.Fatalf("connection %d from %v: %v", i, local, err)
		}
		c.SetDeadline(time.Now().Add(3 * time.Second))
		got, err := io.ReadAll(c)
		c.Close()
		if err != nil || string(got) != "bye" {
			t.Fatalf("connection %d: %q %v", i, got, err)
		}
		// The client's own side needs no TIME_WAIT (it closed second);
		// give the gateway's TIME_WAIT its second.
		time.Sleep(1500 * time.Millisecond)
	}
}
