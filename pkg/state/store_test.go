package state

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// openLocked opens a Store on a fresh directory and takes its lock.
func openLocked(t testing.TB) (*Store, func()) {
	t.Helper()
	s, err := Open(filepath.Join(t.TempDir(), "state"))
	if err != nil {
		t.Fatal(err)
	}
	unlock, err := s.TryLock()
	if err != nil {
		t.Fatal(err)
	}
	return s, unlock
}

func mode(t *testing.T, path string) fs.FileMode {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Mode()
}

func TestSaveLoadRoundTrip(t *testing.T) {
	s, unlock := openLocked(t)
	defer unlock()

	_, err := s.Load()
	if !errors.Is(err, ErrNoState) || !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), s.Path()) {
		t.Fatalf("Load of an empty dir: %v; want ErrNoState and os.ErrNotExist, naming the file", err)
	}

	st := newState(t, DefaultPools)
	if err := s.Save(st); err != nil {
		t.Fatal(err)
	}
	if m := mode(t, s.Path()); m != 0o600 {
		t.Fatalf("state.json mode %v, want -rw-------", m)
	}
	if _, err := os.Stat(s.PrevPath()); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("state.json.prev after the first save: %v", err)
	}
	first, _ := os.ReadFile(s.Path())
	if !bytes.Contains(first, []byte(`"peers": []`)) {
		t.Fatalf("no peers saved as %s", first)
	}

	addPeer(t, st, "alice")
	p, _ := st.AddPeer(Peer{Name: "bob", PublicKey: randomKey(), PresharedKey: randomKey()})
	if err := s.Save(st); err != nil {
		t.Fatal(err)
	}
	got, err := s.Load()
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, st) {
		t.Fatalf("round trip:\n got %+v\nwant %+v", got, st)
	}
	if q, _ := got.Peer("bob"); q.PresharedKey != p.PresharedKey || !q.Created.Equal(p.Created) {
		t.Fatalf("bob after the round trip: %+v", q)
	}
	// The file before this save is the previous version, also 0600.
	if prev, _ := os.ReadFile(s.PrevPath()); !bytes.Equal(prev, first) {
		t.Fatalf("state.json.prev is not the first version:\n%s", prev)
	}
	if m := mode(t, s.PrevPath()); m != 0o600 {
		t.Fatalf("state.json.prev mode %v, want -rw-------", m)
	}

	// Saving the same state again writes nothing, so the previous version
	// survives it.
	second, _ := os.ReadFile(s.Path())
	if err := s.Save(got); err != nil {
		t.Fatal(err)
	}
	if prev, _ := os.ReadFile(s.PrevPath()); !bytes.Equal(prev, first) {
		t.Fatal("a save without changes replaced state.json.prev")
	}
	st.RemovePeer("alice")
	if err := s.Save(st); err != nil {
		t.Fatal(err)
	}
	if prev, _ := os.ReadFile(s.PrevPath()); !bytes.Equal(prev, second) {
		t.Fatal("state.json.prev is not the version before the last save")
	}

	// Nothing else is left in the directory.
	entries, _ := os.ReadDir(s.Dir())
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if want := []string{"lock", "state.json", "state.json.prev"}; !reflect.DeepEqual(names, want) {
		t.Fatalf("directory holds %v, want %v", names, want)
	}
}

func TestSaveNeedsLockAndValidState(t *testing.T) {
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	st := newState(t, DefaultPools)
	if err := s.Save(st); err == nil || !strings.Contains(err.Error(), "lock") {
		t.Fatalf("Save without the lock: %v", err)
	}
	unlock, err := s.TryLock()
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	st.Version = 7
	if err := s.Save(st); err == nil || !strings.Contains(err.Error(), "version") {
		t.Fatalf("Save of an invalid state: %v", err)
	}
	if _, err := os.Stat(s.Path()); !errors.Is(err, fs.ErrNotExist) {
		t.Fatal("an invalid state was written")
	}
}

func TestLoadFixture(t *testing.T) {
	// testdata/v1 is a state as written by version 1 of the format; it
	// must keep loading.
	s, err := Open("testdata/v1")
	if err != nil {
		t.Fatal(err)
	}
	st, err := s.Load()
	if err != nil {
		t.Fatal(err)
	}
	if st.PrivateKey != "YGvpvDTqNL3xmq7sL3kAr1xqwDm7EC4wDdmtUTeI/1o=" || st.Pools != DefaultPools || len(st.Peers) != 2 {
		t.Fatalf("fixture loaded as %+v", st)
	}
	bob, ok := st.Peer("bob")
	if !ok || !reflect.DeepEqual(bob.Addrs, addrs("100.96.0.3", "fd5c:1ce::3")) || bob.PresharedKey == "" || bob.Created.Year() != 2025 {
		t.Fatalf("bob loaded as %+v", bob)
	}
	if a, _ := st.Peer("alice"); a.PresharedKey != "" {
		t.Fatalf("alice loaded as %+v", a)
	}
}

// snapshot records the bytes of each file in a directory.
func snapshot(t *testing.T, dir string) map[string]string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for _, e := range entries {
		if e.Name() == "lock" {
			continue // holds the pid of the last holder
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		m[e.Name()] = string(b)
	}
	return m
}

