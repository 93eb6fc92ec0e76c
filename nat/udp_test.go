package nat

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// loopListener opens egress sockets on loopback, on an ephemeral port.
type loopListener struct {
	calls atomic.Int64
	fail  error // returned instead of a socket when set
}

func (l *loopListener) ListenUDP(ctx context.Context, dst netip.Addr) (*net.UDPConn, error) {
	l.calls.Add(1)
	if l.fail != nil {
		return nil, fmt.Errorf("loopListener: %w", l.fail)
	}
	local := netip.AddrPortFrom(netip.IPv6Loopback(), 0)
	if dst.Unmap().Is4() {
		local = netip.MustParseAddrPort("127.0.0.1:0")
	}
	return net.ListenUDP("udp", net.UDPAddrFromAddrPort(local))
}

type datagram struct {
	src, dst netip.AddrPort
	payload  string
}

// sink collects what a UDP mapper delivers to clients.
type sink chan datagram

func (s sink) deliver(src, dst netip.AddrPort, payload []byte) {
	s <- datagram{src, dst, string(payload)} // copies: payload is reused
}

func (s sink) next(t *testing.T) datagram {
	t.Helper()
	select {
	case d := <-s:
		return d
	case <-time.After(3 * time.Second):
		t.Fatal("no datagram delivered")
		return datagram{}
	}
}

func (s sink) none(t *testing.T, wait time.Duration) {
	t.Helper()
	select {
	case d := <-s:
		t.Fatalf("unexpected delivery %+v", d)
	case <-time.After(wait):
	}
}

// udpServer is a loopback UDP server that answers each datagram with
// "<payload>|<source address it saw>".
type udpServer struct {
	conn *net.UDPConn
	addr netip.AddrPort
}

func startUDPServer(t *testing.T, network, addr string) *udpServer {
	t.Helper()
	pc, err := net.ListenPacket(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	s := &udpServer{conn: pc.(*net.UDPConn)}
	s.addr = s.conn.LocalAddr().(*net.UDPAddr).AddrPort()
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 65536)
		for {
			n, from, err := s.conn.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			reply := fmt.Sprintf("%s|%s", buf[:n], from)
			s.conn.WriteToUDPAddrPort([]byte(reply), from)
		}
	}()
	t.Cleanup(func() { s.conn.Close(); <-done })
	return s
}

type udpFixture struct {
	table *Table
	clock *fakeClock
	udp   *UDPMapper
	sink  sink
	lis   *loopListener
}

func newUDPFixture(t *testing.T, filtering Filtering, topts TableOptions, mods ...func(*UDPOptions)) *udpFixture {
	t.Helper()
	f := &udpFixture{sink: make(sink, 64), lis: &loopListener{}}
	f.table, f.clock = newTestTable(t, topts)
	opts := UDPOptions{Listener: f.lis, Table: f.table, Filtering: filtering, Deliver: f.sink.deliver}
	for _, mod := range mods {
		mod(&opts)
	}
	var err error
	f.udp, err = NewUDP(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.udp.Close() })
	return f
}

var (
	client1 = netip.MustParseAddrPort("10.100.0.2:5000")
	client2 = netip.MustParseAddrPort("10.100.0.3:5000")
	client6 = netip.MustParseAddrPort("[fd00:100::2]:5000")
)

func TestNewUDPValidates(t *testing.T) {
	tab, _ := newTestTable(t, TableOptions{})
	lis := &loopListener{}
	deliver := func(_, _ netip.AddrPort, _ []byte) {}
	for _, tc := range []struct {
		opts  UDPOptions
		field string
	}{
		{UDPOptions{Table: tab, Deliver: deliver}, "Listener"},
		{UDPOptions{Listener: lis, Deliver: deliver}, "Table"},
		{UDPOptions{Listener: lis, Table: tab}, "Deliver"},
		{UDPOptions{Listener: lis, Table: tab, Deliver: deliver, Filtering: 7}, "Filtering"},
		{UDPOptions{Listener: lis, Table: tab, Deliver: deliver, MaxDatagram: 70000}, "MaxDatagram"},
	} {
		_, err := NewUDP(tc.opts)
		if err == nil || !strings.Contains(err.Error(), "UDPOptions."+tc.field) {
			t.Errorf("NewUDP without a good %s: %v", tc.field, err)
		}
	}
}

func TestUDPEchoRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name            string
		client          netip.AddrPort
		network, listen string
	}{
		{"ipv4", client1, "udp4", "127.0.0.1:0"},
		{"ipv6", client6, "udp6", "[::1]:0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newUDPFixture(t, FilterAddressPortDependent, TableOptions{})
			srv := startUDPServer(t, tc.network, tc.listen)

			if err := f.udp.Send("alice", tc.client, srv.addr, []byte("hello")); err != nil {
				t.Fatal(err)
			}
			d := f.sink.next(t)
			if d.src != srv.addr || d.dst != tc.client {
				t.Errorf("delivered %v -> %v, want %v -> %v", d.src, d.dst, srv.addr, tc.client)
			}
			payload, seen, _ := cut(d.payload)
			if payload != "hello" {
				t.Errorf("payload %q", payload)
			}

			flow := f.table.Lookup(Key{Proto: UDP, Client: tc.client, Dest: srv.addr})
			if flow == nil {
				t.Fatal("no table entry for the flow")
			}
			e := flow.Entry()
			if e.Egress.String() != seen {
				t.Errorf("table egress %v, server saw %s", e.Egress, seen)
			}
			if e.Peer != "alice" || e.State != StateAssured || e.OrigBytes != 5 || e.OrigPackets != 1 ||
				e.ReplyBytes != uint64(len(d.payload)) || e.ReplyPackets != 1 {
				t.Errorf("entry %+v", e)
			}
			if st := f.udp.Stats(); st.Mappings != 1 || st.Opened != 1 {
				t.Errorf("stats %+v", st)
			}
		})
	}
}

func cut(s string) (payload, seen string, ok bool) {
	for i := len(s) - 1; i >= 0; i-- {
		if s[i] == '|' {
			return s[:i], s[i+1:], true
		}
	}
	return s, "", false
}

// TestUDPEndpointIndependentMapping: one client source, two destinations,
// one egress port seen by both; another source gets another port.
func TestUDPEndpointIndependentMapping(t *testing.T) {
	f := newUDPFixture(t, FilterAddressPortDependent, TableOptions{})
	a := startUDPServer(t, "udp4", "127.0.0.1:0")
	b := startUDPServer(t, "udp4", "127.0.0.1:0")

	seenBy := map[netip.AddrPort]string{}
	for _, srv := range []*udpServer{a, b, a} {
		if err := f.udp.Send("p", client1, srv.addr, []byte("x")); err != nil {
			t.Fatal(err)
		}
		d := f.sink.next(t)
		_, seen, _ := cut(d.payload)
		if prev, ok := seenBy[d.src]; ok && prev != seen {
			t.Errorf("%v saw %s, then %s", d.src, prev, seen)
		}
		seenBy[d.src] = seen
	}
	if seenBy[a.addr] == "" || seenBy[a.addr] != seenBy[b.addr] {
		t.Fatalf("servers saw different egress endpoints: %v", seenBy)
	}

	if err := f.udp.Send("p", client2, a.addr, []byte("y")); err != nil {
		t.Fatal(err)
	}
	_, seen2, _ := cut(f.sink.next(t).payload)
	if seen2 == seenBy[a.addr] {
		t.Errorf("two client sources share egress %s", seen2)
	}
	if got := f.lis.calls.Load(); got != 2 {
		t.Errorf("%d sockets opened for 2 client sources", got)
	}
	if st := f.udp.Stats(); st.Mappings != 2 {
		t.Errorf("%d mappings, want 2", st.Mappings)
	}
	ea := f.table.Lookup(Key{UDP, client1, a.addr}).Entry()
	eb := f.table.Lookup(Key{UDP, client1, b.addr}).Entry()
	if ea.Egress != eb.Egress || ea.OrigPackets != 2 || eb.OrigPackets != 1 {
		t.Errorf("entries %+v and %+v", ea, eb)
	}
}

// TestUDPConcurrentFirstSend opens a mapping from many goroutines at once:
// one socket, every datagram answered.
func TestUDPConcurrentFirstSend(t *testing.T) {
	f := newUDPFixture(t, FilterAddressPortDependent, TableOptions{})
	f.sink = make(sink, 1000)
	f.udp.deliver = f.sink.deliver
	srv := startUDPServer(t, "udp4", "127.0.0.1:0")
	const n = 50
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f.udp.Send("p", client1, srv.addr, []byte(fmt.Sprint(i))); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	for range n {
		f.sink.next(t)
	}
	if got := f.lis.calls.Load(); got != 1 {
		t.Errorf("%d sockets opened for one client source", got)
	}
	if e := f.table.Lookup(Key{UDP, client1, srv.addr}).Entry(); e.OrigPackets != n || e.ReplyPackets != n {
		t.Errorf("entry %+v", e)
	}
}

