//go:build linux

package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	xproxy "golang.org/x/net/proxy"
	"golang.org/x/sys/unix"

	"github.com/sluice-vpn/sluice/pkg/admin"
)

// The lossy-path topology: two network namespaces that the test creates
// and deletes, joined by a veth that drops lossPercent % of the tunnel's
// UDP each way (nftables in G, so the loss is on the wire, between two
// unmodified sluice processes).
//
//	C (client)              c-g ──veth── g-c              G (gateway)
//	10.89.1.2                                             10.89.1.1
//	sluice connect, SOCKS5 on 127.0.0.1:1080              sluice serve, UDP 51820
//	                                                      origin on 127.0.0.1
//
// The test process plays both ends of the transfers: the proxy's client,
// from sockets made inside C, and the origin, on a socket made inside G
// that the gateway reaches through its egress (--allow opens that port
// of G's loopback, and nothing else there).
const (
	lossClient   = "10.89.1.2"
	lossGateway  = "10.89.1.1"
	lossWGPort   = 51820
	lossSOCKS    = "127.0.0.1:1080"
	lossPercent  = 2
	lossSize     = 64 << 20
	lossNftTable = "sluice_loss"
	// lossBound is how long one 64 MiB transfer may take: a completion
	// bound, far above what a transfer that recovers from loss needs.
	lossBound = 120 * time.Second
	// lossFlowsGone is how long the gateway may take to forget a flow
	// once both ends closed it (a FIN lost on the wire is sent again).
	lossFlowsGone = 15 * time.Second
)

// lossNsPrefixes name the namespaces of this file's tests, followed by
// the test process's pid.
var lossNsPrefixes = []string{"slxc-", "slxg-"}

// TestConnectUnderLoss moves 64 MiB each way through `sluice connect`'s
// SOCKS5 proxy and `sluice serve` over a path that drops 2 % of the
// tunnel's datagrams each way: both gVisor stacks must recover from the
// loss, and every flow must end with the transfers.
func TestConnectUnderLoss(t *testing.T) {
	l := startLossLab(t)

	ok := t.Run("Download", func(t *testing.T) {
		before := l.retransmits(t)
		elapsed := l.download(t, lossSize, nil)
		t.Logf("download of %d MiB at %d %% loss: %v, %.1f MB/s; gateway %s", lossSize>>20, lossPercent,
			elapsed.Round(time.Millisecond), float64(lossSize)/1e6/elapsed.Seconds(), l.retransmits(t).since(before))
	})
	// A stall stops both sluice processes for their goroutine dumps.
	ok = ok && t.Run("Upload", func(t *testing.T) {
		elapsed := l.upload(t, lossSize)
		t.Logf("upload of %d MiB at %d %% loss: %v, %.1f MB/s", lossSize>>20, lossPercent,
			elapsed.Round(time.Millisecond), float64(lossSize)/1e6/elapsed.Seconds())
	})
	if !ok {
		return
	}
	l.checkLossApplied(t)
	l.checkNoFlows(t)
}

