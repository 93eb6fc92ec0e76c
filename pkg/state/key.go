package state

import "encoding/base64"

// keyLen is the length of a WireGuard key and of its base64 text.
const (
	keyLen     = 32
	keyTextLen = 44
)

// checkKey checks that s is a WireGuard key in standard base64. Public and
// private keys may not be all zeros: WireGuard treats a zero key as unset.
func checkKey(field, s string, nonZero bool) error {
	if s == "" {
		return fieldErr(field, "missing")
	}
	b, err := base64.StdEncoding.Strict().DecodeString(s)
	// DecodeString skips newlines, so the length of the text is checked too.
	if err != nil || len(s) != keyTextLen || len(b) != keyLen {
		return fieldErr(field, "not 32 bytes of base64")
	}
	if nonZero {
		var zero [keyLen]byte
		if [keyLen]byte(b) == zero {
			return fieldErr(field, "all zeros")
		}
	}
	return nil
}
