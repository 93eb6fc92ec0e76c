package wireguard

import (
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

func TestDeviceLoggerLevels(t *testing.T) {
	core, logs := observer.New(zapcore.DebugLevel)
	l := newDeviceLogger(zap.New(core), new(atomic.Uint64))
	l.Verbosef("%v - Starting", "peer(abcd…wxyz)")
	l.Errorf("Failed to set %s", "something")
	entries := logs.TakeAll()
	if len(entries) != 2 {
		t.Fatalf("got %d entries, want 2: %v", len(entries), entries)
	}
	if e := entries[0]; e.Level != zapcore.DebugLevel || e.Message != "peer(abcd…wxyz) - Starting" {
		t.Errorf("Verbosef logged %v %q", e.Level, e.Message)
	}
	if e := entries[1]; e.Level != zapcore.WarnLevel || e.Message != "Failed to set something" {
		t.Errorf("Errorf logged %v %q", e.Level, e.Message)
	}
}

// Messages wireguard-go can emit for every packet are let through once per
// interval, with a count of what was held back.
func TestDeviceLoggerPerPacketLimit(t *testing.T) {
	core, logs := observer.New(zapcore.DebugLevel)
	l := newDeviceLogger(zap.New(core), new(atomic.Uint64))
	for range 100 {
		l.Verbosef("IPv4 packet with disallowed source address from %v", "peer(abcd…wxyz)")
	}
	if n := logs.Len(); n != 1 {
		t.Fatalf("100 per-packet messages gave %d entries, want 1", n)
	}

	var lim limiter
	now := time.Now()
	if ok, _ := lim.allow(now); !ok {
		t.Fatal("first message suppressed")
	}
	for i := range 3 {
		if ok, _ := lim.allow(now.Add(time.Duration(i+1) * time.Second)); ok {
			t.Fatalf("message %d within the interval let through", i+2)
		}
	}
	ok, suppressed := lim.allow(now.Add(perPacketInterval))
	if !ok || suppressed != 3 {
		t.Fatalf("after the interval: allowed %v, suppressed %d; want true, 3", ok, suppressed)
	}
}

// With the level disabled the logger does not even format.
func TestDeviceLoggerDisabled(t *testing.T) {
	core, logs := observer.New(zapcore.ErrorLevel)
	l := newDeviceLogger(zap.New(core), new(atomic.Uint64))
	if l.Verbosef == nil || l.Errorf == nil {
		t.Fatal("nil log functions")
	}
	l.Verbosef("x %v", panicStringer{})
	l.Errorf("x %v", panicStringer{})
	if logs.Len() != 0 {
		t.Fatalf("got %d entries below the enabled level", logs.Len())
	}
}

type panicStringer struct{}

func (panicStringer) String() string { panic("formatted a message nobody logs") }

// A device with a logger names it and passes wireguard-go's messages on.
func TestDeviceLogs(t *testing.T) {
	core, logs := observer.New(zapcore.DebugLevel)
	newNode(t, Options{PrivateKey: genKey(t), Logger: zap.New(core)})
	if logs.FilterLoggerName("wireguard").FilterMessage("UAPI: Updating private key").Len() != 1 {
		t.Errorf("no debug entry for the private key update among %d entries", logs.Len())
	}
}
