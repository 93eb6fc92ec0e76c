package state

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
)

const (
	fileName  = "state.json"
	prevName  = fileName + ".prev"
	lockName  = "lock"
	tmpPrefix = "." + fileName + "." // temp files: .state.json.<random>.tmp, .state.json.prev.<random>.tmp
	tmpSuffix = ".tmp"
)

// ErrNoState is matched (errors.Is) by Load's error when nothing has been
// saved yet; errors.Is(err, os.ErrNotExist) holds as well.
var ErrNoState error = noStateError{}

type noStateError struct{}

func (noStateError) Error() string        { return "state: nothing saved yet" }
func (noStateError) Is(target error) bool { return target == fs.ErrNotExist }

// ErrDamaged is matched (errors.Is) by the error Load returns for a state
// file that exists but cannot be used, and by Save's refusal to replace
// such a file. The details are in a *DamagedError.
var ErrDamaged = errors.New("state: damaged")

// DamagedError describes a state file that exists but cannot be used:
// cut off, not JSON, or with invalid fields. Nothing has been changed on
// disk; the caller must not generate a new key over it, but tell the
// operator.
type DamagedError struct {
	// Path is the damaged file.
	Path string
	// Prev is the previous version of the file if one is kept and it is
	// good, else "".
	Prev string
	// Err says what is wrong, such as "truncated JSON at byte 120".
	Err error
}

// Error returns, for example, "state /x/state.json: truncated JSON at byte
// 120 (the previous good state is in /x/state.json.prev)".
func (e *DamagedError) Error() string {
	hint := "no good previous version is kept"
	if e.Prev != "" {
		hint = "the previous good state is in " + e.Prev
	}
	return fmt.Sprintf("state %s: %v (%s)", e.Path, e.Err, hint)
}

// Unwrap returns Err.
func (e *DamagedError) Unwrap() error { return e.Err }

// Is reports whether target is ErrDamaged.
func (e *DamagedError) Is(target error) bool { return target == ErrDamaged }

// Store is a state directory: state.json, state.json.prev and the lock
// file. It is safe for concurrent use.
type Store struct {
	dir string

	mu   sync.Mutex // serialises Save, and guards lock
	lock *os.File   // the held lock file, nil when not held
}

// Open returns the Store for dir, creating the directory (mode 0700, and
// its parents) if it is missing. An empty dir means DefaultDir().
func Open(dir string) (*Store, error) {
	if dir == "" {
		d, err := DefaultDir()
		if err != nil {
			return nil, err
		}
		dir = d
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("state: open %s: %w", dir, err)
	}
	if err := os.MkdirAll(abs, 0o700); err != nil {
		return nil, fmt.Errorf("state: open: %w", err)
	}
	return &Store{dir: abs}, nil
}

// Dir returns the absolute path of the state directory.
func (s *Store) Dir() string { return s.dir }

// Path returns the path of the state file, <dir>/state.json.
func (s *Store) Path() string { return filepath.Join(s.dir, fileName) }

// PrevPath returns the path where the version before the last Save is
// kept, <dir>/state.json.prev.
func (s *Store) PrevPath() string { return filepath.Join(s.dir, prevName) }

// Load reads and validates the state. It returns an error matching
// ErrNoState if none has been saved, and a *DamagedError if the file
// cannot be used; in neither case does it change anything on disk.
// Reading needs no lock: the file is only ever replaced whole.
func (s *Store) Load() (*State, error) {
	data, err := os.ReadFile(s.Path())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s does not exist", ErrNoState, s.Path())
	}
	if err != nil {
		return nil, fmt.Errorf("state: load: %w", err)
	}
	st, err := decode(data)
	if err != nil {
		return nil, s.damaged(err)
	}
	return st, nil
}

// damaged describes a problem with state.json, pointing at the previous
// version only if that one is good.
func (s *Store) damaged(err error) *DamagedError {
	e := &DamagedError{Path: s.Path(), Err: err}
	if prev, rerr := os.ReadFile(s.PrevPath()); rerr == nil {
		if _, derr := decode(prev); derr == nil {
			e.Prev = s.PrevPath()
		}
	}
	return e
}

