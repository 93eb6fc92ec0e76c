package wireguard

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// FuzzParseConfig parses arbitrary wg-quick text. Whatever parses must
// render (String) to text that parses back to the same Config, and render
// the same again: the canonical form is a fixed point, so a configuration
// sluice hands out means what the user's file meant.
func FuzzParseConfig(f *testing.F) {
	files, _ := filepath.Glob(filepath.Join(goldenDir, "*.conf"))
	if len(files) == 0 {
		f.Fatalf("no seed configurations in %s", goldenDir)
	}
	for _, name := range files {
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(string(b))
	}
	f.Add("[Interface]\nPrivateKey = \n")
	f.Add("[interface]\nprivatekey=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n[Peer]\n")
	f.Fuzz(func(t *testing.T, text string) {
		c, err := ParseConfig(text)
		// Without an [Interface] header and a PrivateKey there is no
		// configuration.
		if lower := strings.ToLower(text); err == nil && (!strings.Contains(lower, "interface") || !strings.Contains(lower, "privatekey")) {
			t.Fatalf("ParseConfig accepted text without [Interface] or PrivateKey:\n%s", text)
		}
		if err != nil {
			if c != nil {
				t.Fatalf("ParseConfig returned a config with error %v", err)
			}
			return
		}
		out := c.String()
		back, err := ParseConfig(out)
		if err != nil {
			t.Fatalf("the rendered config does not parse: %v\ninput:\n%s\nrendered:\n%s", err, text, out)
		}
		if !reflect.DeepEqual(back, c) {
			t.Fatalf("parse → render → parse differs:\n%+v\n%+v\nrendered:\n%s", c, back, out)
		}
		if again := back.String(); again != out {
			t.Fatalf("rendering is not stable:\n%s\n---\n%s", out, again)
		}
	})
}
