package wireguard

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
)

// TestAddrBind runs a session between two devices, the server listening
// on 127.0.0.2 only.
func TestAddrBind(t *testing.T) {
	clientPriv := genKey(t)
	serverPriv := genKey(t)
	server := newNode(t, Options{
		PrivateKey: serverPriv,
		Bind:       NewAddrBind(netip.MustParseAddr("127.0.0.2")),
		Peers:      []Peer{clientPeer(clientPriv.PublicKey(), Key{}, "100.96.0.2/32")},
	})
	port := server.dev.ListenPort()

	// The other loopback addresses have nothing on that port: the kernel
	// answers port unreachable, which a connected socket reads as refused.
	c, err := net.DialUDP("udp", nil, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port})
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte("anyone?"))
	c.SetReadDeadline(time.Now().Add(time.Second))
	if _, err := c.Read(make([]byte, 8)); err == nil {
		t.Error("something answered on 127.0.0.1")
	}
	c.Close()

	client := newNode(t, Options{
		PrivateKey: clientPriv,
		Peers: []Peer{{
			PublicKey:  serverPriv.PublicKey(),
			Endpoint:   netip.AddrPortFrom(netip.MustParseAddr("127.0.0.2"), uint16(port)),
			AllowedIPs: prefixes(t, "0.0.0.0/0"),
		}},
	})
	pkt := udpPacket(netip.AddrPortFrom(clientAddr4, 4000), remote4, []byte("through one address"))
	client.send(t, pkt)
	server.expect(t, pkt)
	if st := server.stats(t, clientPriv.PublicKey()); st.Endpoint.Port() != uint16(client.dev.ListenPort()) {
		t.Fatalf("server sees the client at %v", st.Endpoint)
	}
}

// openBind opens b on port 0 and closes it when the test ends.
func openBind(tb testing.TB, b conn.Bind) ([]conn.ReceiveFunc, uint16) {
	tb.Helper()
	fns, port, err := b.Open(0)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { b.Close() })
	return fns, port
}

// readBatch is one ReceiveFunc call with a full batch of buffers.
func readBatch(tb testing.TB, recv conn.ReceiveFunc) ([][]byte, []conn.Endpoint) {
	tb.Helper()
	bufs := make([][]byte, conn.IdealBatchSize)
	for i := range bufs {
		bufs[i] = make([]byte, device.MaxMessageSize)
	}
	sizes := make([]int, len(bufs))
	eps := make([]conn.Endpoint, len(bufs))
	n, err := recv(bufs, sizes, eps)
	if err != nil {
		tb.Fatal(err)
	}
	out := make([][]byte, n)
	for i := range n {
		out[i] = bufs[i][:sizes[i]]
	}
	return out, eps[:n]
}

// datagram i of a test run: its number, then filler, size bytes in all.
func datagram(i, size int) []byte {
	d := bytes.Repeat([]byte{byte(i)}, size)
	binary.BigEndian.PutUint16(d, uint16(i))
	return d
}

// TestAddrBindReadsBatches sends datagrams from a plain socket and reads
// them with one call: they come out in order, whole, from the sender.
func TestAddrBindReadsBatches(t *testing.T) {
	b := NewAddrBind(netip.MustParseAddr("127.0.0.1"))
	fns, port := openBind(t, b)
	if len(fns) != 1 {
		t.Fatalf("%d receive functions, want 1", len(fns))
	}
	c, err := net.DialUDP("udp", nil, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: int(port)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	const count = 100
	for i := range count {
		if _, err := c.Write(datagram(i, 200+i)); err != nil {
			t.Fatal(err)
		}
	}
	var got [][]byte
	calls := 0
	for len(got) < count {
		pkts, eps := readBatch(t, fns[0])
		calls++
		for i, p := range pkts {
			if eps[i].DstToString() != c.LocalAddr().String() {
				t.Fatalf("datagram from %s, want %s", eps[i].DstToString(), c.LocalAddr())
			}
			got = append(got, p)
		}
	}
	// The datagrams were all queued before the first read. With receive
	// offload a read leaves room for conn.IdealBatchSize/64 runs of up to
	// 64 datagrams, as wireguard-go's bind does, and datagrams sent one by
	// one come one per run.
	want := 1
	if b.rxOffload {
		want = count / (conn.IdealBatchSize / maxSegments)
	}
	if calls > want {
		t.Errorf("%d datagrams took %d reads, want %d", count, calls, want)
	}
	for i, p := range got {
		if !bytes.Equal(p, datagram(i, 200+i)) {
			t.Fatalf("datagram %d: %d bytes, starting %x", i, len(p), p[:min(4, len(p))])
		}
	}
}

// TestAddrBindSendsBatches sends runs of equal datagrams, a short one
// between them, from one AddrBind to another: every datagram arrives as
// it was sent, whether the kernel segmented and coalesced them or not.
func TestAddrBindSendsBatches(t *testing.T) {
	for _, addr := range []string{"127.0.0.1", "::1"} {
		t.Run(addr, func(t *testing.T) {
			ip := netip.MustParseAddr(addr)
			a, b := NewAddrBind(ip), NewAddrBind(ip)
			openBind(t, a)
			fns, port := openBind(t, b)
			var sent [][]byte
			for i := range conn.IdealBatchSize {
				size := 1200
				if i == 70 || i == 127 {
					size = 300
				}
				sent = append(sent, datagram(i, size))
			}
			ep, err := a.ParseEndpoint(netip.AddrPortFrom(ip, port).String())
			if err != nil {
				t.Fatal(err)
			}
			if err := a.Send(sent, ep); err != nil {
				t.Fatal(err)
			}
			var got [][]byte
			reads := 0
			for len(got) < len(sent) {
				pkts, _ := readBatch(t, fns[0])
				got = append(got, pkts...)
				reads++
			}
			// Three runs: 64 datagrams (the most one send segments),
			// 7 ending with a short one, 57 ending with the other.
			if a.txOffload.Load() && b.rxOffload && reads > 2 {
				t.Errorf("%d datagrams took %d reads, want 2", len(sent), reads)
			}
			for i := range sent {
				if !bytes.Equal(got[i], sent[i]) {
					t.Fatalf("datagram %d: got %d bytes starting %x, want %d starting %x", i, len(got[i]), got[i][:2], len(sent[i]), sent[i][:2])
				}
			}
			t.Logf("segmentation %v, receive offload %v", a.txOffload.Load(), b.rxOffload)
		})
	}
}

// TestAddrBindOnlyItsAddress: a datagram to another loopback address on
// the bind's port is refused by the kernel, one to the bind's arrives.
func TestAddrBindOnlyItsAddress(t *testing.T) {
	b := NewAddrBind(netip.MustParseAddr("127.0.0.2"))
	fns, port := openBind(t, b)
	other, err := net.DialUDP("udp", nil, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: int(port)})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	other.Write([]byte("wrong address"))
	other.SetReadDeadline(time.Now().Add(time.Second))
	if _, err := other.Read(make([]byte, 16)); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("sending to 127.0.0.1:%d: %v, want connection refused", port, err)
	}
	right, err := net.DialUDP("udp", nil, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 2), Port: int(port)})
	if err != nil {
		t.Fatal(err)
	}
	defer right.Close()
	right.Write([]byte("right address"))
	pkts, _ := readBatch(t, fns[0])
	if len(pkts) != 1 || string(pkts[0]) != "right address" {
		t.Fatalf("read %q", pkts)
	}
}
