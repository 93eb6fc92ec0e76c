package state

import (
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestLockAcrossProcesses(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	child := startHelper(t, "hold", dir)
	if got := child.line(t); got != "locked" {
		t.Fatalf("helper said %q", got)
	}
	pid := child.cmd.Process.Pid

	_, err = s.TryLock()
	if !errors.Is(err, ErrLocked) || !strings.Contains(err.Error(), "pid "+strconv.Itoa(pid)) {
		t.Fatalf("TryLock while pid %d holds the lock: %v; want ErrLocked naming the pid", pid, err)
	}
	t.Log(err)

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = s.Lock(ctx)
	if !errors.Is(err, ErrLocked) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Lock with a short deadline: %v", err)
	}
	if waited := time.Since(start); waited < 90*time.Millisecond {
		t.Fatalf("Lock gave up after %v, before its deadline", waited)
	}
	t.Log(err)

	// Lock waits for the holder to go; the holder dying (SIGKILL, no
	// chance to clean up) is enough.
	got := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		unlock, err := s.Lock(ctx)
		if err == nil {
			err = s.Save(newState(t, DefaultPools))
			unlock()
		}
		got <- err
	}()
	select {
	case err := <-got:
		t.Fatalf("Lock returned while the helper still holds the lock: %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	child.cmd.Process.Kill()
	child.cmd.Wait()
	select {
	case err := <-got:
		if err != nil {
			t.Fatalf("Lock after the holder died: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Lock still waiting 5s after the holder died")
	}

	// And the other way round: while this process holds it, another cannot
	// take it; once released, it can.
	unlock, err := s.TryLock()
	if err != nil {
		t.Fatal(err)
	}
	if got := startHelper(t, "try", dir).line(t); !strings.HasPrefix(got, "busy: state: locked by another process (pid "+strconv.Itoa(os.Getpid())) {
		t.Fatalf("helper's TryLock while this process holds the lock: %q", got)
	}
	unlock()
	unlock() // harmless
	if got := startHelper(t, "try", dir).line(t); got != "locked" {
		t.Fatalf("helper's TryLock after unlock: %q", got)
	}
}

func TestLockWithinProcess(t *testing.T) {
	dir := t.TempDir()
	a, _ := Open(dir)
	b, _ := Open(dir)
	unlockA, err := a.TryLock()
	if err != nil {
		t.Fatal(err)
	}
	// flock belongs to the open file, so two Stores exclude each other
	// even in one process.
	if _, err := b.TryLock(); !errors.Is(err, ErrLocked) {
		t.Fatalf("second Store's TryLock: %v", err)
	}
	if err := b.Save(newState(t, DefaultPools)); err == nil {
		t.Fatal("Save through a Store that does not hold the lock succeeded")
	}
	if err := a.Save(newState(t, DefaultPools)); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		unlock, err := b.Lock(context.Background())
		if err != nil {
			t.Error(err)
			return
		}
		unlock()
	}()
	time.Sleep(20 * time.Millisecond)
	unlockA()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Lock still waiting 5s after the holder unlocked")
	}
	// A cancelled context stops a waiting Lock at once.
	unlockA, _ = a.TryLock()
	defer unlockA()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := b.Lock(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Lock with a cancelled context: %v", err)
	}
}

// TestCrashDuringSave kills a process that saves in a loop at random
// moments; every time, what is left must load, and so must the previous
// version.
func TestCrashDuringSave(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	unlock, err := s.TryLock()
	if err != nil {
		t.Fatal(err)
	}
	st := newState(t, DefaultPools)
	if err := s.Save(st); err != nil {
		t.Fatal(err)
	}
	unlock()
	key := st.PrivateKey

	var peers []int
	for i := range 15 {
		child := startHelper(t, "churn", dir)
		if got := child.line(t); got != "ready" {
			t.Fatalf("helper said %q", got)
		}
		time.Sleep(time.Duration(rand.IntN(5000)) * time.Microsecond)
		child.cmd.Process.Kill()
		child.cmd.Wait()

		st, err := s.Load()
		if err != nil {
			t.Fatalf("kill %d: %v", i, err)
		}
		if st.PrivateKey != key {
			t.Fatalf("kill %d: the private key changed", i)
		}
		prev, err := os.ReadFile(s.PrevPath())
		if err != nil {
			t.Fatal(err)
		}
		if _, err := decode(prev); err != nil {
			t.Fatalf("kill %d: state.json.prev: %v", i, err)
		}
		peers = append(peers, len(st.Peers))
	}
	t.Logf("peers after each kill: %v", peers)
}
