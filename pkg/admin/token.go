package admin

import (
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"os"
	"strings"

	"github.com/sluice-vpn/sluice/pkg/state"
)

// tokenBytes is the token's entropy: 256 bits, beyond guessing.
const tokenBytes = 32

// LoadOrCreateToken returns the bearer token kept in the file at path,
// creating the file with a fresh random token if there is none. The file
// is written atomically and is 0600: the token is a credential for the
// whole API, and anyone who can read it can steer the gateway. A file that
// others may read, or that does not hold a token, is replaced with a new
// token rather than trusted.
func LoadOrCreateToken(path string) (string, error) {
	tok, err := readToken(path, true)
	if err == nil {
		return tok, nil
	}
	b := make([]byte, tokenBytes)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("admin: token: %w", err)
	}
	tok = base64.RawURLEncoding.EncodeToString(b)
	if err := state.WriteFile(path, []byte(tok+"\n")); err != nil {
		return "", fmt.Errorf("admin: token: %w", err)
	}
	return tok, nil
}

// ReadTokenFile reads the bearer token that a gateway keeps at path.
func ReadTokenFile(path string) (string, error) {
	return readToken(path, false)
}

func readToken(path string, private bool) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	if private {
		fi, err := f.Stat()
		if err != nil {
			return "", err
		}
		if fi.Mode().Perm()&0o077 != 0 {
			return "", fmt.Errorf("%s: readable by others (mode %v)", path, fi.Mode().Perm())
		}
	}
	buf := make([]byte, 256)
	n, err := f.Read(buf)
	if err != nil {
		return "", fmt.Errorf("%s: %w", path, err)
	}
	tok := strings.TrimSpace(string(buf[:n]))
	if !validToken(tok) {
		return "", fmt.Errorf("%s: not a token", path)
	}
	return tok, nil
}

// validToken accepts what LoadOrCreateToken writes, and any operator's
// token of printable ASCII that is long enough not to be guessed.
func validToken(tok string) bool {
	if len(tok) < 16 || len(tok) > 200 {
		return false
	}
	for i := 0; i < len(tok); i++ {
		if tok[i] <= ' ' || tok[i] > '~' {
			return false
		}
	}
	return true
}