// TestConnectHostilePeerOnPath runs a transfer over the same lossy path
// while a sender in the client's namespace throws garbage, forged
// WireGuard messages, and truncated, corrupted and replayed copies of
// the client's own datagrams at the gateway's port. The transfer must
// complete, the client's session must stay where it is, and the gateway
// must go on serving.
func TestConnectHostilePeerOnPath(t *testing.T) {
	l := startLossLab(t)
	// The client's first flow makes the handshake, after which the
	// gateway knows its endpoint.
	l.download(t, 1<<20, nil)
	endpoint := l.peerEndpoint(t)
	malformedBefore := l.metric(t, "sluice_tunnel_malformed_total")

	var got atomic.Int64
	started := make(chan struct{})
	var blast lossBlastStats
	var blastErr error
	blastDone := make(chan struct{})
	// A transfer that fails ends the test before the sender started.
	stop := make(chan struct{})
	t.Cleanup(func() { close(stop); <-blastDone })
	go func() {
		defer close(blastDone)
		select {
		case <-started:
		case <-stop:
			blastErr = errors.New("the transfer never started")
			return
		}
		blast, blastErr = l.blast(1500*time.Millisecond, 15000)
	}()
	// Transfers follow each other until the sender is done, so that
	// one is always running while it sends; under the race detector
	// both sluice processes run several times slower, and smaller ones do.
	size := lossSize
	if e2eRaceEnabled() {
		size = lossSize / 4
	}
	var once sync.Once
	progress := func(n int64) {
		if got.Add(n) >= 1<<20 {
			once.Do(func() { close(started) })
		}
	}
	transfers, start := 0, time.Now()
	for running := true; running; {
		l.download(t, size, progress)
		transfers++
		select {
		case <-blastDone:
			running = false
		default:
		}
	}
	elapsed := time.Since(start)
	if blastErr != nil {
		t.Fatalf("hostile sender: %v", blastErr)
	}
	t.Logf("%d downloads of %d MiB under attack: %v, %.1f MB/s", transfers, size>>20, elapsed.Round(time.Millisecond), float64(transfers*size)/1e6/elapsed.Seconds())
	t.Logf("hostile sender: %s", blast)
	if blast.sent == 0 || blast.captured == 0 {
		t.Fatalf("hostile sender sent %d datagrams from %d captured ones: it did not take part", blast.sent, blast.captured)
	}

	// What wireguard-go drops on shape alone, and forged handshakes,
	// are counted; some may be lost on the lossy path.
	malformed := l.metric(t, "sluice_tunnel_malformed_total") - malformedBefore
	t.Logf("gateway counted %.0f malformed datagrams; %d of those sent were malformed by shape, %d forged handshake messages", malformed, blast.shapeMalformed, blast.forgedHandshakes)
	if counted := blast.shapeMalformed + blast.forgedHandshakes; malformed < float64(counted)/2 {
		t.Errorf("gateway counted %.0f malformed datagrams, want at least half of the %d sent that it counts", malformed, counted)
	}
	if after := l.peerEndpoint(t); after != endpoint {
		t.Errorf("the client's endpoint moved from %s to %s during the attack (the attacker sent from %s)", endpoint, after, blast.from)
	}
	l.checkServing(t)
	l.checkNoFlows(t)
}

// lossLab is the topology with both sluice processes running.
type lossLab struct {
	c, g     string // namespaces
	bin      string
	stateDir string
	gw, conn *e2eProc
	api      *admin.Client
	origin   *lossOrigin
	data     []byte
	sum      [32]byte
}

