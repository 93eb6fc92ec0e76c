package wireguard

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"

	"golang.org/x/crypto/curve25519"
)

// KeyLen is the length of a WireGuard key in bytes.
const KeyLen = 32

// keyLenBase64 is the length of a key in standard, padded base64, the form
// wg(8) prints and reads.
const keyLenBase64 = 44

// Key is a Curve25519 private or public key, or a preshared key. Its text
// form (String, MarshalText) is standard padded base64, as wg(8) prints it.
type Key [KeyLen]byte

// GeneratePrivateKey returns a new random private key, clamped as
// `wg genkey` clamps it.
func GeneratePrivateKey() (Key, error) {
	k, err := randomKey()
	if err != nil {
		return Key{}, fmt.Errorf("wireguard: generate private key: %w", err)
	}
	k.clamp()
	return k, nil
}

// GeneratePresharedKey returns 32 random bytes, as `wg genpsk` does.
func GeneratePresharedKey() (Key, error) {
	k, err := randomKey()
	if err != nil {
		return Key{}, fmt.Errorf("wireguard: generate preshared key: %w", err)
	}
	return k, nil
}

func randomKey() (Key, error) {
	var k Key
	if _, err := rand.Read(k[:]); err != nil {
		return Key{}, err
	}
	return k, nil
}

// clamp applies the X25519 scalar clamping of RFC 7748 section 5. X25519
// clamps anyway when it uses the key; storing the clamped form makes the
// key byte-identical to what wg(8) generates and prints.
func (k *Key) clamp() {
	k[0] &= 248
	k[31] = (k[31] & 127) | 64
}

// ParseKey decodes a key in standard padded base64 (44 characters). Its
// errors describe what is wrong without quoting the input, which may be a
// private key.
func ParseKey(s string) (Key, error) {
	if s == "" {
		return Key{}, errors.New("wireguard: key is empty")
	}
	if len(s) != keyLenBase64 {
		return Key{}, fmt.Errorf("wireguard: key is %d characters long, want %d (32 bytes in base64)", len(s), keyLenBase64)
	}
	// Strict rejects non-zero padding bits, which wg(8) rejects too: a key
	// has exactly one text form.
	b, err := base64.StdEncoding.Strict().DecodeString(s)
	if err != nil {
		var corrupt base64.CorruptInputError
		if errors.As(err, &corrupt) {
			return Key{}, fmt.Errorf("wireguard: key is not valid base64 (at character %d)", int64(corrupt)+1)
		}
		return Key{}, errors.New("wireguard: key is not valid base64")
	}
	if len(b) != KeyLen {
		return Key{}, fmt.Errorf("wireguard: key decodes to %d bytes, want %d", len(b), KeyLen)
	}
	return Key(b), nil
}

// PublicKey returns the public key that belongs to k as a private key.
func (k Key) PublicKey() Key {
	pub, err := curve25519.X25519(k[:], curve25519.Basepoint)
	if err != nil {
		// X25519 fails only when the result is the all-zero point, which a
		// clamped scalar times the prime-order base point never is.
		panic("wireguard: X25519 with the base point failed: " + err.Error())
	}
	return Key(pub)
}

// IsZero reports whether k is all zeros, the value that means "no key"
// (for example no preshared key). The comparison takes constant time.
func (k Key) IsZero() bool {
	var zero Key
	return subtle.ConstantTimeCompare(k[:], zero[:]) == 1
}

// String returns k in standard padded base64.
func (k Key) String() string {
	return base64.StdEncoding.EncodeToString(k[:])
}

// MarshalText returns k in standard padded base64, or an empty text for the
// zero key, so that an optional key (a preshared key that is not set) reads
// as absent in JSON state.
func (k Key) MarshalText() ([]byte, error) {
	if k.IsZero() {
		return []byte{}, nil
	}
	b := make([]byte, keyLenBase64)
	base64.StdEncoding.Encode(b, k[:])
	return b, nil
}

// UnmarshalText parses base64 as ParseKey does; an empty text gives the
// zero key.
func (k *Key) UnmarshalText(text []byte) error {
	if len(text) == 0 {
		*k = Key{}
		return nil
	}
	v, err := ParseKey(string(text))
	if err != nil {
		return err
	}
	*k = v
	return nil
}

// hex returns k in lower-case hexadecimal, the form the UAPI configuration
// protocol uses.
func (k Key) hex() string {
	return hex.EncodeToString(k[:])
}

// short returns an abbreviation of a public key for error messages and logs,
// the way wireguard-go names peers. It must never be used on private keys.
func (k Key) short() string {
	s := k.String()
	return s[:4] + "…" + s[39:43]
}
