package gateway

import (
	"bytes"
	"context"
	"encoding/binary"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/sluice-vpn/sluice/nat"
	"github.com/sluice-vpn/sluice/nat/nattest"
	"github.com/sluice-vpn/sluice/tunnel/memtun"
	"golang.org/x/sys/unix"
)

// TestUDPClosedPortGetsPortUnreachable: a datagram to a port nothing
// listens on comes back to the client as port unreachable, which its
// connected socket reads as connection refused, as it would without the
// gateway.
func TestUDPClosedPortGetsPortUnreachable(t *testing.T) {
	h := start(t, nil)
	for _, network := range []string{"udp4", "udp6"} {
		t.Run(network, func(t *testing.T) {
			laddr := "127.0.0.1:0"
			if network == "udp6" {
				laddr = "[::1]:0"
			}
			pc, err := net.ListenPacket(network, laddr)
			if err != nil {
				t.Fatal(err)
			}
			closed := pc.LocalAddr().String()
			pc.Close()
			c, err := h.client.DialContext(context.Background(), "udp", closed)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, err := c.Write([]byte("anyone?")); err != nil {
				t.Fatal(err)
			}
			// The client's stack (gVisor's gonet) notices the error only
			// when a read begins, not while one waits: read in short turns.
			for deadline := time.Now().Add(3 * time.Second); ; {
				c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
				_, err = c.Read(make([]byte, 64))
				if err != nil && strings.Contains(err.Error(), "refused") {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("reading after a datagram to a closed port: %v, want connection refused", err)
				}
			}
			if got := h.srv.Stats().UDP.ICMPErrors; got == 0 {
				t.Error("no ICMP error counted")
			}
		})
	}
}

// TestTunnelMalformedMetric: datagrams to the WireGuard port that are not
// WireGuard show in sluice_tunnel_malformed_total.
func TestTunnelMalformedMetric(t *testing.T) {
	srv := startWireGuard(t)
	c, err := net.DialUDP("udp", nil, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: srv.ListenPort()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for range 3 {
		if _, err := c.Write([]byte("not wireguard at all, but long enough to pass the size check")); err != nil {
			t.Fatal(err)
		}
	}
	var got float64
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if got = counterOf(t, srv, "sluice_tunnel_malformed_total"); got == 3 {
			return
		}
	}
	t.Fatalf("sluice_tunnel_malformed_total = %v, want 3", got)
}

// counterOf reads an unlabelled counter from the gateway's collector.
func counterOf(t *testing.T, srv *Server, name string) float64 {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(srv.Collector())
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) == 1 {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	t.Fatalf("no %s", name)
	return 0
}

// rawGateway is a gateway on one end of an in-memory tunnel whose other
// end the test reads and writes packets on itself, for what a client
// stack would not send: a chosen TTL.
func rawGateway(t *testing.T, mods ...func(*Options)) (*Server, *memtun.Device) {
	t.Helper()
	a, b, err := memtun.NewPair(memtun.Options{})
	if err != nil {
		t.Fatal(err)
	}
	opts := Options{
		Device: b,
		Addrs:  []netip.Addr{netip.MustParseAddr("100.96.0.1")},
		Egress: nat.EgressOptions{Ports: slice, DialTimeout: time.Second},
		Policy: nat.PolicyOptions{Allow: loopback},
	}
	for _, mod := range mods {
		mod(&opts)
	}
	srv, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close(); srv.Close() })
	return srv, a
}

// udp4Packet is an IPv4 UDP datagram without a UDP checksum (IPv4 allows
// none).
func udp4Packet(src, dst netip.AddrPort, ttl uint8, payload []byte) []byte {
	b := make([]byte, 28, 28+len(payload))
	b[0], b[8], b[9] = 0x45, ttl, 17
	binary.BigEndian.PutUint16(b[2:4], uint16(28+len(payload)))
	copy(b[12:16], src.Addr().AsSlice())
	copy(b[16:20], dst.Addr().AsSlice())
	binary.BigEndian.PutUint16(b[10:12], ipChecksum(b[:20]))
	binary.BigEndian.PutUint16(b[20:22], src.Port())
	binary.BigEndian.PutUint16(b[22:24], dst.Port())
	binary.BigEndian.PutUint16(b[24:26], uint16(8+len(payload)))
	return append(b, payload...)
}

func ipChecksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}

// readPacket reads the next packet the gateway sends into the tunnel.
func readPacket(t *testing.T, d *memtun.Device) []byte {
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
		t.Fatal("the gateway sent nothing")
		return nil
	}
}