func startLossLab(t *testing.T) *lossLab {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("connect under loss: needs root to create network namespaces and nftables rules; skipping")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("connect under loss: iproute2's ip command is not installed (make deps installs it); skipping")
	}
	if _, err := exec.LookPath("nft"); err != nil {
		t.Skip("connect under loss: nft from nftables is not installed (make deps installs it); skipping")
	}
	bin := e2eBuildSluice(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	lossRemoveStaleNamespaces(t, ctx)
	pid := os.Getpid()
	l := &lossLab{
		c:        fmt.Sprintf("%s%d", lossNsPrefixes[0], pid),
		g:        fmt.Sprintf("%s%d", lossNsPrefixes[1], pid),
		bin:      bin,
		stateDir: filepath.Join(t.TempDir(), "state"),
	}
	for _, ns := range []string{l.c, l.g} {
		e2eIP(t, ctx, "netns", "add", ns)
		t.Cleanup(func() {
			// Not ctx: the namespace must go even when the test ran out of time.
			if out, err := exec.Command("ip", "netns", "del", ns).CombinedOutput(); err != nil {
				t.Errorf("delete namespace %s: %v: %s", ns, err, out)
			}
		})
		e2eIP(t, ctx, "-n", ns, "link", "set", "lo", "up")
	}
	e2eIP(t, ctx, "-n", l.g, "link", "add", "g-c", "type", "veth", "peer", "name", "c-g", "netns", l.c)
	e2eIP(t, ctx, "-n", l.c, "addr", "add", lossClient+"/24", "dev", "c-g")
	e2eIP(t, ctx, "-n", l.g, "addr", "add", lossGateway+"/24", "dev", "g-c")
	veths := []struct{ ns, dev string }{{l.c, "c-g"}, {l.g, "g-c"}}
	for _, v := range veths {
		e2eIP(t, ctx, "-n", v.ns, "link", "set", v.dev, "up")
	}
	for _, v := range veths {
		e2eWaitOperUp(t, ctx, v.ns, v.dev, 5*time.Second)
	}
	l.installLoss(t, ctx)

	l.data = make([]byte, lossSize)
	var seed [32]byte
	copy(seed[:], "sluice connect under loss")
	_, _ = rand.NewChaCha8(seed).Read(l.data)
	l.sum = sha256.Sum256(l.data)
	l.origin = startLossOrigin(t, l.g, l.data)

	// The gateway's DNS forwards inside G, where nothing answers: no
	// query of this test leaves the namespaces.
	l.gw = e2eStart(t, "sluice serve", l.g, []string{"GOTRACEBACK=all"}, l.bin, "serve",
		"--state", l.stateDir,
		"--listen", fmt.Sprintf(":%d", lossWGPort),
		"--endpoint", net.JoinHostPort(lossGateway, strconv.Itoa(lossWGPort)),
		"--allow", "tcp/"+l.origin.addr.String(),
		"--dns-upstream", "127.0.0.1:53",
		"--log-level", "info")
	sock := filepath.Join(l.stateDir, "sluice.sock")
	wgeWaitControlSocket(t, l.gw, sock, 20*time.Second)
	l.api = admin.NewUnixClient(sock)

	out, stderr, _, err := wgeSluice(ctx, l.g, 15*time.Second, l.bin, "peer", "add", "lossy", "--state", l.stateDir)
	if err != nil {
		t.Fatalf("sluice peer add lossy: %v\n%s%s", err, out, stderr)
	}
	conf := filepath.Join(t.TempDir(), "lossy.conf")
	if err := os.WriteFile(conf, out, 0o600); err != nil {
		t.Fatal(err)
	}
	l.conn = e2eStart(t, "sluice connect", l.c, []string{"GOTRACEBACK=all"}, l.bin, "connect",
		"--config", conf, "--socks5", lossSOCKS, "--http-proxy", "", "--log-level", "info")
	deadline := time.Now().Add(30 * time.Second)
	for !slices.ContainsFunc(l.conn.outputLines(), func(s string) bool { return strings.HasPrefix(s, "SOCKS5 proxy:") }) {
		select {
		case <-l.conn.exited:
			t.Fatalf("sluice connect exited before serving: %v\nstdout: %q\nstderr:\n%s", l.conn.waitErr, l.conn.outputLines(), l.conn.stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("sluice connect did not print its SOCKS5 proxy in 30s: %q\nstderr:\n%s", l.conn.outputLines(), l.conn.stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	return l
}

// installLoss drops lossPercent % of the tunnel's datagrams in each
// direction, in G before anything else sees them on the way in and after
// everything else on the way out. Each rule counts what it saw and what
// it dropped. A drop on the way out is not quite loss on the wire: the
// kernel tells the gateway's sendmmsg EPERM, and the bind gives up the
// rest of that batch too (logged as "Failed to send data packets"), so
// the gateway's datagrams are lost in longer bursts than the client's.
func (l *lossLab) installLoss(t *testing.T, ctx context.Context) {
	t.Helper()
	rules := fmt.Sprintf(`table inet %[1]s {
	chain in {
		type filter hook prerouting priority -300; policy accept;
		udp dport %[2]d counter numgen random mod 100 < %[3]d counter drop
	}
	chain out {
		type filter hook postrouting priority 300; policy accept;
		udp sport %[2]d counter numgen random mod 100 < %[3]d counter drop
	}
}
`, lossNftTable, lossWGPort, lossPercent)
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", l.g, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft -f in %s: %v: %s\n%s", l.g, err, out, rules)
	}
}

var lossCounterRE = regexp.MustCompile(`counter packets (\d+) bytes (\d+) numgen random mod 100 < \d+ counter packets (\d+)`)

// lossCounters is what one of the loss rules counted.
type lossCounters struct{ packets, bytes, dropped float64 }

// counters reads the loss rules' counters: client to gateway, then
// gateway to client.
func (l *lossLab) counters(t *testing.T) [2]lossCounters {
	t.Helper()
	var c [2]lossCounters
	out, stderr, _, err := e2eRunTool(context.Background(), l.g, 10*time.Second, "nft", "list", "table", "inet", lossNftTable)
	if err != nil {
		t.Fatalf("nft list table: %v: %s", err, stderr)
	}
	m := lossCounterRE.FindAllStringSubmatch(string(out), -1)
	if len(m) != 2 {
		t.Fatalf("nft list table: want two rules with two counters each:\n%s", out)
	}
	for i := range c {
		c[i].packets, _ = strconv.ParseFloat(m[i][1], 64)
		c[i].bytes, _ = strconv.ParseFloat(m[i][2], 64)
		c[i].dropped, _ = strconv.ParseFloat(m[i][3], 64)
	}
	return c
}

var lossDirections = [2]string{"client to gateway", "gateway to client"}

// checkLossApplied checks that each rule dropped about lossPercent % of
// what it saw: the transfers really crossed a lossy path. What nftables
// sees are the kernel's packets, and a UDP GSO send (or GRO on the veth)
// is one packet of several datagrams: a drop loses the whole batch.
func (l *lossLab) checkLossApplied(t *testing.T) {
	t.Helper()
	for i, c := range l.counters(t) {
		dir := lossDirections[i]
		t.Logf("%s: %.0f packets (%.0f bytes each on average), %.0f dropped (%.2f %%)", dir, c.packets, c.bytes/max(c.packets, 1), c.dropped, 100*c.dropped/c.packets)
		// A binomial draw: five standard deviations either way.
		p := float64(lossPercent) / 100
		want, sd := c.packets*p, math.Sqrt(c.packets*p*(1-p))
		if c.packets < 1000 || c.dropped < want-5*sd || c.dropped > want+5*sd {
			t.Errorf("%s: %.0f of %.0f packets dropped, want %.0f ± %.0f of at least 1000", dir, c.dropped, c.packets, want, 5*sd)
		}
	}
}

// checkNoFlows waits until the gateway's table is empty: every flow the
// test opened has been closed by both ends.
func (l *lossLab) checkNoFlows(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(lossFlowsGone)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		n, err := l.api.CountFlows(ctx, admin.FlowFilter{})
		cancel()
		if err != nil {
			t.Fatalf("count flows: %v", err)
		}
		if n == 0 {
			return
		}
		if time.Now().After(deadline) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			flows, _ := l.api.Flows(ctx, admin.FlowFilter{})
			cancel()
			t.Fatalf("%d flows still in the gateway's table %v after the transfers ended: %+v", n, lossFlowsGone, flows)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// checkServing checks that the gateway still carries new flows, answers
// its API, and runs.
func (l *lossLab) checkServing(t *testing.T) {
	t.Helper()
	select {
	case <-l.gw.exited:
		t.Fatalf("sluice serve exited: %v", l.gw.waitErr)
	default:
	}
	l.download(t, 1<<20, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := l.api.Status(ctx); err != nil {
		t.Errorf("the gateway's status after the attack: %v", err)
	}
}

// peerEndpoint is where the gateway sends the client's datagrams.
func (l *lossLab) peerEndpoint(t *testing.T) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	peers, err := l.api.Peers(ctx)
	if err != nil {
		t.Fatalf("list peers: %v", err)
	}
	for _, p := range peers {
		if p.Name == "lossy" {
			if !strings.HasPrefix(p.Endpoint, lossClient+":") {
				t.Fatalf("peer lossy's endpoint is %q, want the client's address %s", p.Endpoint, lossClient)
			}
			return p.Endpoint
		}
	}
	t.Fatalf("no peer lossy among %+v", peers)
	return ""
}

// metrics returns the gateway's Prometheus exposition.
func (l *lossLab) metrics(t *testing.T) string {
	t.Helper()
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", filepath.Join(l.stateDir, "sluice.sock"))
		},
	}}
	defer hc.CloseIdleConnections()
	resp, err := hc.Get("http://" + admin.UnixHost + "/metrics")
	if err != nil {
		t.Fatalf("GET /metrics: %v", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %s %v", resp.Status, err)
	}
	return string(b)
}

// metric is the value of a metric without labels, or of the sample
// whose name and labels are name.
func (l *lossLab) metric(t *testing.T, name string) float64 {
	t.Helper()
	return lossSample(l.metrics(t), name)
}

func lossSample(exposition, name string) float64 {
	for line := range strings.Lines(exposition) {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err == nil {
				return f
			}
		}
	}
	return 0
}

