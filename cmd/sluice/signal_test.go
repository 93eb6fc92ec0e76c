package main

import (
	"bytes"
	"context"
	"sync"
	"syscall"
	"testing"
	"time"
)

// syncBuffer is a bytes.Buffer safe for the signal goroutine's write.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// TestSecondSignalExitsAtOnce signals the test process itself, which
// signalContext catches: the first SIGTERM cancels the context and exits
// nothing; a second signal, SIGINT here, exits with 128 + its number.
func TestSecondSignalExitsAtOnce(t *testing.T) {
	codes := make(chan int, 2)
	var stderr syncBuffer
	ctx, stop := signalContext(context.Background(), &stderr, func(code int) { codes <- code })
	defer stop()

	if err := syscall.Kill(syscall.Getpid(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-ctx.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("SIGTERM did not cancel the context")
	}
	select {
	case code := <-codes:
		t.Fatalf("the first signal exited (%d)", code)
	case <-time.After(100 * time.Millisecond):
	}

	if err := syscall.Kill(syscall.Getpid(), syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	select {
	case code := <-codes:
		if code != 128+int(syscall.SIGINT) {
			t.Errorf("exit status %d; want %d", code, 128+int(syscall.SIGINT))
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a second signal did not exit")
	}
	if got := stderr.String(); !bytes.Contains([]byte(got), []byte("again")) {
		t.Errorf("stderr %q does not say why it exits", got)
	}
}

// TestStopReleasesSignals: once stopped, signalContext neither cancels
// nor exits; another handler gets the signal.
func TestStopReleasesSignals(t *testing.T) {
	ctx, stop := signalContext(context.Background(), &syncBuffer{}, func(int) { t.Error("exit after stop") })
	stop()
	stop() // twice is fine
	if ctx.Err() == nil {
		t.Error("stop left the context alive")
	}
}
