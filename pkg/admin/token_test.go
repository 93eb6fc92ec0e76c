package admin

import (
	"os"
	"path/filepath"
	"testing"
)

func TestLoadOrCreateToken(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, TokenName)
	tok, err := LoadOrCreateToken(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("token file mode: %v %v", fi, err)
	}
	if len(tok) < 40 {
		t.Errorf("token %q is short", tok)
	}
	again, err := LoadOrCreateToken(path)
	if err != nil || again != tok {
		t.Errorf("second load: %q %v, want the same token", again, err)
	}
	if got, err := ReadTokenFile(path); err != nil || got != tok {
		t.Errorf("ReadTokenFile: %q %v", got, err)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Errorf("the directory holds %d files, want the token alone", len(ents))
	}

	// A token others could read is a token others have: replaced.
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	fresh, err := LoadOrCreateToken(path)
	if err != nil || fresh == tok {
		t.Errorf("world-readable token: %q %v, want a new one", fresh, err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Errorf("mode after replacing: %v", fi.Mode())
	}
	// So is a file that holds no token.
	os.WriteFile(path, []byte("\n"), 0o600)
	if tok, err := LoadOrCreateToken(path); err != nil || !validToken(tok) {
		t.Errorf("empty file: %q %v", tok, err)
	}
}