// lossRetransmits are the gateway's TCP retransmission counters.
type lossRetransmits struct{ timeout, loss float64 }

func (l *lossLab) retransmits(t *testing.T) lossRetransmits {
	t.Helper()
	m := l.metrics(t)
	return lossRetransmits{
		timeout: lossSample(m, `sluice_tcp_retransmits_total{cause="timeout"}`),
		loss:    lossSample(m, `sluice_tcp_retransmits_total{cause="loss"}`),
	}
}

func (r lossRetransmits) since(before lossRetransmits) string {
	return fmt.Sprintf("retransmitted %.0f segments on loss and %.0f on timeouts", r.loss-before.loss, r.timeout-before.timeout)
}

// dial opens a connection to the origin through connect's SOCKS5 proxy,
// from a socket made in C.
func (l *lossLab) dial(t *testing.T) net.Conn {
	t.Helper()
	d, err := xproxy.SOCKS5("tcp", lossSOCKS, nil, lossNetnsDialer{ns: l.c})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := d.(xproxy.ContextDialer).DialContext(ctx, "tcp", l.origin.addr.String())
	if err != nil {
		l.stalled(t, "SOCKS5 CONNECT to the origin failed: %v", err)
	}
	return c
}

// download fetches size bytes from the origin and checks them; progress,
// if set, is told of every read.
func (l *lossLab) download(t *testing.T, size int, progress func(int64)) time.Duration {
	t.Helper()
	c := l.dial(t)
	defer c.Close()
	start := time.Now()
	c.SetDeadline(start.Add(lossBound))
	req := binary.BigEndian.AppendUint64([]byte{'D'}, uint64(size))
	if _, err := c.Write(req); err != nil {
		l.stalled(t, "download request: %v", err)
	}
	h := sha256.New()
	w := io.Writer(h)
	if progress != nil {
		w = lossProgressWriter{w, progress}
	}
	n, err := io.CopyBuffer(w, c, make([]byte, 256<<10))
	elapsed := time.Since(start)
	if err != nil {
		l.stalled(t, "download: %v after %d of %d bytes in %v", err, n, size, elapsed.Round(time.Millisecond))
	}
	if n != int64(size) {
		t.Fatalf("download: %d bytes, want %d", n, size)
	}
	if want := sha256.Sum256(l.data[:size]); !bytes.Equal(h.Sum(nil), want[:]) {
		t.Fatalf("download: %d bytes arrived but their SHA-256 differs from what the origin sent", n)
	}
	return elapsed
}

