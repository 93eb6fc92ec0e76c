package gateway

import (
	"net"
	"net/netip"
	"testing"

	"github.com/sluice-vpn/sluice/nat"
)

// TestUDPPortExhaustion: with every port of the slice held by a mapping,
// a new client source is refused as port exhaustion (its own reason in
// the metrics), and the client hears host unreachable rather than nothing.
func TestUDPPortExhaustion(t *testing.T) {
	ports := nat.PortRange{Lo: 41990, Hi: 41991}
	srv, dev := rawGateway(t, func(o *Options) { o.Egress.Ports = ports })
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	dst := pc.LocalAddr().(*net.UDPAddr).AddrPort()

	// One more source than the slice has ports (fewer may fit if another
	// program holds one of them).
	for i := range ports.Len() + 1 {
		src := netip.AddrPortFrom(netip.MustParseAddr("100.96.0.2"), uint16(50000+i))
		if _, err := dev.Write([][]byte{udp4Packet(src, dst, 64, []byte("hello"))}, 0); err != nil {
			t.Fatal(err)
		}
	}
	got := readPacket(t, dev)
	if got[9] != 1 || got[20] != 3 || got[21] != 1 {
		t.Fatalf("got protocol %d, ICMP %d/%d; want host unreachable for the source that found no port", got[9], got[20], got[21])
	}
	refused := srv.Stats().Refused[RefusedPorts]
	st := srv.Stats()
	if refused == 0 || st.Egress.Exhausted == 0 || st.Refused[RefusedDial] != 0 {
		t.Fatalf("refused for ports %d, pool exhausted %d, refused as dial errors %d; want the last source refused for ports",
			refused, st.Egress.Exhausted, st.Refused[RefusedDial])
	}
}
