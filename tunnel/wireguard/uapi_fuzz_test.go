package wireguard

import (
	"net/netip"
	"strings"
	"testing"
	"time"
)

// uapiGetAnswer is what wireguard-go answers to a get operation, in the
// shape parsePeerStats and parseListenPort read.
const uapiGetAnswer = "private_key=e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a\n" +
	"listen_port=51820\n" +
	"public_key=b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33\n" +
	"preshared_key=0000000000000000000000000000000000000000000000000000000000000000\n" +
	"protocol_version=1\n" +
	"endpoint=[abcd:23::33%2]:51820\n" +
	"last_handshake_time_sec=1700000000\n" +
	"last_handshake_time_nsec=5000\n" +
	"tx_bytes=38333\n" +
	"rx_bytes=2224\n" +
	"persistent_keepalive_interval=0\n" +
	"allowed_ip=192.168.4.4/32\n" +
	"allowed_ip=fd00::4/128\n" +
	"public_key=58402e695ba1772b1cc9309755f043251ea77fdcf10fbe63989ceb7e19321376\n" +
	"endpoint=182.122.22.19:3233\n" +
	"allowed_ip=0.0.0.0/0\n" +
	"errno=0\n\n"

// FuzzParseUAPI reads arbitrary get answers: neither parser panics, a
// listen port is in range, and every peer parsePeerStats returns has a
// line of its own in the answer.
func FuzzParseUAPI(f *testing.F) {
	f.Add(uapiGetAnswer)
	f.Add("listen_port=0\n")
	f.Add("public_key=zz\n")
	f.Add("listen_port=70000\npublic_key=" + strings.Repeat("0", 64) + "\nallowed_ip=1.2.3.4/33\n")
	f.Fuzz(func(t *testing.T, text string) {
		if port, err := parseListenPort(text); err == nil && (port < 0 || port > 65535) {
			t.Fatalf("listen port %d", port)
		}
		stats, err := parsePeerStats(text)
		if err != nil {
			if stats != nil {
				t.Fatalf("peers returned with error %v", err)
			}
			return
		}
		if n := strings.Count("\n"+text, "\npublic_key="); len(stats) > n {
			t.Fatalf("%d peers from %d public_key lines", len(stats), n)
		}
		for _, s := range stats {
			for _, p := range s.AllowedIPs {
				if !p.IsValid() {
					t.Fatalf("invalid allowed IP in %+v", s)
				}
			}
		}
	})
}

// FuzzPeerUAPI renders a peer as set-operation lines and reads them with
// the get-answer parser, which shares their keys: the public key, the
// endpoint and the allowed IPs (masked, as the device stores them) come
// back as they went.
func FuzzPeerUAPI(f *testing.F) {
	f.Add(make([]byte, 32), make([]byte, 32), "192.0.2.1:51820", uint16(25), "10.0.0.2/32,fd00::2/128")
	f.Add([]byte("0123456789abcdef0123456789abcdef"), []byte{}, "[2001:db8::1%eth0]:1", uint16(0), "0.0.0.0/0,::/0,10.1.2.3/8")
	f.Fuzz(func(t *testing.T, pub, psk []byte, endpoint string, keepalive uint16, allowed string) {
		var p Peer
		copy(p.PublicKey[:], pub)
		copy(p.PresharedKey[:], psk)
		p.Endpoint, _ = netip.ParseAddrPort(endpoint)
		p.PersistentKeepalive = time.Duration(keepalive) * time.Second
		for s := range strings.SplitSeq(allowed, ",") {
			if pfx, err := netip.ParsePrefix(s); err == nil {
				p.AllowedIPs = append(p.AllowedIPs, pfx)
			}
		}
		var b strings.Builder
		writePeerUAPI(&b, p)
		stats, err := parsePeerStats(b.String())
		if err != nil {
			t.Fatalf("parsing the rendered peer: %v\n%s", err, b.String())
		}
		if len(stats) != 1 {
			t.Fatalf("%d peers from one\n%s", len(stats), b.String())
		}
		got := stats[0]
		if got.PublicKey != p.PublicKey {
			t.Fatalf("public key %x, want %x", got.PublicKey, p.PublicKey)
		}
		if got.Endpoint != p.Endpoint {
			t.Fatalf("endpoint %v, want %v\n%s", got.Endpoint, p.Endpoint, b.String())
		}
		if len(got.AllowedIPs) != len(p.AllowedIPs) {
			t.Fatalf("%d allowed IPs, want %d", len(got.AllowedIPs), len(p.AllowedIPs))
		}
		for i, pfx := range p.AllowedIPs {
			if got.AllowedIPs[i] != pfx.Masked() {
				t.Fatalf("allowed IP %d: %v, want %v", i, got.AllowedIPs[i], pfx.Masked())
			}
		}
	})
}
