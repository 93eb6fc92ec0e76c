package proxy

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"
)

// refusingDialer records the addresses it is asked for and refuses them
// all, so that fuzzing never opens a connection.
type refusingDialer struct {
	mu    sync.Mutex
	dials []string
}

func (d *refusingDialer) DialContext(_ context.Context, network, address string) (net.Conn, error) {
	d.mu.Lock()
	d.dials = append(d.dials, address)
	d.mu.Unlock()
	return nil, ErrNotAllowed
}

func (d *refusingDialer) take() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := d.dials
	d.dials = nil
	return out
}

// resolvingDialer is a refusingDialer that also carries UDP as far as the
// datagram parser needs: every name resolves to one address.
type resolvingDialer struct{ refusingDialer }

func (*resolvingDialer) ListenPacket(string, string) (net.PacketConn, error) {
	return nil, errors.New("no UDP while fuzzing")
}

func (*resolvingDialer) LookupNetIP(context.Context, string, string) ([]netip.Addr, error) {
	return []netip.Addr{netip.MustParseAddr("192.0.2.7")}, nil
}

// streamConn is a client connection that sends a fixed stream and then
// closes its side: the server reads EOF at once instead of waiting for
// its handshake deadline.
type streamConn struct {
	in     *bytes.Reader
	out    bytes.Buffer
	closed bool
}

func (c *streamConn) Read(p []byte) (int, error)  { return c.in.Read(p) }
func (c *streamConn) Write(p []byte) (int, error) { return c.out.Write(p) }
func (c *streamConn) Close() error                { c.closed = true; return nil }
func (c *streamConn) LocalAddr() net.Addr {
	return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1080}
}
func (c *streamConn) RemoteAddr() net.Addr {
	return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 40000}
}
func (c *streamConn) SetDeadline(time.Time) error      { return nil }
func (c *streamConn) SetReadDeadline(time.Time) error  { return nil }
func (c *streamConn) SetWriteDeadline(time.Time) error { return nil }

// socksSeeds are client streams: greeting, then a request.
var socksSeeds = [][]byte{
	{5, 1, 0, 5, 1, 0, 1, 192, 0, 2, 1, 0, 80},
	{5, 2, 2, 0, 5, 1, 0, 3, 11, 'e', 'x', 'a', 'm', 'p', 'l', 'e', '.', 'c', 'o', 'm', 1, 187},
	{5, 1, 0, 5, 1, 0, 4, 0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 22},
	{5, 1, 0, 5, 3, 0, 1, 0, 0, 0, 0, 0, 0},
	{5, 1, 0, 5, 2, 0, 1, 127, 0, 0, 1, 0, 1},
	{5, 1, 0, 5, 1, 0, 3, 0, 0, 80},
	{5, 1, 0, 5, 1, 0, 9, 1, 2, 3, 4, 0, 80},
	{4, 1, 0, 80, 1, 2, 3, 4, 0},
	{5, 0},
}

// FuzzSOCKS5Request parses arbitrary request bytes (VER CMD RSV ATYP
// DST.ADDR DST.PORT): readRequest never panics, and what it reads,
// written again as a client writes it, reads back the same.
func FuzzSOCKS5Request(f *testing.F) {
	for _, s := range socksSeeds {
		if len(s) > 3 && s[0] == 5 {
			f.Add(s[2+int(s[1]):])
		}
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		req, err := readRequest(bytes.NewReader(b))
		if err != nil {
			return
		}
		if req.host == "" {
			t.Fatalf("request %x read with an empty host", b)
		}
		// Written back with the address type it came with: a name may
		// look like an address, and stays a name.
		again := []byte{socksVersion, req.cmd, 0}
		if b[3] == atypDomain {
			again = append(append(again, atypDomain, byte(len(req.host))), req.host...)
			again = append(again, byte(req.port>>8), byte(req.port))
		} else {
			again = appendAddr(again, netip.AddrPortFrom(netip.MustParseAddr(req.host), req.port))
		}
		back, err := readRequest(bytes.NewReader(again))
		if err != nil || back != req {
			t.Fatalf("request %+v, written as %x, reads back as %+v, %v", req, again, back, err)
		}
		// A name may hold any bytes (the Dialer refuses what is not
		// a name); an address must come out as one.
		if b[3] != atypDomain {
			if _, err := netip.ParseAddrPort(req.address()); err != nil {
				t.Fatalf("address %q of %+v does not parse: %v", req.address(), req, err)
			}
		}
	})
}

// FuzzSOCKS5Session runs a whole SOCKS5 conversation with arbitrary client
// bytes through the server's own handler. It must end, close the
// connection, never panic, and dial exactly what a CONNECT
// request in the stream names, only after a greeting that offers "no
// authentication", and nothing otherwise.
func FuzzSOCKS5Session(f *testing.F) {
	for _, s := range socksSeeds {
		f.Add(s)
	}
	d := &refusingDialer{}
	s, err := NewSOCKS5(SOCKS5Options{Dialer: d, HandshakeTimeout: 2 * time.Second})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { s.Close() })
	f.Fuzz(func(t *testing.T, b []byte) {
		c := &streamConn{in: bytes.NewReader(b)}
		s.handle(c)
		if !c.closed {
			t.Fatal("the handler did not close the connection")
		}

		var want []string
		if len(b) >= 2 && b[0] == socksVersion && len(b) >= 2+int(b[1]) && bytes.IndexByte(b[2:2+int(b[1])], methodNone) >= 0 {
			if req, err := readRequest(bytes.NewReader(b[2+int(b[1]):])); err == nil && req.cmd == cmdConnect {
				want = []string{req.address()}
			}
		}
		got := d.take()
		if len(got) != len(want) || (len(want) == 1 && got[0] != want[0]) {
			t.Fatalf("stream %x: dialled %q, want %q", b, got, want)
		}
	})
}

// FuzzSOCKS5Datagram parses arbitrary UDP ASSOCIATE datagrams (RSV FRAG
// ATYP DST.ADDR DST.PORT DATA): no panic, fragments and short headers are
// refused, and the payload is the datagram's tail.
func FuzzSOCKS5Datagram(f *testing.F) {
	f.Add([]byte{0, 0, 0, 1, 192, 0, 2, 1, 0, 53, 'h', 'i'})
	f.Add([]byte{0, 0, 0, 3, 4, 'n', 'a', 'm', 'e', 0, 53})
	f.Add([]byte{0, 0, 1, 1, 192, 0, 2, 1, 0, 53})
	f.Add([]byte{0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1, 0, 9})
	d := &resolvingDialer{}
	s, err := NewSOCKS5(SOCKS5Options{Dialer: d})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { s.Close() })
	f.Fuzz(func(t *testing.T, b []byte) {
		a := &association{s: s, names: map[string]netip.Addr{}}
		dst, payload, err := a.parse(b)
		if err != nil {
			return
		}
		if len(b) < 4 || b[0] != 0 || b[1] != 0 || b[2] != 0 {
			t.Fatalf("datagram %x accepted with a bad header", b)
		}
		if !dst.Addr().IsValid() || dst.Addr().Is4In6() {
			t.Fatalf("datagram %x: destination %v", b, dst)
		}
		if !bytes.HasSuffix(b, payload) || len(payload) > len(b)-4-3 {
			t.Fatalf("datagram %x: payload %x is not its tail after the header", b, payload)
		}
	})
}
