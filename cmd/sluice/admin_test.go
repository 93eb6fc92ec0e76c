package main

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/sluice-vpn/sluice/pkg/admin"
	"github.com/sluice-vpn/sluice/pkg/service"
)

// TestCLIOverAdminTCP runs the commands that steer a gateway against its
// loopback admin listener, which wants the token from the state
// directory; without it, they are refused and say why.
func TestCLIOverAdminTCP(t *testing.T) {
	dir := t.TempDir()
	udp, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := udp.LocalAddr().(*net.UDPAddr).Port
	udp.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	svc, err := service.New(context.Background(), service.Options{
		StateDir: dir, ListenPort: port, Endpoint: "127.0.0.1:1", FirstPeer: "-",
		Admin: addr, ShutdownGrace: 100 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- svc.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})

	run := func(env string, args ...string) (string, error) {
		t.Helper()
		t.Setenv(tokenEnv, env)
		rctx, rcancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer rcancel()
		errc, stdout, stderr := ctRun(rctx, args...)
		err := <-errc
		return stdout.String() + stderr.String(), err
	}
	// The API may take a moment to come up.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := run("", "status", "--admin", addr, "--state", dir); err == nil {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("status over TCP with the state's token: %v", err)
		}
	}
	for _, args := range [][]string{
		{"status", "-o", "json"},
		{"flows"},
		{"flows", "--count"},
		{"flows", "delete", "--all"},
		{"peer", "add", "laptop"},
		{"peer", "list"},
		{"peer", "remove", "laptop"},
	} {
		args = append(args, "--admin", addr, "--state", dir)
		if out, err := run("", args...); err != nil {
			t.Errorf("sluice %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}

	// Without the state directory, the token must be given.
	other := t.TempDir()
	if _, err := run("", "status", "--admin", addr, "--state", other); err == nil || !strings.Contains(err.Error(), "--admin-token") {
		t.Errorf("status without a token: %v, want it to ask for --admin-token", err)
	}
	if _, err := run("", "status", "--admin", addr, "--state", other, "--admin-token", strings.Repeat("x", 43)); err == nil || !strings.Contains(err.Error(), "unauthorized") {
		t.Errorf("status with a wrong token: %v, want unauthorized", err)
	}
	tok, err := admin.ReadTokenFile(svc.TokenPath())
	if err != nil {
		t.Fatal(err)
	}
	if out, err := run(tok, "status", "--admin", addr, "--state", other); err != nil {
		t.Errorf("status with $%s: %v\n%s", tokenEnv, err, out)
	}
	if out, err := run("", "status", "--admin", addr, "--state", other, "--admin-token", tok); err != nil {
		t.Errorf("status with --admin-token: %v\n%s", err, out)
	}
}
