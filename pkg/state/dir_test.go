package state

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestDefaultDirFromEnvironment(t *testing.T) {
	home := t.TempDir()
	t.Setenv("HOME", home)

	t.Run("STATE_DIRECTORY first of several", func(t *testing.T) {
		t.Setenv("STATE_DIRECTORY", "/var/lib/sluice-a:/var/lib/other")
		t.Setenv("XDG_STATE_HOME", "/ignored")
		got, err := DefaultDir()
		if err != nil || got != "/var/lib/sluice-a" {
			t.Fatalf("DefaultDir() = %q, %v; want /var/lib/sluice-a", got, err)
		}
	})
	t.Run("STATE_DIRECTORY relative", func(t *testing.T) {
		t.Setenv("STATE_DIRECTORY", "sluice")
		if got, err := DefaultDir(); err == nil {
			t.Fatalf("DefaultDir() = %q, want an error for a relative STATE_DIRECTORY", got)
		}
	})
	t.Run("XDG_STATE_HOME", func(t *testing.T) {
		t.Setenv("STATE_DIRECTORY", "")
		t.Setenv("XDG_STATE_HOME", "/home/u/.state")
		got, err := DefaultDir()
		if err != nil || got != "/home/u/.state/sluice" {
			t.Fatalf("DefaultDir() = %q, %v; want /home/u/.state/sluice", got, err)
		}
	})
	t.Run("neither set", func(t *testing.T) {
		t.Setenv("STATE_DIRECTORY", "")
		t.Setenv("XDG_STATE_HOME", "relative/is/ignored")
		want := filepath.Join(home, ".local/state/sluice")
		if os.Geteuid() == 0 {
			want = "/var/lib/sluice"
		}
		got, err := DefaultDir()
		if err != nil || got != want {
			t.Fatalf("DefaultDir() as euid %d = %q, %v; want %q", os.Geteuid(), got, err, want)
		}
	})
}

func TestDefaultDirRootAndUser(t *testing.T) {
	env := func(m map[string]string) func(string) string {
		return func(k string) string { return m[k] }
	}
	home := func() (string, error) { return "/home/u", nil }
	noHome := func() (string, error) { return "", errors.New("$HOME is not defined") }
	for _, tc := range []struct {
		name    string
		env     map[string]string
		euid    int
		home    func() (string, error)
		want    string
		wantErr bool
	}{
		{"root", nil, 0, home, "/var/lib/sluice", false},
		{"user", nil, 1000, home, "/home/u/.local/state/sluice", false},
		{"user without home", nil, 1000, noHome, "", true},
		{"root with XDG", map[string]string{"XDG_STATE_HOME": "/x"}, 0, home, "/x/sluice", false},
		{"root with systemd", map[string]string{"STATE_DIRECTORY": "/var/lib/private/sluice"}, 0, home, "/var/lib/private/sluice", false},
		{"trailing slash", map[string]string{"STATE_DIRECTORY": "/srv/s/:/b"}, 1000, home, "/srv/s", false},
	} {
		got, err := defaultDir(env(tc.env), tc.euid, tc.home)
		if (err != nil) != tc.wantErr || got != tc.want {
			t.Errorf("%s: got %q, %v; want %q (error %v)", tc.name, got, err, tc.want, tc.wantErr)
		}
	}
}

func TestOpenCreatesPrivateDir(t *testing.T) {
	base := t.TempDir()
	t.Setenv("STATE_DIRECTORY", filepath.Join(base, "a", "b"))
	s, err := Open("")
	if err != nil {
		t.Fatal(err)
	}
	if s.Dir() != filepath.Join(base, "a", "b") || s.Path() != filepath.Join(base, "a", "b", "state.json") {
		t.Fatalf("Dir() = %q, Path() = %q", s.Dir(), s.Path())
	}
	fi, err := os.Stat(s.Dir())
	if err != nil {
		t.Fatal(err)
	}
	if !fi.IsDir() || fi.Mode().Perm() != 0o700 {
		t.Fatalf("state dir mode %v, want drwx------", fi.Mode())
	}
	// A file where the directory should be is an error, not a surprise later.
	f := filepath.Join(base, "file")
	os.WriteFile(f, nil, 0o600)
	if _, err := Open(f); err == nil {
		t.Fatal("Open on a regular file succeeded")
	}
}
