package service

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-vpn/sluice/pkg/state"
	"github.com/sluice-vpn/sluice/tunnel/wireguard"
)

// The kill test re-runs this test binary as a writer that adds peers the
// way `sluice peer add` does with the gateway stopped, and kills it with
// SIGKILL at random moments. These tell the writer what to do.
const (
	killWriterEnv = "SLUICE_KILL_TEST_WRITER" // the state directory
	killRoundEnv  = "SLUICE_KILL_TEST_ROUND"
)

// TestKillWriter is the writer's body when the environment asks for it;
// otherwise it skips. It adds peers round-N-0, round-N-1, ... through
// AddPeer until killed, printing "ack NAME" once AddPeer has returned for
// NAME: the moment the CLI would print the peer's configuration.
func TestKillWriter(t *testing.T) {
	dir := os.Getenv(killWriterEnv)
	if dir == "" {
		t.Skip("the helper process of TestKillDuringPeerWrites")
	}
	round := os.Getenv(killRoundEnv)
	out := bufio.NewWriter(os.Stdout)
	for i := 0; ; i++ {
		name := fmt.Sprintf("r%s-%d", round, i)
		if _, err := AddPeer(context.Background(), dir, PeerRequest{Name: name, Endpoint: "vpn.example.com:51820"}); err != nil {
			fmt.Fprintf(out, "error %s: %v\n", name, err)
			out.Flush()
			os.Exit(3)
		}
		fmt.Fprintf(out, "ack %s\n", name)
		out.Flush()
	}
}

// TestKillDuringPeerWrites kills a process that is adding peers with
// SIGKILL at random moments, 200 times under `make soak` (SOAK_DURATION
// set) and 50 in `make test`, and checks after each kill that state.json loads and holds
// every peer whose addition was acknowledged, and the key it started with.
func TestKillDuringPeerWrites(t *testing.T) {
	if os.Getenv(killWriterEnv) != "" {
		t.Skip("in the helper process")
	}
	rounds := 50
	if os.Getenv("SOAK_DURATION") != "" {
		rounds = 200
	}
	dir := t.TempDir()
	store, err := state.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	unlock, err := store.TryLock()
	if err != nil {
		t.Fatal(err)
	}
	key, err := wireguard.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	st, err := state.New(key.String(), state.DefaultPools)
	if err != nil {
		t.Fatal(err)
	}
	if err := store.Save(st); err != nil {
		t.Fatal(err)
	}
	unlock()

	acked := map[string]bool{}
	var killedAfter []int // acks seen in each round before the kill
	began := time.Now()
	for round := range rounds {
		cmd := exec.Command(os.Args[0], "-test.run=^TestKillWriter$", "-test.count=1")
		cmd.Env = append(os.Environ(), killWriterEnv+"="+dir, fmt.Sprintf("%s=%d", killRoundEnv, round))
		cmd.Stderr = os.Stderr
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		lines := make(chan string, 1024)
		go func() {
			defer close(lines)
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				lines <- sc.Text()
			}
		}()
		// Kill after a random number of acknowledged writes (0 to 4)
		// and then a random delay of up to 3 ms: mid-write, most times.
		want := rand.IntN(5)
		n := 0
		timeout := time.After(30 * time.Second)
	wait:
		for n < want {
			select {
			case l, ok := <-lines:
				if !ok {
					break wait
				}
				n += record(t, acked, l)
			case <-timeout:
				t.Fatalf("round %d: the writer acknowledged %d writes in 30 s", round, n)
			}
		}
		time.Sleep(time.Duration(rand.IntN(3000)) * time.Microsecond)
		cmd.Process.Signal(syscall.SIGKILL)
		for l := range lines {
			n += record(t, acked, l)
		}
		err = cmd.Wait()
		if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
			t.Fatalf("round %d: the writer ended on its own (%v) before it was killed", round, err)
		}
		killedAfter = append(killedAfter, n)

		loaded, err := store.Load()
		if err != nil {
			t.Fatalf("round %d: after SIGKILL, state.json does not load: %v", round, err)
		}
		if loaded.PrivateKey != st.PrivateKey {
			t.Fatalf("round %d: the private key changed", round)
		}
		have := map[string]bool{}
		for _, p := range loaded.Peers {
			have[p.Name] = true
		}
		for name := range acked {
			if !have[name] {
				t.Fatalf("round %d: peer %s was acknowledged but is not in state.json (%d peers)", round, name, len(loaded.Peers))
			}
		}
		// The lock died with the writer.
		unlock, err := store.TryLock()
		if err != nil {
			t.Fatalf("round %d: the state is still locked after the writer was killed: %v", round, err)
		}
		unlock()
	}
	loaded, _ := store.Load()
	t.Logf("%d SIGKILLs in %v; %d peers acknowledged, %d in state.json; acknowledged writes per round: %v",
		rounds, time.Since(began).Round(time.Millisecond), len(acked), len(loaded.Peers), killedAfter)
}

// record notes one line of the writer's output; it returns 1 for an
// acknowledgement.
func record(t *testing.T, acked map[string]bool, line string) int {
	t.Helper()
	if name, ok := strings.CutPrefix(line, "ack "); ok {
		acked[name] = true
		return 1
	}
	if strings.HasPrefix(line, "error ") {
		t.Fatalf("the writer failed: %s", line)
	}
	return 0
}
