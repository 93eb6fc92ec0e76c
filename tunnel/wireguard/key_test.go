package wireguard

import (
	"crypto/ecdh"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"strings"
	"testing"
)

func mustHexKey(t *testing.T, s string) Key {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != KeyLen {
		t.Fatalf("bad test key %q: %v", s, err)
	}
	return Key(b)
}

// RFC 7748 section 6.1: X25519 of each private key with the base point.
func TestPublicKeyRFC7748(t *testing.T) {
	for _, tc := range []struct{ name, priv, pub string }{
		{"alice", "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a", "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"},
		{"bob", "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb", "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			priv, want := mustHexKey(t, tc.priv), mustHexKey(t, tc.pub)
			if got := priv.PublicKey(); got != want {
				t.Fatalf("PublicKey = %x, want %x", got, want)
			}
			// Clamping is part of X25519, so the clamped form of the
			// key has the same public key.
			c := priv
			c.clamp()
			if got := c.PublicKey(); got != want {
				t.Fatalf("clamped PublicKey = %x, want %x", got, want)
			}
		})
	}
}

// Generated keys agree with an independent X25519 (the standard library's).
func TestPublicKeyMatchesECDH(t *testing.T) {
	for range 20 {
		k, err := GeneratePrivateKey()
		if err != nil {
			t.Fatal(err)
		}
		ek, err := ecdh.X25519().NewPrivateKey(k[:])
		if err != nil {
			t.Fatal(err)
		}
		if got, want := k.PublicKey(), Key(ek.PublicKey().Bytes()); got != want {
			t.Fatalf("PublicKey(%x) = %x, crypto/ecdh says %x", k, got, want)
		}
	}
}

func TestGenerateClamped(t *testing.T) {
	seen := make(map[Key]bool)
	for range 64 {
		k, err := GeneratePrivateKey()
		if err != nil {
			t.Fatal(err)
		}
		if k[0]&7 != 0 || k[31]&128 != 0 || k[31]&64 == 0 {
			t.Fatalf("key %x is not clamped: first byte %08b, last %08b", k, k[0], k[31])
		}
		if seen[k] {
			t.Fatalf("key %x generated twice", k)
		}
		seen[k] = true
	}
	// Preshared keys are plain random bytes: over many keys some must have
	// bits that clamping would clear.
	unclamped := false
	for range 64 {
		k, err := GeneratePresharedKey()
		if err != nil {
			t.Fatal(err)
		}
		if k.IsZero() {
			t.Fatal("zero preshared key")
		}
		if k[0]&7 != 0 || k[31]&128 != 0 {
			unclamped = true
		}
	}
	if !unclamped {
		t.Error("64 preshared keys all look clamped")
	}
}

func TestKeyTextRoundTrip(t *testing.T) {
	k, err := GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	s := k.String()
	if len(s) != 44 || !strings.HasSuffix(s, "=") {
		t.Fatalf("String() = %q, want 44 characters of padded base64", s)
	}
	if want := base64.StdEncoding.EncodeToString(k[:]); s != want {
		t.Fatalf("String() = %q, want %q", s, want)
	}
	got, err := ParseKey(s)
	if err != nil || got != k {
		t.Fatalf("ParseKey(String()) = %x, %v; want %x", got, err, k)
	}

	// In JSON, set keys are base64 and the zero key is an empty string.
	type state struct {
		Private Key
		PSK     Key
	}
	b, err := json.Marshal(state{Private: k})
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"Private":"` + s + `","PSK":""}`; string(b) != want {
		t.Fatalf("json = %s, want %s", b, want)
	}
	var back state
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if back.Private != k || !back.PSK.IsZero() {
		t.Fatalf("json round trip: %+v", back)
	}
	if err := json.Unmarshal([]byte(`{"Private":"bm90IGEga2V5"}`), &back); err == nil {
		t.Fatal("json accepted a 12-character key")
	}
}

func TestKeyHex(t *testing.T) {
	k := mustHexKey(t, "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
	if got := k.hex(); got != "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a" {
		t.Fatalf("hex() = %s", got)
	}
	back, err := keyFromHex(k.hex())
	if err != nil || back != k {
		t.Fatalf("keyFromHex(hex()) = %x, %v", back, err)
	}
}

func TestIsZero(t *testing.T) {
	var k Key
	if !k.IsZero() {
		t.Fatal("zero key is not IsZero")
	}
	k[31] = 1
	if k.IsZero() {
		t.Fatal("non-zero key is IsZero")
	}
}

func TestParseKeyErrors(t *testing.T) {
	// A private key that must not appear in any error message.
	secret := "YHDC3bw1G1GgDK3Ii8IRzQ5iGpTvlgoAsQdC5vt+J1c="
	if _, err := ParseKey(secret); err != nil {
		t.Fatalf("valid key rejected: %v", err)
	}
	for _, tc := range []struct {
		name, in, want string
	}{
		{"empty", "", "empty"},
		{"short", secret[:43], "43 characters long, want 44"},
		{"long", secret + "A", "45 characters long, want 44"},
		{"hex", strings.Repeat("ab", 32), "64 characters long"},
		{"bad character", secret[:10] + "!" + secret[11:], "not valid base64 (at character 11)"},
		{"url alphabet", strings.Replace(secret, "+", "-", 1), "not valid base64"},
		{"missing padding", secret[:43] + "A", "decodes to 33 bytes, want 32"},
		{"31 bytes", base64.StdEncoding.EncodeToString(make([]byte, 31)), "decodes to 31 bytes, want 32"},
		{"padding bits set", secret[:42] + "d=", "not valid base64"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseKey(tc.in)
			if err == nil {
				t.Fatalf("ParseKey(%q) succeeded", tc.in)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not contain %q", err, tc.want)
			}
			if len(tc.in) > 8 && strings.Contains(err.Error(), tc.in[:8]) {
				t.Errorf("error %q quotes the key", err)
			}
		})
	}
}