// upload sends size bytes to the origin, which answers with their SHA-256.
func (l *lossLab) upload(t *testing.T, size int) time.Duration {
	t.Helper()
	c := l.dial(t)
	defer c.Close()
	start := time.Now()
	c.SetDeadline(start.Add(lossBound))
	req := binary.BigEndian.AppendUint64([]byte{'U'}, uint64(size))
	if _, err := c.Write(req); err != nil {
		l.stalled(t, "upload request: %v", err)
	}
	if n, err := c.Write(l.data[:size]); err != nil {
		l.stalled(t, "upload: %v after %d of %d bytes in %v", err, n, size, time.Since(start).Round(time.Millisecond))
	}
	var sum [32]byte
	if _, err := io.ReadFull(c, sum[:]); err != nil {
		l.stalled(t, "upload: all %d bytes written, no checksum from the origin after %v: %v", size, time.Since(start).Round(time.Millisecond), err)
	}
	elapsed := time.Since(start)
	if want := sha256.Sum256(l.data[:size]); sum != want {
		t.Fatalf("upload: the origin's SHA-256 of the %d bytes differs from what was sent", size)
	}
	if got := l.origin.uploaded.Load(); got < int64(size) {
		t.Fatalf("upload: the origin counted %d bytes, want %d", got, size)
	}
	return elapsed
}

type lossProgressWriter struct {
	io.Writer
	progress func(int64)
}

func (w lossProgressWriter) Write(p []byte) (int, error) {
	n, err := w.Writer.Write(p)
	w.progress(int64(n))
	return n, err
}

