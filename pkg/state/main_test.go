package state

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// The lock and crash tests re-run this test binary as a helper process;
// these variables tell it what to do.
const (
	helperEnv    = "SLUICE_STATE_TEST_HELPER"
	helperDirEnv = "SLUICE_STATE_TEST_DIR"
)

func TestMain(m *testing.M) {
	if mode := os.Getenv(helperEnv); mode != "" {
		if err := runHelper(mode, os.Getenv(helperDirEnv)); err != nil {
			fmt.Println("error:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// runHelper is the body of a helper process. It reports on stdout.
func runHelper(mode, dir string) error {
	s, err := Open(dir)
	if err != nil {
		return err
	}
	switch mode {
	case "hold": // take the lock, keep it until stdin closes
		if _, err := s.TryLock(); err != nil {
			return err
		}
		fmt.Println("locked")
		io.Copy(io.Discard, os.Stdin)
		return nil
	case "try": // report whether the lock is free
		unlock, err := s.TryLock()
		if err != nil {
			fmt.Println("busy:", err)
			return nil
		}
		unlock()
		fmt.Println("locked")
		return nil
	case "churn": // add and remove peers as fast as possible until killed
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := s.Lock(ctx); err != nil {
			return err
		}
		for i := 0; ; i++ {
			st, err := s.Load()
			if err != nil {
				return err
			}
			if _, err := st.AddPeer(Peer{Name: fmt.Sprintf("churn-%d-%d", os.Getpid(), i), PublicKey: randomKey()}); err != nil {
				return err
			}
			if len(st.Peers) > 20 {
				st.RemovePeer(st.Peers[1].Name)
			}
			if err := s.Save(st); err != nil {
				return err
			}
			if i == 0 {
				fmt.Println("ready")
			}
		}
	}
	return fmt.Errorf("unknown helper mode %q", mode)
}

// helper is a running helper process.
type helper struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Reader
}

// startHelper starts this binary as a helper in mode on dir.
func startHelper(t *testing.T, mode, dir string) *helper {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"="+mode, helperDirEnv+"="+dir)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	h := &helper{cmd: cmd, stdin: stdin, out: bufio.NewReader(stdout)}
	t.Cleanup(func() {
		stdin.Close()
		cmd.Process.Kill()
		cmd.Wait()
	})
	return h
}

// line returns the helper's next line of output.
func (h *helper) line(t *testing.T) string {
	t.Helper()
	s, err := h.out.ReadString('\n')
	if err != nil {
		t.Fatalf("helper pid %d: reading its output: %v (got %q)", h.cmd.Process.Pid, err, s)
	}
	return strings.TrimSpace(s)
}

// randomKey returns a random key in WireGuard's text form.
func randomKey() string {
	var b [32]byte
	rand.Read(b[:])
	return base64.StdEncoding.EncodeToString(b[:])
}
