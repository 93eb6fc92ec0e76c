package wireguard

import (
	"net"
	"net/netip"
	"testing"
	"time"
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
