package wireguard

import (
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/wgquick")

var goldenDir = filepath.Join("..", "..", "testdata", "wgquick")

// Keys from RFC 7748 section 6.1, so the golden files are fixed.
const (
	alicePriv = "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo="
	alicePub  = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="
	bobPriv   = "XasIfmJKikt54X+Lg4AO5m87sSkmGLb9HC+LJ/+I4Os="
	bobPub    = "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08="
	testPSK   = "Sl2dW6TOLeFyjjv0gDUPJeB+IclH0Z4zdvCbPB4WF0I="
)

func mustKey(t *testing.T, s string) Key {
	t.Helper()
	k, err := ParseKey(s)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func prefixes(t *testing.T, ss ...string) []netip.Prefix {
	t.Helper()
	out := make([]netip.Prefix, len(ss))
	for i, s := range ss {
		out[i] = netip.MustParsePrefix(s)
	}
	return out
}

// golden compares got with the named file, or rewrites the file with -update.
func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join(goldenDir, name)
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run with -update to create it)", err)
	}
	if got != string(want) {
		t.Errorf("%s differs from the rendering:\n--- got\n%s--- want\n%s", path, got, want)
	}
}

func readGolden(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(goldenDir, name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// clientConfig is what a gateway hands a client: its tunnel addresses and
// everything routed through the gateway.
func clientConfig(t *testing.T) *Config {
	return &Config{
		Interface: Interface{
			PrivateKey: mustKey(t, alicePriv),
			Addresses:  prefixes(t, "100.96.0.2/32", "fd5c:1ce::2/128"),
			DNS:        []netip.Addr{netip.MustParseAddr("1.1.1.1"), netip.MustParseAddr("2606:4700:4700::1111")},
			MTU:        1420,
		},
		Peers: []ConfigPeer{{
			PublicKey:           mustKey(t, bobPub),
			PresharedKey:        mustKey(t, testPSK),
			Endpoint:            "vpn.example.com:51820",
			AllowedIPs:          prefixes(t, "0.0.0.0/0", "::/0"),
			PersistentKeepalive: 25,
		}},
	}
}

func TestConfigRenderClientGolden(t *testing.T) {
	golden(t, "client.conf", clientConfig(t).String())
}

func TestConfigRoundTrip(t *testing.T) {
	for _, name := range []string{"client.conf", "server.conf"} {
		t.Run(name, func(t *testing.T) {
			text := readGolden(t, name)
			cfg, err := ParseConfig(text)
			if err != nil {
				t.Fatal(err)
			}
			// Goldens are canonical, so rendering gives them back byte
			// for byte, and parsing that gives the same Config.
			rendered := cfg.String()
			if rendered != text {
				t.Fatalf("render after parse differs:\n--- got\n%s--- want\n%s", rendered, text)
			}
			again, err := ParseConfig(rendered)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(cfg, again) {
				t.Fatalf("parse → render → parse changed the config:\n%+v\n%+v", cfg, again)
			}
		})
	}
	got, err := ParseConfig(readGolden(t, "client.conf"))
	if err != nil {
		t.Fatal(err)
	}
	if want := clientConfig(t); !reflect.DeepEqual(got, want) {
		t.Fatalf("client.conf parses to\n%+v\nwant\n%+v", got, want)
	}
}

// server.conf is a gateway's view: a listen port, no DNS, several peers,
// one without a preshared key.
func TestConfigRenderServerGolden(t *testing.T) {
	cfg := &Config{
		Interface: Interface{
			PrivateKey: mustKey(t, bobPriv),
			Addresses:  prefixes(t, "100.96.0.1/10", "fd5c:1ce::1/64"),
			ListenPort: 51820,
		},
		Peers: []ConfigPeer{
			{PublicKey: mustKey(t, alicePub), PresharedKey: mustKey(t, testPSK), AllowedIPs: prefixes(t, "100.96.0.2/32", "fd5c:1ce::2/128")},
			{PublicKey: mustKey(t, "AhPIHlzsnzd8hdanCUm3S3s6DDUzqJgmAWQgmnMWkRc="), Endpoint: "[2001:db8::7]:51821", AllowedIPs: prefixes(t, "100.96.0.3/32")},
		},
	}
	golden(t, "server.conf", cfg.String())
}

func TestParseHandwritten(t *testing.T) {
	cfg, err := ParseConfig(readGolden(t, "handwritten.conf"))
	if err != nil {
		t.Fatal(err)
	}
	want := &Config{
		Interface: Interface{
			PrivateKey: mustKey(t, bobPriv),
			Addresses:  prefixes(t, "100.96.0.1/10", "fd5c:1ce::1/64", "10.20.0.1/24"),
			DNS:        []netip.Addr{netip.MustParseAddr("1.1.1.1"), netip.MustParseAddr("2606:4700:4700::1111")},
			MTU:        1380,
			ListenPort: 51820,
		},
		Peers: []ConfigPeer{
			{
				PublicKey:    mustKey(t, alicePub),
				PresharedKey: mustKey(t, testPSK),
				AllowedIPs:   prefixes(t, "100.96.0.2/32", "fd5c:1ce::2/128"),
			},
			{
				PublicKey:  mustKey(t, bobPub),
				Endpoint:   "[2001:db8::7]:51821",
				AllowedIPs: prefixes(t, "100.96.0.3/32", "fd5c:1ce::3/128"),
			},
		},
	}
	if !reflect.DeepEqual(cfg, want) {
		t.Fatalf("parsed\n%+v\nwant\n%+v", cfg, want)
	}
	golden(t, "handwritten.canonical.conf", cfg.String())

	// The same file with Windows line endings and a byte-order mark.
	crlf := "\ufeff" + strings.ReplaceAll(readGolden(t, "handwritten.conf"), "\n", "\r\n")
	cfg, err = ParseConfig(crlf)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(cfg, want) {
		t.Fatalf("CRLF file parsed\n%+v\nwant\n%+v", cfg, want)
	}
}

func TestParseConfigErrors(t *testing.T) {
	const iface = "[Interface]\nPrivateKey = " + alicePriv + "\n"
	const peer = "[Peer]\nPublicKey = " + bobPub + "\n"
	for _, tc := range []struct {
		name, text, want string
	}{
		{"empty", "", "no [Interface] section"},
		{"only comments", "# nothing\n\n", "no [Interface] section"},
		{"setting before section", "PrivateKey = " + alicePriv + "\n[Interface]\n", "line 1: PrivateKey: setting outside of a section"},
		{"unknown section", iface + "[Peers]\n", "line 3: unknown section [Peers]"},
		{"unclosed header", iface + "[Peer\n", "line 3: section header \"[Peer\" has no closing ']'"},
		{"second interface", iface + "[Interface]\n", "line 3: second [Interface] section (first on line 1)"},
		{"no equals", iface + "MTU 1420\n", "line 3: expected \"Key = Value\""},
		{"no key", iface + " = 1420\n", "line 3: expected \"Key = Value\": the key is missing"},
		{"unknown interface key", iface + "Adress = 10.0.0.1/32\n", "line 3: Adress: unknown key in [Interface]"},
		{"peer key in interface", iface + "Endpoint = 127.0.0.1:1\n", "line 3: Endpoint: unknown key in [Interface]"},
		{"unknown peer key", iface + peer + "AllowedIP = 10.0.0.1/32\n", "line 5: AllowedIP: unknown key in [Peer]"},
		{"no private key", "[Interface]\nAddress = 10.0.0.1/32\n", "line 1: [Interface] has no PrivateKey"},
		{"bad private key", "[Interface]\nPrivateKey = " + alicePriv[:40] + "\n", "line 2: PrivateKey: key is 40 characters long, want 44"},
		{"private key twice", iface + "PrivateKey = " + bobPriv + "\n", "line 3: PrivateKey: set twice in one section (first on line 2)"},
		{"bad address", "[Interface]\nPrivateKey = " + alicePriv + "\nAddress = 10.0.0.1/32, 10.0.0.300/32\n", `line 3: Address: "10.0.0.300/32" is not an IP prefix`},
		{"address with zone", iface + "Address = fe80::1%eth0\n", `line 3: Address: "fe80::1%eth0" is not an IP address or prefix`},
		{"search domain", iface + "DNS = 1.1.1.1, corp.example\n", `line 3: DNS: "corp.example" is not an IP address (DNS search domains are not supported)`},
		{"bad MTU", iface + "MTU = big\n", `line 3: MTU: "big" is not a number`},
		{"MTU range", iface + "MTU = 70000\n", "line 3: MTU: 70000 out of range [68, 65535]"},
		{"listen port", iface + "ListenPort = 65536\n", "line 3: ListenPort: 65536 out of range [0, 65535]"},
		{"peer without key", iface + "[Peer]\nAllowedIPs = 0.0.0.0/0\n[Peer]\n", "line 3: [Peer] has no PublicKey"},
		{"last peer without key", iface + "\n[Peer]\nAllowedIPs = 0.0.0.0/0\n", "line 4: [Peer] has no PublicKey"},
		{"duplicate peer", iface + peer + "\n" + peer, "line 7: PublicKey: peer 3p7b…IK08 already has a [Peer] section (PublicKey on line 4)"},
		{"bad public key", iface + "[Peer]\nPublicKey = not-a-key\n", "line 4: PublicKey: key is 9 characters long"},
		{"bad preshared key", iface + peer + "PresharedKey = " + strings.Repeat("!", 44) + "\n", "line 5: PresharedKey: key is not valid base64 (at character 1)"},
		{"endpoint without port", iface + peer + "Endpoint = vpn.example.com\n", `line 5: Endpoint: "vpn.example.com" is not HOST:PORT`},
		{"endpoint v6 without brackets", iface + peer + "Endpoint = 2001:db8::1:51820\n", `line 5: Endpoint: "2001:db8::1:51820" is not HOST:PORT (an IPv6 address goes in brackets)`},
		{"endpoint port", iface + peer + "Endpoint = vpn.example.com:0\n", `line 5: Endpoint: "vpn.example.com:0": port "0" is not a number in [1, 65535]`},
		{"endpoint named port", iface + peer + "Endpoint = vpn.example.com:wireguard\n", `port "wireguard" is not a number`},
		{"endpoint no host", iface + peer + "Endpoint = :51820\n", `line 5: Endpoint: ":51820" has no host`},
		{"endpoint bad host", iface + peer + "Endpoint = vpn example.com:51820\n", `line 5: Endpoint: "vpn example.com:51820": host "vpn example.com" is neither`},
		{"endpoint twice", iface + peer + "Endpoint = a.example:1\nEndpoint = b.example:1\n", "line 6: Endpoint: set twice in one section (first on line 5)"},
		{"bad allowed ip", iface + peer + "AllowedIPs = 0.0.0.0/0,::/129\n", `line 5: AllowedIPs: "::/129" is not an IP prefix`},
		{"keepalive", iface + peer + "PersistentKeepalive = 65536\n", "line 5: PersistentKeepalive: 65536 out of range [0, 65535]"},
		{"keepalive negative", iface + peer + "PersistentKeepalive = -1\n", "line 5: PersistentKeepalive: -1 out of range"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := ParseConfig(tc.text)
			if err == nil {
				t.Fatalf("parsed into %+v, want error containing %q", cfg, tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q\ndoes not contain %q", err, tc.want)
			}
			if strings.Contains(err.Error(), alicePriv[:12]) || strings.Contains(err.Error(), bobPriv[:12]) {
				t.Errorf("error %q quotes a private key", err)
			}
		})
	}
}

// A wrong private key is reported without being echoed.
func TestParseConfigPrivateKeyNotEchoed(t *testing.T) {
	bad := alicePriv[:20] + "*" + alicePriv[21:]
	_, err := ParseConfig("[Interface]\nPrivateKey = " + bad + "\n")
	if err == nil {
		t.Fatal("bad private key accepted")
	}
	if !strings.Contains(err.Error(), "line 2: PrivateKey: key is not valid base64 (at character 21)") {
		t.Errorf("unexpected error %q", err)
	}
	if strings.Contains(err.Error(), alicePriv[:8]) || strings.Contains(err.Error(), alicePriv[22:30]) {
		t.Errorf("error %q quotes the key", err)
	}
}

// Rendering leaves out what is not set, and only that.
func TestConfigRenderMinimal(t *testing.T) {
	cfg := &Config{
		Interface: Interface{PrivateKey: mustKey(t, alicePriv)},
		Peers:     []ConfigPeer{{PublicKey: mustKey(t, bobPub)}},
	}
	want := "[Interface]\nPrivateKey = " + alicePriv + "\n\n[Peer]\nPublicKey = " + bobPub + "\n"
	if got := cfg.String(); got != want {
		t.Fatalf("got\n%s\nwant\n%s", got, want)
	}
	back, err := ParseConfig(want)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(back, cfg) {
		t.Fatalf("round trip: %+v", back)
	}
}
