package state

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
)

// ErrLocked is matched (errors.Is) by TryLock's error, and Lock's when it
// gives up, if another process (or another Store) holds the lock.
var ErrLocked = errors.New("state: locked by another process")

// LockPath returns the path of the lock file, <dir>/lock.
func (s *Store) LockPath() string { return filepath.Join(s.dir, lockName) }

// TryLock takes the directory's exclusive advisory lock (flock on
// <dir>/lock) without waiting. If someone else holds it the error matches
// ErrLocked and names the holder's pid when known. unlock releases the
// lock; calling it more than once is harmless. The lock also goes when the
// process dies, so a crashed gateway never leaves it behind.
func (s *Store) TryLock() (unlock func(), err error) {
	f, err := os.OpenFile(s.LockPath(), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("state: lock: %w", err)
	}
	ok, err := tryFlock(f)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("state: lock %s: %w", s.LockPath(), err)
	}
	if !ok {
		f.Close()
		return nil, s.lockedErr()
	}
	// The pid is for the error message of whoever comes next; the lock is
	// the flock, not the content.
	pid := []byte(strconv.Itoa(os.Getpid()) + "\n")
	if f.Truncate(0) == nil {
		f.WriteAt(pid, 0)
	}

	s.mu.Lock()
	s.lock = f
	s.mu.Unlock()
	s.removeTemps()

	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			defer s.mu.Unlock()
			s.lock = nil
			f.Truncate(0)
			f.Close() // releases the flock
		})
	}, nil
}

// lockedErr returns ErrLocked with the holder's pid if the lock file has
// one.
func (s *Store) lockedErr() error {
	b, _ := os.ReadFile(s.LockPath())
	if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 0 {
		return fmt.Errorf("%w (pid %d holds %s)", ErrLocked, pid, s.LockPath())
	}
	return fmt.Errorf("%w (%s)", ErrLocked, s.LockPath())
}

// Lock takes the lock like TryLock, waiting for it as long as ctx allows.
// If ctx ends first the error matches both ErrLocked and ctx.Err().
func (s *Store) Lock(ctx context.Context) (unlock func(), err error) {
	// flock(2) cannot be interrupted by a context, so poll; holders are
	// a CLI command (milliseconds) or a gateway (its whole life), so a
	// short delay on handover does not matter.
	wait := time.Millisecond
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		unlock, err := s.TryLock()
		if !errors.Is(err, ErrLocked) {
			return unlock, err
		}
		t.Reset(wait)
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%w; gave up waiting: %w", err, ctx.Err())
		case <-t.C:
		}
		wait = min(2*wait, 100*time.Millisecond)
	}
}