// TestTracerouteThroughGateway: a probe with TTL 1 is answered with time
// exceeded from the gateway's address; one with TTL 3 leaves the gateway
// with TTL 2, the next hop's to decrement.
func TestTracerouteThroughGateway(t *testing.T) {
	_, dev := rawGateway(t)
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	rc, _ := pc.SyscallConn()
	rc.Control(func(fd uintptr) { err = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_RECVTTL, 1) })
	if err != nil {
		t.Fatal(err)
	}
	srv := pc.LocalAddr().(*net.UDPAddr).AddrPort()
	client := netip.MustParseAddrPort("100.96.0.2:40000")

	probe := udp4Packet(client, srv, 1, []byte("hop 1"))
	if _, err := dev.Write([][]byte{probe}, 0); err != nil {
		t.Fatal(err)
	}
	got := readPacket(t, dev)
	if from := netip.AddrFrom4([4]byte(got[12:16])); got[9] != 1 || got[20] != 11 || from != netip.MustParseAddr("100.96.0.1") {
		t.Fatalf("TTL 1: got protocol %d, ICMP type %d from %s; want time exceeded from the gateway's 100.96.0.1", got[9], got[20], from)
	}
	if !bytes.Equal(got[28:28+len(probe)], probe) {
		t.Error("the time exceeded does not quote the probe")
	}

	if _, err := dev.Write([][]byte{udp4Packet(client, srv, 3, []byte("hop 3"))}, 0); err != nil {
		t.Fatal(err)
	}
	pc.SetReadDeadline(time.Now().Add(3 * time.Second))
	buf, oob := make([]byte, 64), make([]byte, 64)
	n, oobn, _, _, err := pc.ReadMsgUDP(buf, oob)
	if err != nil {
		t.Fatal(err)
	}
	cmsgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
	if string(buf[:n]) != "hop 3" || len(cmsgs) != 1 || len(cmsgs[0].Data) < 4 || cmsgs[0].Data[0] != 2 {
		t.Fatalf("got %q with control %v; want the probe with TTL 2", buf[:n], cmsgs)
	}
}

// echo4Packet is an IPv4 echo request.
func echo4Packet(src, dst netip.Addr, ttl uint8, id, seq uint16, payload []byte) []byte {
	b := make([]byte, 28, 28+len(payload))
	b[0], b[8], b[9] = 0x45, ttl, 1
	binary.BigEndian.PutUint16(b[2:4], uint16(28+len(payload)))
	copy(b[12:16], src.AsSlice())
	copy(b[16:20], dst.AsSlice())
	binary.BigEndian.PutUint16(b[10:12], ipChecksum(b[:20]))
	b[20] = 8
	binary.BigEndian.PutUint16(b[24:26], id)
	binary.BigEndian.PutUint16(b[26:28], seq)
	b = append(b, payload...)
	binary.BigEndian.PutUint16(b[22:24], ipChecksum(b[20:]))
	return b
}

// TestPingTracerouteThroughGateway: an echo request with TTL 3 leaves the
// gateway with TTL 2, and the time exceeded a router sends for it (played
// here by a raw socket at 127.0.0.5) reaches the client from the router,
// quoting the client's own identifier and sequence.
func TestPingTracerouteThroughGateway(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("seeing the request and playing a router need raw sockets (root)")
	}
	watch, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMP)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(watch)
	unix.SetsockoptTimeval(watch, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 3})
	_, dev := rawGateway(t)
	client, dst := netip.MustParseAddr("100.96.0.2"), netip.MustParseAddr("127.0.0.1")
	if _, err := dev.Write([][]byte{echo4Packet(client, dst, 3, 0x77, 5, []byte("hop 3"))}, 0); err != nil {
		t.Fatal(err)
	}
	var request []byte
	for request == nil {
		buf := make([]byte, 1500)
		n, _, err := unix.Recvfrom(watch, buf, 0)
		if err != nil {
			t.Fatalf("the request did not leave the gateway: %v", err)
		}
		if ihl := int(buf[0]&0x0f) * 4; n > ihl+8 && buf[ihl] == 8 && string(buf[ihl+8:n]) == "hop 3" {
			request = buf[:n]
		}
	}
	if request[8] != 2 {
		t.Fatalf("the request left the gateway with TTL %d, want 2", request[8])
	}

	q := bytes.Clone(request)
	q[8] = 0
	router := netip.MustParseAddr("127.0.0.5")
	nattest.SendTimeExceeded(t, router, netip.AddrFrom4([4]byte(request[12:16])), q)
	for {
		got := readPacket(t, dev)
		if got[9] != 1 || got[20] == 0 {
			continue // the echo reply from 127.0.0.1 itself
		}
		from := netip.AddrFrom4([4]byte(got[12:16]))
		echo := got[28+20:]
		if got[20] != 11 || from != router || echo[0] != 8 || binary.BigEndian.Uint16(echo[4:6]) != 0x77 || binary.BigEndian.Uint16(echo[6:8]) != 5 {
			t.Fatalf("got ICMP type %d from %s quoting %x; want time exceeded from %s quoting id 0x77 seq 5", got[20], from, echo, router)
		}
		return
	}
}