// decode parses and validates a state file, saying what is wrong and
// where.
func decode(data []byte) (*State, error) {
	end := len(bytes.TrimRight(data, " \t\r\n"))
	if end == 0 {
		return nil, errors.New("empty file")
	}
	// A first pass over the syntax alone gives an offset for every error,
	// and tells a file cut off mid-write from one that is garbled.
	syntax := json.NewDecoder(bytes.NewReader(data))
	var raw json.RawMessage
	if err := syntax.Decode(&raw); err != nil {
		var se *json.SyntaxError
		switch {
		case errors.Is(err, io.ErrUnexpectedEOF):
			return nil, fmt.Errorf("truncated JSON at byte %d", len(data))
		case errors.As(err, &se):
			line, col := position(data, se.Offset)
			return nil, fmt.Errorf("invalid JSON at byte %d (line %d, column %d): %w", se.Offset, line, col, err)
		default:
			return nil, fmt.Errorf("invalid JSON: %w", err)
		}
	}
	if off := syntax.InputOffset(); off < int64(end) {
		first := off + int64(len(data[off:])-len(bytes.TrimLeft(data[off:], " \t\r\n"))) + 1
		line, col := position(data, first)
		return nil, fmt.Errorf("invalid JSON at byte %d (line %d, column %d): more data after the end of the state", first, line, col)
	}
	var st State
	dec := json.NewDecoder(bytes.NewReader(data))
	// A misspelt field in a hand-edited file would otherwise be dropped on
	// the next Save without a word.
	dec.DisallowUnknownFields()
	if err := dec.Decode(&st); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			line, col := position(data, te.Offset)
			return nil, fmt.Errorf("wrong type at byte %d (line %d, column %d): field %s: %s where %s was expected", te.Offset, line, col, te.Field, te.Value, te.Type)
		}
		msg := strings.TrimPrefix(err.Error(), "json: ")
		if strings.HasPrefix(msg, "unknown field") {
			return nil, errors.New(msg)
		}
		return nil, fmt.Errorf("invalid value: %s", msg)
	}
	if err := st.Validate(); err != nil {
		return nil, err
	}
	return &st, nil
}

// position returns the line and column of the byte that ends at offset
// off: encoding/json reports an error "after reading off bytes", so the
// culprit is byte off (counting from 1), at index off-1.
func position(data []byte, off int64) (line, col int) {
	i := int(min(max(off-1, 0), int64(len(data))))
	before := data[:i]
	line = bytes.Count(before, []byte{'\n'}) + 1
	col = i - bytes.LastIndexByte(before, '\n')
	return line, col
}

// Save validates st and writes it atomically: to a temp file in the
// directory, fsync'd, renamed over state.json, then the directory is
// fsync'd. A crash at any point leaves the old or the new file. The file
// being replaced is first kept as state.json.prev (the same way), unless
// the content does not change, in which case nothing is written.
//
// The caller must hold the lock (Lock or TryLock on this Store). Save
// refuses to replace a damaged state.json (the error matches ErrDamaged):
// whoever looks at it next should find it as it was.
func (s *Store) Save(st *State) error {
	if err := st.Validate(); err != nil {
		return fmt.Errorf("state: save %s: %w", s.Path(), err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.lock == nil {
		return fmt.Errorf("state: save %s: the lock is not held (call Lock or TryLock first)", s.Path())
	}
	out := *st
	if out.Peers == nil {
		out.Peers = []Peer{} // "peers": [] rather than null
	}
	data, err := json.MarshalIndent(&out, "", "\t")
	if err != nil {
		return fmt.Errorf("state: save: %w", err)
	}
	data = append(data, '\n')

	old, err := os.ReadFile(s.Path())
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return fmt.Errorf("state: save: %w", err)
	default:
		if _, derr := decode(old); derr != nil {
			return fmt.Errorf("state: save: refusing to replace a damaged file: %w", s.damaged(derr))
		}
		if bytes.Equal(old, data) {
			return nil
		}
		if err := s.writeFile(prevName, old); err != nil {
			return err
		}
	}
	if err := s.writeFile(fileName, data); err != nil {
		return err
	}
	if err := syncDir(s.dir); err != nil {
		return fmt.Errorf("state: save: %w", err)
	}
	return nil
}

// writeFile replaces <dir>/name with data through a temp file that is
// fsync'd before the rename, so the name always holds a whole file.
func (s *Store) writeFile(name string, data []byte) error {
	if err := WriteFile(filepath.Join(s.dir, name), data); err != nil {
		return fmt.Errorf("state: save: %w", err)
	}
	return nil
}

// WriteFile replaces path with data, mode 0600, atomically: through a
// temporary file in the same directory, synced before it is renamed over
// path, and the directory synced after, so that a reader sees the old file
// or the new one whole and a crash loses neither. The state directory's
// files and the admin token are written this way.
func WriteFile(path string, data []byte) (err error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*"+tmpSuffix)
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
			err = fmt.Errorf("write %s: %w", path, err)
		}
	}()
	if err := f.Chmod(0o600); err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	return syncDir(dir)
}

// syncDir makes renames in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	// Some file systems cannot sync a directory (EINVAL); the rename
	// stands there as it is.
	if err := d.Sync(); err != nil && !errors.Is(err, syscall.EINVAL) {
		return fmt.Errorf("fsync %s: %w", dir, err)
	}
	return nil
}

// removeTemps deletes temp files left by a Save that crashed. Only the
// lock holder may call it: anyone else's Save could be using them.
func (s *Store) removeTemps() {
	matches, _ := filepath.Glob(filepath.Join(s.dir, tmpPrefix+"*"+tmpSuffix))
	for _, m := range matches {
		os.Remove(m)
	}
}
