package config

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// FuzzParse decodes arbitrary YAML as a configuration file. Parse never
// panics; it returns a configuration or Errors, never both and never
// neither; every error names a field or a line. A configuration that
// parses is valid, and Marshal writes it as YAML that parses back equal
// (`sluice config check` and /v1/config show what will be enforced).
func FuzzParse(f *testing.F) {
	files, _ := filepath.Glob("../../testdata/config/*.yaml")
	bad, _ := filepath.Glob("../../testdata/config/bad/*.yaml")
	files = append(files, bad...)
	if len(files) == 0 {
		f.Fatal("no seed configurations in ../../testdata/config")
	}
	for _, name := range files {
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte("listen: \":51820\"\n"))
	f.Add([]byte("egress: {ports: 1-2, shard: 1/1}\n"))
	f.Add([]byte("policy: &a {peers: {x: *a}}\n"))
	f.Add([]byte("---\n...\n---\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse(data)
		if err != nil {
			if c != nil {
				t.Fatalf("Parse returned a config and %v", err)
			}
			var errs Errors
			if errors.As(err, &errs) {
				if len(errs) == 0 {
					t.Fatal("Parse failed with an empty Errors")
				}
				// Only a second document that does not even parse
				// has no line to give.
				for _, e := range errs {
					if e.Msg == "" || (e.Field == "" && e.Line == 0 && !strings.HasPrefix(e.Msg, "a second YAML document")) {
						t.Fatalf("an error names neither field nor line: %q", e.Error())
					}
				}
			}
			return
		}
		if c == nil {
			t.Fatal("Parse returned neither a config nor an error")
		}
		if err := c.Validate(); err != nil {
			t.Fatalf("Parse accepted an invalid config: %v", err)
		}
		out, err := Marshal(c)
		if err != nil {
			t.Fatalf("Marshal: %v", err)
		}
		back, err := Parse(out)
		if err != nil {
			t.Fatalf("Parse(Marshal(c)): %v\ninput:\n%s\nmarshalled:\n%s", err, data, out)
		}
		if !reflect.DeepEqual(back, c) {
			t.Fatalf("Parse(Marshal(c)) differs from c\ninput:\n%s\nmarshalled:\n%s\nc:    %+v\nback: %+v", data, out, c, back)
		}
	})
}