// stalled fails the test on a transfer that did not complete, after
// saving both sluice processes' goroutines (SIGQUIT) to files that
// outlive the test, and logging what most of them wait for.
func (l *lossLab) stalled(t *testing.T, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	t.Logf("stalled: %s", msg)
	// Whether anything still crosses the wire tells a silent sender
	// from a receiver that ignores what it gets.
	before := l.counters(t)
	time.Sleep(5 * time.Second)
	after := l.counters(t)
	for i := range before {
		t.Logf("%s in the 5s after the stall: %.0f packets, %.0f bytes, %.0f dropped", lossDirections[i],
			after[i].packets-before[i].packets, after[i].bytes-before[i].bytes, after[i].dropped-before[i].dropped)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	flows, err := l.api.Flows(ctx, admin.FlowFilter{})
	cancel()
	t.Logf("the gateway's flows at the stall (%v): %+v", err, flows)
	if m := l.metrics(t); m != "" {
		var b strings.Builder
		for line := range strings.Lines(m) {
			if strings.HasPrefix(line, "sluice_tcp_retransmits_total") || strings.HasPrefix(line, "sluice_packets_") || strings.HasPrefix(line, "sluice_flows{") {
				b.WriteString(line)
			}
		}
		t.Logf("gateway metrics at the stall:\n%s", b.String())
	}
	for _, p := range []*e2eProc{l.gw, l.conn} {
		select {
		case <-p.exited:
			t.Logf("%s had already exited: %v", p.name, p.waitErr)
			continue
		default:
		}
		_ = p.cmd.Process.Signal(syscall.SIGQUIT)
		select {
		case <-p.exited:
		case <-time.After(10 * time.Second):
			t.Logf("%s still running 10s after SIGQUIT", p.name)
		}
		dump := p.stderr.String()
		file := filepath.Join(os.TempDir(), fmt.Sprintf("sluice-loss-%d-%s.txt", os.Getpid(), strings.ReplaceAll(p.name, " ", "-")))
		if err := os.WriteFile(file, []byte(dump), 0o644); err != nil {
			t.Logf("save %s's goroutines: %v", p.name, err)
		}
		t.Logf("%s's goroutines, saved in %s; the commonest waits:\n%s", p.name, file, lossGoroutineSummary(dump, 20))
	}
	t.Fatal(msg)
}

// lossGoroutineSummary counts a goroutine dump's goroutines by state and
// by the first frame outside the runtime, commonest first.
func lossGoroutineSummary(dump string, top int) string {
	counts := map[string]int{}
	sc := bufio.NewScanner(strings.NewReader(dump))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	state := ""
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "goroutine ") && strings.HasSuffix(line, ":") {
			_, s, _ := strings.Cut(line, "[")
			s, _, _ = strings.Cut(s, "]")
			s, _, _ = strings.Cut(s, ",")
			state = s
			continue
		}
		if state == "" || strings.HasPrefix(line, "\t") || lossWaitFrame(line) {
			continue
		}
		fn := line
		if i := strings.LastIndexByte(line, '('); i > 0 && !strings.HasPrefix(line, "created by ") {
			fn = line[:i]
		}
		counts[state+" in "+fn]++
		state = ""
	}
	keys := slices.Collect(func(yield func(string) bool) {
		for k := range counts {
			if !yield(k) {
				return
			}
		}
	})
	slices.SortFunc(keys, func(a, b string) int {
		if d := counts[b] - counts[a]; d != 0 {
			return d
		}
		return strings.Compare(a, b)
	})
	var b strings.Builder
	for i, k := range keys {
		if i == top {
			break
		}
		fmt.Fprintf(&b, "%6d  %s\n", counts[k], k)
	}
	return b.String()
}

// lossWaitFrame reports whether a line of a goroutine's stack is not a
// frame of what it waits for: a frame of how it waits (the runtime, sync),
// or no frame at all (a register, in a dump after a signal).
func lossWaitFrame(line string) bool {
	if !strings.Contains(line, "(") && !strings.HasPrefix(line, "created by ") {
		return true
	}
	for _, p := range []string{"runtime.", "internal/", "sync.", "gvisor.dev/gvisor/pkg/sync."} {
		if strings.HasPrefix(line, p) {
			return true
		}
	}
	return false
}

// lossOrigin serves the transfers inside G. A request is one byte, 'D'
// (send me N bytes) or 'U' (here are N bytes, tell me their SHA-256),
// and N as a big-endian uint64.
type lossOrigin struct {
	addr     netip.AddrPort
	ln       net.Listener
	data     []byte
	uploaded atomic.Int64

	wg    sync.WaitGroup
	mu    sync.Mutex
	conns map[net.Conn]bool
}