func TestUDPFiltering(t *testing.T) {
	for _, tc := range []struct {
		filtering Filtering
		delivered bool
	}{
		{FilterAddressPortDependent, false},
		{FilterEndpointIndependent, true},
	} {
		t.Run(tc.filtering.String(), func(t *testing.T) {
			f := newUDPFixture(t, tc.filtering, TableOptions{})
			srv := startUDPServer(t, "udp4", "127.0.0.1:0")
			if err := f.udp.Send("p", client1, srv.addr, []byte("hi")); err != nil {
				t.Fatal(err)
			}
			_, seen, _ := cut(f.sink.next(t).payload)
			egress := netip.MustParseAddrPort(seen)

			// A stranger the client never sent to, on the same host.
			stranger, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
			if err != nil {
				t.Fatal(err)
			}
			defer stranger.Close()
			strangerAddr := stranger.LocalAddr().(*net.UDPAddr).AddrPort()
			if _, err := stranger.WriteToUDPAddrPort([]byte("unsolicited"), egress); err != nil {
				t.Fatal(err)
			}
			// Same address as the server but another port is a different
			// endpoint too; then the server itself, which must pass.
			if _, err := srv.conn.WriteToUDPAddrPort([]byte("from-server"), egress); err != nil {
				t.Fatal(err)
			}

			if tc.delivered {
				d := f.sink.next(t)
				if d.src != strangerAddr || d.dst != client1 || d.payload != "unsolicited" {
					t.Fatalf("delivered %+v, want the stranger's datagram", d)
				}
				e := f.table.Lookup(Key{UDP, client1, strangerAddr})
				if e == nil {
					t.Fatal("no flow made for the stranger")
				}
				if en := e.Entry(); en.ReplyPackets != 1 || en.Egress != egress {
					t.Errorf("stranger's entry %+v", en)
				}
			}
			d := f.sink.next(t)
			if d.src != srv.addr || d.payload != "from-server" {
				t.Fatalf("delivered %+v, want the server's datagram", d)
			}
			st := f.udp.Stats()
			if tc.delivered && st.Filtered != 0 {
				t.Errorf("EIF filtered %d datagrams", st.Filtered)
			}
			if !tc.delivered {
				if st.Filtered != 1 {
					t.Errorf("Filtered = %d, want 1", st.Filtered)
				}
				if f.table.Lookup(Key{UDP, client1, strangerAddr}) != nil {
					t.Error("APDF made a flow for the stranger")
				}
			}
		})
	}
}

// TestUDPExpiry: a destination's flow expiring takes it out of the mapping;
// the last one closes the socket and stops the reader.
func TestUDPExpiry(t *testing.T) {
	before := runtime.NumGoroutine()
	f := newUDPFixture(t, FilterAddressPortDependent, TableOptions{
		Timeouts: Timeouts{UDPUnreplied: 10 * time.Second, UDPAssured: 60 * time.Second},
	})
	a := startUDPServer(t, "udp4", "127.0.0.1:0")
	// b never answers: its flow stays unreplied and expires first.
	bConn, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer bConn.Close()
	bAddr := bConn.LocalAddr().(*net.UDPAddr).AddrPort()

	if err := f.udp.Send("p", client1, a.addr, []byte("a")); err != nil {
		t.Fatal(err)
	}
	_, seen, _ := cut(f.sink.next(t).payload)
	egress := netip.MustParseAddrPort(seen)
	if err := f.udp.Send("p", client1, bAddr, []byte("b")); err != nil {
		t.Fatal(err)
	}
	if f.table.Len() != 2 {
		t.Fatalf("%d flows, want 2", f.table.Len())
	}

	f.clock.advance(11 * time.Second)
	if n := f.table.expire(); n != 1 {
		t.Fatalf("expired %d flows, want b's", n)
	}
	if f.table.Lookup(Key{UDP, client1, bAddr}) != nil {
		t.Fatal("b's flow still in the table")
	}
	// b is no longer a destination of the mapping: what it sends now is
	// filtered, while a still gets through on the same socket.
	bConn.WriteToUDPAddrPort([]byte("late"), egress)
	a.conn.WriteToUDPAddrPort([]byte("still-here"), egress)
	if d := f.sink.next(t); d.src != a.addr || d.payload != "still-here" {
		t.Fatalf("delivered %+v", d)
	}
	if st := f.udp.Stats(); st.Filtered != 1 || st.Mappings != 1 {
		t.Errorf("stats %+v: want b's late datagram filtered, mapping open", st)
	}

	f.clock.advance(61 * time.Second)
	if n := f.table.expire(); n != 1 {
		t.Fatalf("expired %d flows, want a's", n)
	}
	if st := f.udp.Stats(); st.Mappings != 0 {
		t.Errorf("%d mappings after the last flow expired", st.Mappings)
	}
	// The socket is closed: its port can be bound again and the reader is
	// gone.
	c, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(egress))
	if err != nil {
		t.Fatalf("egress port still held after expiry: %v", err)
	}
	c.Close()
	a.conn.WriteToUDPAddrPort([]byte("too-late"), egress)
	f.sink.none(t, 50*time.Millisecond)
	waitGoroutines(t, before+1) // a's server only

	// The client sends again: a new mapping, a new flow.
	if err := f.udp.Send("p", client1, a.addr, []byte("again")); err != nil {
		t.Fatal(err)
	}
	if d := f.sink.next(t); d.src != a.addr {
		t.Fatalf("delivered %+v", d)
	}
	if st := f.udp.Stats(); st.Mappings != 1 || st.Opened != 2 {
		t.Errorf("stats %+v", st)
	}
}