func TestDamagedStateIsLeftAlone(t *testing.T) {
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	unlock, err := s.TryLock()
	if err != nil {
		t.Fatal(err)
	}
	st := newState(t, DefaultPools)
	addPeer(t, st, "alice")
	if err := s.Save(st); err != nil {
		t.Fatal(err)
	}
	good := st.Clone()
	addPeer(t, st, "bob")
	if err := s.Save(st); err != nil {
		t.Fatal(err)
	}
	unlock()

	// A crash as a careless writer would leave it: a temp file half
	// written, and state.json itself cut off in the middle.
	full, _ := os.ReadFile(s.Path())
	cut := len(full) * 2 / 3
	if err := os.WriteFile(s.Path(), full[:cut], 0o600); err != nil {
		t.Fatal(err)
	}
	tmp := filepath.Join(s.Dir(), ".state.json.123456.tmp")
	if err := os.WriteFile(tmp, full[:10], 0o600); err != nil {
		t.Fatal(err)
	}
	before := snapshot(t, s.Dir())

	_, err = s.Load()
	var de *DamagedError
	if !errors.As(err, &de) || !errors.Is(err, ErrDamaged) {
		t.Fatalf("Load of a cut-off file: %v, want a *DamagedError", err)
	}
	want := "state " + s.Path() + ": truncated JSON at byte " + itoa(cut) + " (the previous good state is in " + s.PrevPath() + ")"
	if err.Error() != want {
		t.Fatalf("Load error\n got %q\nwant %q", err, want)
	}
	if !reflect.DeepEqual(snapshot(t, s.Dir()), before) {
		t.Fatal("Load changed the directory")
	}

	// Whoever takes the lock next clears the stale temp file, but a Save
	// (say, of a freshly generated key) must not replace the damaged file.
	unlock, err = s.TryLock()
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	if _, err := os.Stat(tmp); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("stale temp file still there after TryLock: %v", err)
	}
	delete(before, filepath.Base(tmp))
	err = s.Save(newState(t, DefaultPools))
	if !errors.Is(err, ErrDamaged) || !strings.Contains(err.Error(), "truncated") {
		t.Fatalf("Save over a damaged file: %v, want a refusal", err)
	}
	t.Log(err)
	if !reflect.DeepEqual(snapshot(t, s.Dir()), before) {
		t.Fatal("a refused Save changed the directory")
	}

	// The operator puts the previous version back; it is the good one.
	prev, _ := os.ReadFile(s.PrevPath())
	os.WriteFile(s.Path(), prev, 0o600)
	got, err := s.Load()
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, good) {
		t.Fatalf("state.json.prev holds %+v, want %+v", got, good)
	}
}

func TestDamagedStateMessages(t *testing.T) {
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	unlock, err := s.TryLock()
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	st := newState(t, DefaultPools)
	addPeer(t, st, "alice")
	if err := s.Save(st); err != nil {
		t.Fatal(err)
	}
	valid, _ := os.ReadFile(s.Path())
	text := string(valid)
	key := st.Peers[0].PublicKey

	for _, tc := range []struct {
		name, content, want string
	}{
		{"empty", "", "empty file"},
		{"blank", " \n\n", "empty file"},
		{"garbled", strings.Replace(text, `"peers": [`, `"peers": [}`, 1), "invalid JSON at byte "},
		{"trailing garbage", text + "x", "invalid JSON at byte " + itoa(len(text)+1) + " (line " + itoa(strings.Count(text, "\n")+1) + ", column 1): more data"},
		{"wrong type", strings.Replace(text, `"version": 1`, `"version": "1"`, 1), "wrong type at byte"},
		{"unknown field", strings.Replace(text, `"peers"`, `"peer"`, 1), `unknown field "peer"`},
		{"bad address", strings.Replace(text, `"100.96.0.2"`, `"100.96.0"`, 1), "100.96.0"},
		{"bad key", strings.Replace(text, key, key[:20], 1), "peers[0].public_key: not 32 bytes of base64"},
		{"newer version", strings.Replace(text, `"version": 1`, `"version": 2`, 1), "version: 2 is not supported"},
		{"no version", strings.Replace(text, `"version": 1,`, ``, 1), "version: missing"},
	} {
		if err := os.WriteFile(s.Path(), []byte(tc.content), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := s.Load()
		if !errors.Is(err, ErrDamaged) || !strings.Contains(err.Error(), tc.want) || !strings.HasPrefix(err.Error(), "state "+s.Path()+": ") {
			t.Errorf("%s: Load = %v; want it to name the file and say %q", tc.name, err, tc.want)
			continue
		}
		t.Logf("%s: %v", tc.name, err)
	}

	// A garbled file is pinpointed by line and column too.
	os.WriteFile(s.Path(), []byte("{\n\t\"version\": 1,\n\t\"private_key\" \"x\"\n}\n"), 0o600)
	if _, err := s.Load(); err == nil || !strings.Contains(err.Error(), "byte 33 (line 3, column 16)") {
		t.Fatalf("Load = %v, want byte 33, line 3, column 16", err)
	}
	// Without a good previous version the message says so.
	os.WriteFile(s.PrevPath(), []byte("{"), 0o600)
	if _, err := s.Load(); err == nil || !strings.Contains(err.Error(), "no good previous version") {
		t.Fatalf("Load = %v, want it to say there is no good previous version", err)
	}
}
