package service

import (
	"context"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluice-vpn/sluice/pkg/admin"
)

// fileLimitChild marks the process that TestAdminAtFileLimit runs in with
// a low open file limit: only there is the limit lowered, never in the
// process that runs the other tests.
const fileLimitChild = "SLUICE_TEST_FILE_LIMIT_CHILD"

// TestAdminAtFileLimit fills a gateway's open file limit with flows and
// then steers it over the admin API, as an operator at the limit must:
// the last descriptors are kept for that, and new flows are refused as
// "file_limit" instead.
func TestAdminAtFileLimit(t *testing.T) {
	if os.Getenv(fileLimitChild) == "1" {
		adminAtFileLimit(t)
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestAdminAtFileLimit$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), fileLimitChild+"=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("the test process with a low file limit failed: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "--- PASS: TestAdminAtFileLimit") {
		t.Fatalf("the test process with a low file limit did not run the test:\n%s", out)
	}
}

func adminAtFileLimit(t *testing.T) {
	r := startRunning(t, nil)
	// A listener that never accepts: each flow to it holds exactly one
	// descriptor, its egress socket (the kernel keeps the other end in
	// the backlog).
	sink, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()

	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("cannot count open descriptors: %v", err)
	}
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	// Room for 30 flows besides the reserve (64 by default).
	lim.Cur = uint64(len(ents) + 64 + 30)
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d descriptors open, limit lowered to %d", len(ents), lim.Cur)

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	refused := false
	for range 200 {
		dctx, dcancel := context.WithTimeout(ctx, 5*time.Second)
		c, err := r.client.DialContext(dctx, "tcp", sink.Addr().String())
		dcancel()
		if err != nil {
			t.Logf("flow %d refused: %v", len(conns)+1, err)
			refused = true
			break
		}
		conns = append(conns, c)
	}
	if !refused || len(conns) == 0 {
		t.Fatalf("%d flows opened, refused %v: want some, then a refusal", len(conns), refused)
	}

	// The operator's view and hand, at the limit, over loopback TCP:
	// each call needs a descriptor for the accepted connection.
	flows, err := r.tcp.Flows(ctx, admin.FlowFilter{Proto: "tcp"})
	if err != nil {
		t.Fatalf("listing flows at the file limit: %v", err)
	}
	if len(flows) < len(conns) {
		t.Errorf("%d flows listed, %d open", len(flows), len(conns))
	}
	value := scrape(t, r.tcpURL+"/metrics", readToken(t, r.svc))
	if v := value("sluice_flows_refused_total", map[string]string{"reason": "file_limit"}); v < 1 {
		t.Errorf("file_limit refusals %v, want at least 1", v)
	}
	n, err := r.tcp.DeleteFlows(ctx, admin.FlowFilter{Proto: "tcp"}, false)
	if err != nil || n < len(conns) {
		t.Fatalf("flows delete at the file limit: %d deleted, %v", n, err)
	}
	// With the flows gone, so are their descriptors: a new flow opens.
	deadline := time.Now().Add(10 * time.Second)
	for {
		dctx, dcancel := context.WithTimeout(ctx, 5*time.Second)
		c, err := r.client.DialContext(dctx, "tcp", sink.Addr().String())
		dcancel()
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no flow opens after the delete: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