// TestUDPExpiryFreesEgressPort runs against the real Egress with a one-port
// slice: a second client cannot get a port until the first one's mapping
// expires.
func TestUDPExpiryFreesEgressPort(t *testing.T) {
	probe, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	port := uint16(probe.LocalAddr().(*net.UDPAddr).Port)
	probe.Close()
	eg, err := NewEgress(EgressOptions{
		Addrs:        []netip.Addr{netip.MustParseAddr("127.0.0.1")},
		Ports:        PortRange{port, port},
		ExplicitBind: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	tab, clk := newTestTable(t, TableOptions{})
	s := make(sink, 8)
	u, err := NewUDP(UDPOptions{Listener: eg, Table: tab, Deliver: s.deliver})
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	srv := startUDPServer(t, "udp4", "127.0.0.1:0")

	if err := u.Send("p", client1, srv.addr, []byte("one")); err != nil {
		t.Fatal(err)
	}
	if _, seen, _ := cut(s.next(t).payload); seen != fmt.Sprintf("127.0.0.1:%d", port) {
		t.Fatalf("server saw %s, want the slice's only port %d", seen, port)
	}
	err = u.Send("p", client2, srv.addr, []byte("two"))
	if !errors.Is(err, ErrPortsExhausted) {
		t.Fatalf("second mapping with a one-port slice: %v, want ErrPortsExhausted", err)
	}
	if tab.Len() != 1 {
		t.Errorf("a failed mapping left flows: %d", tab.Len())
	}

	clk.advance(time.Hour)
	tab.expire()
	if err := u.Send("p", client2, srv.addr, []byte("two")); err != nil {
		t.Fatalf("after expiry: %v", err)
	}
	if d := s.next(t); d.dst != client2 {
		t.Fatalf("delivered %+v", d)
	}
}

func TestUDPSendErrors(t *testing.T) {
	srv := startUDPServer(t, "udp4", "127.0.0.1:0")

	t.Run("EMSGSIZE", func(t *testing.T) {
		f := newUDPFixture(t, FilterAddressPortDependent, TableOptions{})
		err := f.udp.Send("p", client1, srv.addr, make([]byte, 70000))
		if !errors.Is(err, syscall.EMSGSIZE) {
			t.Fatalf("oversized datagram: %v, want EMSGSIZE", err)
		}
		var opErr *net.OpError
		if errors.As(err, &opErr) {
			t.Errorf("error still wraps *net.OpError: %v", err)
		}
		t.Log(err)
		// Like conntrack, the table counts what the client sent as it is
		// seen, before it leaves; a datagram the socket refuses still
		// came from the client.
		if e := f.table.Lookup(Key{UDP, client1, srv.addr}).Entry(); e.OrigPackets != 1 || e.OrigBytes != 70000 {
			t.Errorf("refused datagram not counted as seen: %+v", e)
		}
	})

	t.Run("TableFull", func(t *testing.T) {
		f := newUDPFixture(t, FilterAddressPortDependent, TableOptions{MaxFlows: 1})
		if err := f.udp.Send("p", client1, srv.addr, []byte("a")); err != nil {
			t.Fatal(err)
		}
		f.sink.next(t)
		other := netip.AddrPortFrom(srv.addr.Addr(), srv.addr.Port()+1)
		if err := f.udp.Send("p", client1, other, []byte("b")); !errors.Is(err, ErrTableFull) {
			t.Fatalf("second destination in a full table: %v", err)
		}
		if err := f.udp.Send("p", client2, srv.addr, []byte("c")); !errors.Is(err, ErrTableFull) {
			t.Fatalf("second client in a full table: %v", err)
		}
		// The second client's socket must not linger without flows.
		if st := f.udp.Stats(); st.Mappings != 1 || st.Opened != 2 {
			t.Errorf("stats %+v: want one mapping left of two opened", st)
		}
	})

	t.Run("PortsExhausted", func(t *testing.T) {
		f := newUDPFixture(t, FilterAddressPortDependent, TableOptions{})
		f.lis.fail = ErrPortsExhausted
		err := f.udp.Send("p", client1, srv.addr, []byte("a"))
		if !errors.Is(err, ErrPortsExhausted) {
			t.Fatalf("listener failure: %v", err)
		}
		if f.table.Len() != 0 || f.udp.Stats().Mappings != 0 {
			t.Error("failed mapping left state behind")
		}
		f.lis.fail = nil
		if err := f.udp.Send("p", client1, srv.addr, []byte("a")); err != nil {
			t.Fatalf("after the listener recovered: %v", err)
		}
	})
}

func TestUDPClose(t *testing.T) {
	before := runtime.NumGoroutine()
	f := newUDPFixture(t, FilterAddressPortDependent, TableOptions{})
	events, cancel := f.table.Subscribe(64)
	defer cancel()
	srv := startUDPServer(t, "udp4", "127.0.0.1:0")
	for i := range 5 {
		client := netip.AddrPortFrom(client1.Addr(), uint16(6000+i))
		if err := f.udp.Send("p", client, srv.addr, []byte("x")); err != nil {
			t.Fatal(err)
		}
		f.sink.next(t)
	}
	if st := f.udp.Stats(); st.Mappings != 5 {
		t.Fatalf("%d mappings", st.Mappings)
	}
	if err := f.udp.Close(); err != nil {
		t.Fatal(err)
	}
	f.udp.Close()
	if st := f.udp.Stats(); st.Mappings != 0 || f.table.Len() != 0 {
		t.Errorf("after Close: %+v, %d flows", st, f.table.Len())
	}
	ended := 0
	for len(events) > 0 {
		if ev := <-events; ev.Type == EventEnded && ev.Reason == ReasonShutdown {
			ended++
		}
	}
	if ended != 5 {
		t.Errorf("%d flows ended with shutdown, want 5", ended)
	}
	if err := f.udp.Send("p", client1, srv.addr, []byte("x")); !errors.Is(err, ErrUDPClosed) {
		t.Errorf("Send after Close: %v", err)
	}
	waitGoroutines(t, before+1) // the server's reader
}

// TestUDPTableCloseEndsMappings: closing the table calls every closer,
// which must take the mappings down with it.
func TestUDPTableCloseEndsMappings(t *testing.T) {
	before := runtime.NumGoroutine()
	f := newUDPFixture(t, FilterAddressPortDependent, TableOptions{})
	srv := startUDPServer(t, "udp4", "127.0.0.1:0")
	for _, c := range []netip.AddrPort{client1, client2} {
		if err := f.udp.Send("p", c, srv.addr, []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	f.table.Close()
	if st := f.udp.Stats(); st.Mappings != 0 {
		t.Errorf("%d mappings after the table closed", st.Mappings)
	}
	waitGoroutines(t, before+1)
	if err := f.udp.Send("p", client1, srv.addr, []byte("x")); !errors.Is(err, ErrTableClosed) {
		t.Errorf("Send with a closed table: %v", err)
	}
}

// TestUDPConcurrent sends from several clients while flows are evicted and
// expire, for the race detector.
func TestUDPConcurrent(t *testing.T) {
	f := newUDPFixture(t, FilterEndpointIndependent, TableOptions{Timeouts: Timeouts{UDPUnreplied: time.Second, UDPAssured: time.Second}})
	f.sink = make(sink, 4096)
	f.udp.deliver = f.sink.deliver
	srvs := []*udpServer{startUDPServer(t, "udp4", "127.0.0.1:0"), startUDPServer(t, "udp4", "127.0.0.1:0")}
	stop := make(chan struct{})
	var drained sync.WaitGroup
	drained.Add(1)
	go func() {
		defer drained.Done()
		for {
			select {
			case <-f.sink:
			case <-stop:
				return
			}
		}
	}()

	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			client := netip.AddrPortFrom(client1.Addr(), uint16(7000+w))
			for i := range 200 {
				err := f.udp.Send("p", client, srvs[i%2].addr, []byte("ping"))
				if err != nil && !errors.Is(err, ErrTableFull) {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for range 50 {
			for _, e := range f.table.Snapshot() {
				if e.ID%3 == 0 {
					f.table.Evict(e.ID)
				}
			}
			f.clock.advance(300 * time.Millisecond)
			f.table.expire()
			time.Sleep(time.Millisecond)
		}
	}()
	wg.Wait()
	f.udp.Close()
	close(stop)
	drained.Wait()
	if f.table.Len() != 0 || f.udp.Stats().Mappings != 0 {
		t.Errorf("left %d flows, %d mappings", f.table.Len(), f.udp.Stats().Mappings)
	}
}

// silentUDP returns a loopback socket that never answers (nor reads).
func silentUDP(t testing.TB) netip.AddrPort {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.LocalAddr().(*net.UDPAddr).AddrPort()
}

func TestUDPSendDoesNotAllocate(t *testing.T) {
	f := newUDPFixture(t, FilterAddressPortDependent, TableOptions{})
	dst := silentUDP(t)
	payload := []byte("hello")
	if err := f.udp.Send("p", client1, dst, payload); err != nil {
		t.Fatal(err)
	}
	if n := testing.AllocsPerRun(200, func() {
		if err := f.udp.Send("p", client1, dst, payload); err != nil {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Errorf("Send on an existing mapping allocates %v times", n)
	}
}

func BenchmarkUDPSendParallel(b *testing.B) {
	tab, err := NewTable(TableOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer tab.Close()
	u, err := NewUDP(UDPOptions{Listener: &loopListener{}, Table: tab, Deliver: func(_, _ netip.AddrPort, _ []byte) {}})
	if err != nil {
		b.Fatal(err)
	}
	defer u.Close()
	dst := silentUDP(b)
	var next atomic.Int32
	payload := make([]byte, 64)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		client := netip.AddrPortFrom(client1.Addr(), uint16(9000+next.Add(1)))
		for pb.Next() {
			if err := u.Send("p", client, dst, payload); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// TestUDPAdmit holds a client source to its peer's flow limit: a new
// destination beyond it is refused, and a flow that ends frees its place.
func TestUDPAdmit(t *testing.T) {
	lim, err := NewLimiter(LimiterOptions{Default: Limits{NewFlowsPerSecond: -1, MaxFlows: 1}})
	if err != nil {
		t.Fatal(err)
	}
	srv1 := startUDPServer(t, "udp4", "127.0.0.1:0")
	srv2 := startUDPServer(t, "udp4", "127.0.0.1:0")
	var asked []netip.AddrPort
	admit := func(peer string, client netip.AddrPort) (func(), error) {
		asked = append(asked, client)
		return lim.Admit(peer)
	}
	f := newUDPFixture(t, FilterAddressPortDependent, TableOptions{}, func(o *UDPOptions) { o.Admit = admit })
	if err := f.udp.Send("p", client1, srv1.addr, []byte("a")); err != nil {
		t.Fatal(err)
	}
	if err := f.udp.Send("p", client1, srv1.addr, []byte("again")); err != nil {
		t.Fatalf("a datagram on an admitted flow: %v", err)
	}
	if err := f.udp.Send("p", client1, srv2.addr, []byte("b")); !errors.Is(err, ErrPeerFlowLimit) {
		t.Fatalf("a second flow beyond the limit: %v", err)
	}
	f.table.Evict(f.table.Lookup(Key{UDP, client1, srv1.addr}).ID())
	if err := f.udp.Send("p", client1, srv2.addr, []byte("b")); err != nil {
		t.Fatalf("after the first flow ended: %v", err)
	}
	// Asked once per new flow, with the client source.
	if len(asked) != 3 || asked[0] != client1 || asked[2] != client1 {
		t.Fatalf("Admit asked for %v; want client1 three times", asked)
	}
}
