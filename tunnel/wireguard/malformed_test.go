package wireguard

import (
	"encoding/binary"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/conn"
)

// TestMalformedDatagramsCounted sends the device's port what is not
// WireGuard (too short, an unknown type, a handshake of the wrong size)
// and a handshake initiation of the right size that no key opens: each is
// counted once. A real client's session after them is not.
func TestMalformedDatagramsCounted(t *testing.T) {
	clientPriv, serverPriv := genKey(t), genKey(t)
	server := newNode(t, Options{
		PrivateKey: serverPriv,
		Bind:       NewAddrBind(netip.MustParseAddr("127.0.0.1")),
		Peers:      []Peer{clientPeer(clientPriv.PublicKey(), Key{}, "100.96.0.2/32")},
	})
	port := server.dev.ListenPort()
	c, err := net.DialUDP("udp", nil, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	typed := func(typ uint32, size int) []byte {
		b := make([]byte, size)
		binary.LittleEndian.PutUint32(b, typ)
		for i := 4; i < size; i++ {
			b[i] = byte(i)
		}
		return b
	}
	garbage := [][]byte{
		[]byte("hello"), // too short
		typed(9, 64),    // unknown type
		typed(1, 100),   // an initiation is 148 bytes
		typed(4, 20),    // shorter than an empty transport message
		typed(1, 148),   // the right size, but mac1 is wrong
	}
	for _, g := range garbage {
		if _, err := c.Write(g); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(3 * time.Second)
	for server.dev.Malformed() < uint64(len(garbage)) && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if got := server.dev.Malformed(); got != uint64(len(garbage)) {
		t.Fatalf("Malformed = %d, want %d", got, len(garbage))
	}

	client := newNode(t, Options{
		PrivateKey: clientPriv,
		Peers: []Peer{{
			PublicKey:  serverPriv.PublicKey(),
			Endpoint:   netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(port)),
			AllowedIPs: prefixes(t, "0.0.0.0/0"),
		}},
	})
	pkt := udpPacket(netip.AddrPortFrom(clientAddr4, 4000), remote4, []byte("a real one"))
	client.send(t, pkt)
	server.expect(t, pkt)
	if got := server.dev.Malformed(); got != uint64(len(garbage)) {
		t.Errorf("Malformed = %d after a real session, want %d", got, len(garbage))
	}
}

// TestCountMalformedKeepsDefaultBind: wireguard-go's own bind is not
// wrapped, so that the device still recognises it (its sticky-socket route
// listener runs only for a *conn.StdNetBind); other binds are.
func TestCountMalformedKeepsDefaultBind(t *testing.T) {
	var n atomic.Uint64
	std := conn.NewDefaultBind()
	if got := countMalformed(std, &n); got != std {
		t.Errorf("the default bind came back as %T", got)
	}
	if _, ok := countMalformed(NewAddrBind(netip.MustParseAddr("127.0.0.1")), &n).(*countingBind); !ok {
		t.Error("an AddrBind was not wrapped")
	}
}