func startLossOrigin(t *testing.T, ns string, data []byte) *lossOrigin {
	t.Helper()
	var ln net.Listener
	err := lossInNetns(ns, func() (err error) {
		ln, err = net.Listen("tcp4", "127.0.0.1:0")
		return err
	})
	if err != nil {
		t.Fatalf("listen in %s: %v", ns, err)
	}
	o := &lossOrigin{addr: netip.MustParseAddrPort(ln.Addr().String()), ln: ln, data: data, conns: map[net.Conn]bool{}}
	o.wg.Add(1)
	go o.serve()
	t.Cleanup(func() {
		ln.Close()
		o.mu.Lock()
		for c := range o.conns {
			c.Close()
		}
		o.mu.Unlock()
		o.wg.Wait()
	})
	return o
}

func (o *lossOrigin) serve() {
	defer o.wg.Done()
	for {
		c, err := o.ln.Accept()
		if err != nil {
			return
		}
		o.mu.Lock()
		o.conns[c] = true
		o.mu.Unlock()
		o.wg.Add(1)
		go func() {
			defer o.wg.Done()
			defer func() {
				o.mu.Lock()
				delete(o.conns, c)
				o.mu.Unlock()
				c.Close()
			}()
			_ = o.handle(c)
		}()
	}
}

func (o *lossOrigin) handle(c net.Conn) error {
	c.SetDeadline(time.Now().Add(2 * lossBound))
	var req [9]byte
	if _, err := io.ReadFull(c, req[:]); err != nil {
		return err
	}
	n := binary.BigEndian.Uint64(req[1:])
	if n > uint64(len(o.data)) {
		return fmt.Errorf("%d bytes asked for, have %d", n, len(o.data))
	}
	switch req[0] {
	case 'D':
		_, err := c.Write(o.data[:n])
		return err
	case 'U':
		h := sha256.New()
		got, err := io.CopyN(h, c, int64(n))
		o.uploaded.Add(got)
		if err != nil {
			return err
		}
		if _, err := c.Write(h.Sum(nil)); err != nil {
			return err
		}
		// The client closes first, once it has the checksum.
		_, err = io.Copy(io.Discard, c)
		return err
	}
	return fmt.Errorf("request %q", req[0])
}

// lossNetnsDialer dials from sockets made inside a network namespace.
type lossNetnsDialer struct{ ns string }

func (d lossNetnsDialer) Dial(network, addr string) (net.Conn, error) {
	return d.DialContext(context.Background(), network, addr)
}

func (d lossNetnsDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := lossInNetns(d.ns, func() (err error) {
		var nd net.Dialer
		c, err = nd.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// lossInNetns runs fn on an OS thread that has joined the named network
// namespace, so that the sockets fn makes belong to it, whichever thread
// uses them later. The thread goes back to its own namespace afterwards:
// were it to end instead, the kernel would send Pdeathsig to every child
// that was started from it, sluice included.
func lossInNetns(ns string, fn func() error) error {
	target, err := os.Open(filepath.Join("/run/netns", ns))
	if err != nil {
		return err
	}
	defer target.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		own, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer own.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("setns %s: %w", ns, err)
			return
		}
		err = fn()
		if back := unix.Setns(int(own.Fd()), unix.CLONE_NEWNET); back != nil {
			// Still locked: the thread ends with this goroutine rather
			// than run others in the wrong namespace.
			errc <- errors.Join(err, fmt.Errorf("setns back from %s: %w", ns, back))
			return
		}
		runtime.UnlockOSThread()
		errc <- err
	}()
	return <-errc
}

// lossRemoveStaleNamespaces deletes namespaces left by an earlier run of
// these tests whose process died before its cleanup could run.
func lossRemoveStaleNamespaces(t *testing.T, ctx context.Context) {
	t.Helper()
	out, err := exec.CommandContext(ctx, "ip", "netns", "list").Output()
	if err != nil {
		return
	}
	for _, line := range e2eNonEmptyLines(string(out)) {
		name, _, _ := strings.Cut(line, " ")
		for _, p := range lossNsPrefixes {
			s, ok := strings.CutPrefix(name, p)
			if !ok {
				continue
			}
			if pid, err := strconv.Atoi(s); err == nil && pid != os.Getpid() && !e2eProcessAlive(pid) {
				t.Logf("deleting namespace %s left by dead test process %d", name, pid)
				_ = exec.CommandContext(ctx, "ip", "netns", "del", name).Run()
			}
		}
	}
}
