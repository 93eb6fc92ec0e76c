//go:build linux

package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/sluice-vpn/sluice/pkg/admin"
)

// The end-to-end topology: three network namespaces that this test creates
// and deletes, so every packet stays inside them.
//
//	C (client)   c-g ──veth── g-c   G (sluice)   g-s ──veth── s-g   S (server)
//	10.77.1.2                 10.77.1.1          10.77.2.1          10.77.2.2
//	fd77:1::2                 fd77:1::1          fd77:2::1          fd77:2::2
//
// G sends everything that arrives from C into sluice's TUN (policy routing),
// and S has no route back to C: a reply can only reach C if sluice
// terminated the flow and re-dialled it from G's own address.
const (
	e2eTUN          = "sluice0"
	e2eTable        = "100"
	e2eEgressLo     = 40000
	e2eEgressHi     = 40099
	e2eHTTPPort     = 80
	e2eDeniedPort   = 81 // sluice runs with --deny SERVER:81; S listens there anyway
	e2eClosedPort   = 9  // nothing listens there in S
	e2eUDPEchoPort  = 7
	e2eBlobSize     = 1 << 20
	e2eHelperEnv    = "SLUICE_E2E_HELPER"
	e2eRefuseWithin = 3 * time.Second  // "quickly": far below TCP's SYN retry timeout
	e2eAdminAddr    = "127.0.0.1:9090" // sluice's --admin, inside G's namespace
)

// e2eFamily holds one address family's addresses in the topology.
type e2eFamily struct {
	name     string
	bits     int
	client   netip.Addr // C's address on c-g
	gwClient netip.Addr // G's address on g-c, C's default gateway
	gwServer netip.Addr // G's address on g-s, sluice's egress address
	server   netip.Addr // S's address on s-g
}

func e2eFamilies() []e2eFamily {
	return []e2eFamily{
		{
			name:     "ipv4",
			bits:     24,
			client:   netip.MustParseAddr("10.77.1.2"),
			gwClient: netip.MustParseAddr("10.77.1.1"),
			gwServer: netip.MustParseAddr("10.77.2.1"),
			server:   netip.MustParseAddr("10.77.2.2"),
		},
		{
			name:     "ipv6",
			bits:     64,
			client:   netip.MustParseAddr("fd77:1::2"),
			gwClient: netip.MustParseAddr("fd77:1::1"),
			gwServer: netip.MustParseAddr("fd77:2::1"),
			server:   netip.MustParseAddr("fd77:2::2"),
		},
	}
}

func (f e2eFamily) prefix(a netip.Addr) string { return netip.PrefixFrom(a, f.bits).String() }

// serverNet is S's network, the one sluice is told to allow.
func (f e2eFamily) serverNet() string { return netip.PrefixFrom(f.server, f.bits).Masked().String() }

// TestServeTUNEndToEnd runs `sluice serve --tun` in a gateway namespace
// between a client and a server namespace and checks that TCP, UDP and ping
// from the client reach the server only through sluice's egress sockets,
// and that refusals come back the way a real network gives them. The
// operator's side works as in WireGuard mode: sluice flows, status and
// flows delete through the state directory's control socket, /metrics,
// reload, and the admin API on --admin.
func TestServeTUNEndToEnd(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("serve --tun end-to-end: needs root to create network namespaces and a TUN device; skipping")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("serve --tun end-to-end: iproute2's ip command is not installed; skipping")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skipf("serve --tun end-to-end: /dev/net/tun is missing (%v); the kernel TUN driver is needed; skipping", err)
	}

	bin := e2eBuildSluice(t)

	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Second)
	t.Cleanup(cancel)

	topo := newE2ETopology(t, ctx)
	fams := e2eFamilies()
	stateDir := filepath.Join(t.TempDir(), "state")
	sock := filepath.Join(stateDir, "sluice.sock")

	args := []string{"serve", "--tun", e2eTUN, "--egress-ports", fmt.Sprintf("%d-%d", e2eEgressLo, e2eEgressHi), "--log-level", "debug",
		"--state", stateDir, "--admin", e2eAdminAddr}
	for _, f := range fams {
		args = append(args,
			"--egress-addr", f.gwServer.String(),
			"--allow", f.serverNet(),
			// No protocol: TCP and UDP to this port are both denied.
			"--deny", netip.AddrPortFrom(f.server, e2eDeniedPort).String())
	}
	gw := e2eStartSluice(t, topo.g, bin, args...)
	gw.waitUp(t, ctx, topo.g, e2eTUN, 20*time.Second)
	wgeWaitControlSocket(t, gw, sock, 20*time.Second)
	topo.routeIntoTUN(t, ctx, e2eTUN)

	var tcpListen, udpListen []string
	for _, f := range fams {
		tcpListen = append(tcpListen,
			netip.AddrPortFrom(f.server, e2eHTTPPort).String(),
			netip.AddrPortFrom(f.server, e2eDeniedPort).String())
		udpListen = append(udpListen,
			netip.AddrPortFrom(f.server, e2eUDPEchoPort).String(),
			netip.AddrPortFrom(f.server, e2eDeniedPort).String())
	}
	httpSrv := e2eStartHelper(t, topo.s, "http-server", tcpListen...)
	udpSrv := e2eStartHelper(t, topo.s, "udp-echo-server", udpListen...)
	httpSrv.waitReady(t, 10*time.Second)
	udpSrv.waitReady(t, 10*time.Second)

	wantSum := sha256.Sum256(e2eBlob())
	wantHash := hex.EncodeToString(wantSum[:])

	for _, f := range fams {
		t.Run(f.name, func(t *testing.T) {
			t.Run("HTTPGet1MiB", func(t *testing.T) {
				url := "http://" + netip.AddrPortFrom(f.server, e2eHTTPPort).String() + "/blob"
				out := e2eRunHelper(t, ctx, topo.c, 20*time.Second, "http-get", url, "3")
				lines := e2eNonEmptyLines(out)
				if len(lines) != 3 {
					t.Fatalf("http-get printed %d results, want 3:\n%s", len(lines), out)
				}
				want := fmt.Sprintf("status=200 bytes=%d sha256=%s", e2eBlobSize, wantHash)
				for _, l := range lines {
					got, elapsed, _ := strings.Cut(l, " elapsed=")
					if got != want {
						t.Errorf("GET %s: got %q, want %q", url, got, want)
					}
					t.Logf("GET %s took %s", url, elapsed)
				}
				httpSrv.waitPeers(t, f.gwServer, 3, 5*time.Second)
			})

			t.Run("CurlGet1MiB", func(t *testing.T) {
				curl := e2eLookTool(t, "curl")
				url := "http://" + netip.AddrPortFrom(f.server, e2eHTTPPort).String() + "/blob"
				// -g: the brackets of an IPv6 URL are not a glob.
				body, stderr, _, err := e2eRunTool(ctx, topo.c, 20*time.Second, curl, "-sS", "-g", "--fail", "--max-time", "15", url)
				if err != nil {
					t.Fatalf("curl %s: %v: %s", url, err, stderr)
				}
				sum := sha256.Sum256(body)
				if len(body) != e2eBlobSize || hex.EncodeToString(sum[:]) != wantHash {
					t.Errorf("curl %s: %d bytes with sha256 %x, want %d bytes with sha256 %s", url, len(body), sum, e2eBlobSize, wantHash)
				}
			})

			t.Run("CurlDeniedUnreachable", func(t *testing.T) {
				curl := e2eLookTool(t, "curl")
				url := "http://" + netip.AddrPortFrom(f.server, e2eDeniedPort).String() + "/blob"
				body, stderr, elapsed, err := e2eRunTool(ctx, topo.c, 20*time.Second, curl, "-sS", "-v", "-g", "--fail", "--max-time", "8", url)
				if err == nil {
					t.Fatalf("curl %s (denied by policy, yet S serves there) succeeded with %d bytes", url, len(body))
				}
				// Linux reports ICMPv6 "administratively prohibited" as
				// EACCES, "Permission denied".
				msg := string(stderr)
				if !strings.Contains(msg, "No route to host") && !strings.Contains(msg, "Network is unreachable") &&
					!strings.Contains(msg, "prohibited") && !strings.Contains(msg, "Permission denied") {
					t.Errorf("curl %s: %v: %s; want an ICMP unreachable: No route to host, Network is unreachable, prohibited or (IPv6) Permission denied", url, err, msg)
				}
				if elapsed > e2eRefuseWithin {
					t.Errorf("curl %s: refused after %v, want within %v", url, elapsed, e2eRefuseWithin)
				}
			})

			t.Run("UDPEcho", func(t *testing.T) {
				dst := netip.AddrPortFrom(f.server, e2eUDPEchoPort).String()
				out := e2eRunHelper(t, ctx, topo.c, 15*time.Second, "udp-echo", dst)
				if got, want := strings.TrimSpace(out), "echo from "+dst; got != want {
					t.Errorf("udp-echo %s: got %q, want %q", dst, got, want)
				}
				udpSrv.waitPeers(t, f.gwServer, 1, 5*time.Second)
			})

			t.Run("Ping", func(t *testing.T) {
				out := e2eRunHelper(t, ctx, topo.c, 15*time.Second, "ping", f.server.String(), "3")
				if got, want := strings.TrimSpace(out), "replies=3"; got != want {
					t.Errorf("ping %s: got %q, want %q", f.server, got, want)
				}
			})

			t.Run("SystemPing", func(t *testing.T) {
				ping := e2eLookTool(t, "ping")
				fam := "-4"
				if f.server.Is6() {
					fam = "-6"
				}
				out, stderr, _, err := e2eRunTool(ctx, topo.c, 15*time.Second, ping, fam, "-n", "-c", "3", "-i", "0.2", "-W", "2", f.server.String())
				if err != nil {
					t.Fatalf("ping %s: %v\n%s%s", f.server, err, out, stderr)
				}
				if !strings.Contains(string(out), "3 packets transmitted, 3 received") {
					t.Errorf("ping %s: want 3 replies of 3:\n%s", f.server, out)
				}
			})

			t.Run("TCPClosedPortRefused", func(t *testing.T) {
				dst := netip.AddrPortFrom(f.server, e2eClosedPort).String()
				out := e2eRunHelper(t, ctx, topo.c, 15*time.Second, "tcp-dial", dst)
				res := e2eParseDial(t, out)
				if res.errno != "ECONNREFUSED" {
					t.Errorf("dial %s (nothing listens): got %s, want ECONNREFUSED (a RST)", dst, out)
				}
				if res.elapsed > e2eRefuseWithin {
					t.Errorf("dial %s: refused after %v, want within %v", dst, res.elapsed, e2eRefuseWithin)
				}
			})

			t.Run("TCPDeniedUnreachable", func(t *testing.T) {
				dst := netip.AddrPortFrom(f.server, e2eDeniedPort).String()
				out := e2eRunHelper(t, ctx, topo.c, 15*time.Second, "tcp-dial", dst)
				res := e2eParseDial(t, out)
				if !e2eICMPErrno(res.errno) {
					t.Errorf("dial %s (denied by policy, yet S listens there): got %s, want an ICMP unreachable (EHOSTUNREACH, ENETUNREACH or EACCES)", dst, out)
				}
				if res.elapsed > e2eRefuseWithin {
					t.Errorf("dial %s: refused after %v, want within %v", dst, res.elapsed, e2eRefuseWithin)
				}
			})

			t.Run("FlowListedAndDeleted", func(t *testing.T) {
				e2eFlowListedAndDeleted(t, ctx, topo, bin, stateDir, f)
			})

			t.Run("UDPDeniedUnreachable", func(t *testing.T) {
				dst := netip.AddrPortFrom(f.server, e2eDeniedPort).String()
				out := e2eRunHelper(t, ctx, topo.c, 15*time.Second, "udp-refused", dst)
				res := e2eParseDial(t, out)
				if !e2eICMPErrno(res.errno) {
					t.Errorf("udp to %s (denied by policy, yet S echoes there): got %s, want an ICMP unreachable (EHOSTUNREACH, ENETUNREACH or EACCES)", dst, out)
				}
			})
		})
	}

	// Every flow S saw must come from sluice's egress sockets: G's address
	// on S's side and a port of the configured slice, never C's address.
	t.Run("ServerSawOnlyEgress", func(t *testing.T) {
		want := map[netip.Addr]bool{}
		for _, f := range fams {
			want[f.gwServer] = true
		}
		for _, srv := range []*e2eProc{httpSrv, udpSrv} {
			peers := srv.peers()
			if len(peers) == 0 {
				t.Errorf("%s recorded no peers", srv.name)
			}
			for _, p := range peers {
				if !want[p.Addr()] {
					t.Errorf("%s saw peer %s, want one of sluice's egress addresses %v", srv.name, p, e2eKeys(want))
				}
				if p.Port() < e2eEgressLo || p.Port() > e2eEgressHi {
					t.Errorf("%s saw peer %s, want a source port in %d-%d", srv.name, p, e2eEgressLo, e2eEgressHi)
				}
			}
			t.Logf("%s saw %d peers: %v", srv.name, len(peers), peers)
			for _, f := range srv.flows() {
				if f.local.Port() == e2eDeniedPort {
					t.Errorf("%s got a flow %s -> %s on a port the policy denies", srv.name, f.remote, f.local)
				}
			}
		}
	})

	t.Run("AdminAPI", func(t *testing.T) {
		e2eAdminAPI(t, ctx, topo, bin, sock)
	})

	t.Run("SIGTERMExitsCleanly", func(t *testing.T) {
		if err := gw.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatalf("signal sluice: %v", err)
		}
		select {
		case <-gw.exited:
		case <-time.After(10 * time.Second):
			t.Fatal("sluice still running 10s after SIGTERM")
		}
		if gw.waitErr != nil {
			t.Errorf("sluice after SIGTERM: %v, want exit status 0", gw.waitErr)
		}
		if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("control socket %s after exit: %v, want it removed", sock, err)
		}
	})
}

// e2eFlowListedAndDeleted opens a TCP connection from C that carries the
// 1 MiB blob and stays open (HTTP keep-alive); sluice flows lists it with
// its bytes, sluice status counts it, and sluice flows delete closes the
// client's connection.
func e2eFlowListedAndDeleted(t *testing.T, ctx context.Context, topo *e2eTopology, bin, stateDir string, f e2eFamily) {
	server := netip.AddrPortFrom(f.server, e2eHTTPPort)
	hold := e2eStartHelper(t, topo.c, "tcp-hold", server.String(), "15s")
	hold.waitReady(t, 15*time.Second)
	var client netip.AddrPort
	for _, l := range hold.outputLines() {
		if s, ok := strings.CutPrefix(l, "local "); ok {
			a, _, _ := strings.Cut(s, " ")
			if ap, err := netip.ParseAddrPort(a); err == nil {
				client = e2eUnmapPort(ap)
			}
		}
	}
	if client.Addr() != f.client {
		t.Fatalf("tcp-hold reported its address as %v (output %q), want one of %s", client, hold.outputLines(), f.client)
	}

	filter := []string{"--state", stateDir, "-p", "tcp", "--dest", f.server.String(), "--port", strconv.Itoa(e2eHTTPPort)}
	flow, ok := e2eFindFlow(t, ctx, topo, bin, filter, client)
	if !ok {
		t.Fatalf("sluice flows does not list the open connection from %s to %s", client, server)
	}
	if flow.Dest != server || flow.ReplyBytes < e2eBlobSize || flow.OrigBytes == 0 || flow.Peer != "" {
		t.Errorf("flow %+v: want destination %s, no peer, a request sent and at least %d bytes received", flow, server, e2eBlobSize)
	}
	table, stderr, _, err := wgeSluice(ctx, topo.g, 10*time.Second, bin, append([]string{"flows"}, filter...)...)
	if err != nil {
		t.Fatalf("sluice flows: %v: %s", err, stderr)
	}
	if !strings.Contains(string(table), client.String()) || !strings.Contains(string(table), server.String()) {
		t.Errorf("sluice flows' table lacks the flow %s -> %s:\n%s", client, server, table)
	}

	out, stderr, _, err := wgeSluice(ctx, topo.g, 10*time.Second, bin, "status", "--state", stateDir, "-o", "json")
	if err != nil {
		t.Fatalf("sluice status -o json: %v: %s", err, stderr)
	}
	var st admin.Status
	if err := json.Unmarshal(out, &st); err != nil {
		t.Fatalf("sluice status -o json: %v\n%s", err, out)
	}
	if st.Mode != "tun" || st.Device != e2eTUN || st.Flows < 1 || len(st.Peers) != 0 || st.PublicKey != "" {
		t.Errorf("sluice status -o json: %s; want mode tun, device %s, at least 1 flow, no peers, no key", out, e2eTUN)
	}
	out, stderr, _, err = wgeSluice(ctx, topo.g, 10*time.Second, bin, "status", "--state", stateDir)
	if err != nil {
		t.Fatalf("sluice status: %v: %s", err, stderr)
	}
	if !strings.Contains(string(out), "mode: tun") || !strings.Contains(string(out), "device: "+e2eTUN) {
		t.Errorf("sluice status does not show the mode and the device:\n%s", out)
	}

	// The connection is idle and open: only the deletion can end it.
	select {
	case <-hold.exited:
		t.Fatalf("the held connection ended before the flow was deleted: %q", hold.outputLines())
	default:
	}
	start := time.Now()
	out, stderr, _, err = wgeSluice(ctx, topo.g, 10*time.Second, bin, "flows", "delete", strconv.FormatUint(flow.ID, 10), "--state", stateDir)
	if err != nil || strings.TrimSpace(string(out)) != "deleted 1 flows" {
		t.Fatalf("sluice flows delete %d: %q %v: %s", flow.ID, out, err, stderr)
	}
	select {
	case <-hold.exited:
	case <-time.After(10 * time.Second):
		t.Fatal("the client's connection still open 10s after its flow was deleted")
	}
	lines := hold.outputLines()
	last := ""
	if len(lines) > 0 {
		last = lines[len(lines)-1]
	}
	t.Logf("the client saw its connection end (%s) %v after sluice flows delete began", last, time.Since(start).Round(time.Millisecond))
	if hold.waitErr != nil || !strings.HasPrefix(last, "closed ") || strings.Contains(last, "timeout") {
		t.Errorf("tcp-hold after the deletion: %q, %v; want the connection closed (EOF or a reset), not a timeout", lines, hold.waitErr)
	}
	if _, ok := e2eFindFlow(t, ctx, topo, bin, filter, client); ok {
		t.Errorf("sluice flows still lists the deleted flow %d", flow.ID)
	}
}

// e2eFindFlow runs sluice flows -o json with args and returns the flow
// from client.
func e2eFindFlow(t *testing.T, ctx context.Context, topo *e2eTopology, bin string, args []string, client netip.AddrPort) (admin.FlowInfo, bool) {
	t.Helper()
	out, stderr, _, err := wgeSluice(ctx, topo.g, 10*time.Second, bin, append([]string{"flows", "-o", "json"}, args...)...)
	if err != nil {
		t.Fatalf("sluice flows -o json: %v: %s", err, stderr)
	}
	var flows []admin.FlowInfo
	if err := json.Unmarshal(out, &flows); err != nil {
		t.Fatalf("sluice flows -o json: %v\n%s", err, out)
	}
	for _, fl := range flows {
		if e2eUnmapPort(fl.Client) == client {
			return fl, true
		}
	}
	return admin.FlowInfo{}, false
}

// e2eAdminAPI checks the rest of the admin API of the TUN gateway:
// metrics, health, the configuration and its reload over the control
// socket, and status over --admin inside G.
func e2eAdminAPI(t *testing.T, ctx context.Context, topo *e2eTopology, bin, sock string) {
	hc := &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		}},
	}
	defer hc.CloseIdleConnections()
	get := func(path string) (int, []byte) {
		t.Helper()
		resp, err := hc.Get("http://sluice" + path)
		if err != nil {
			t.Fatalf("GET %s on %s: %v", path, sock, err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		return resp.StatusCode, body
	}

	code, body := get("/metrics")
	if code != http.StatusOK {
		t.Fatalf("GET /metrics: %d %s", code, body)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		t.Fatalf("/metrics: %v", err)
	}
	created := 0.0
	if mf, ok := families["sluice_flows_created_total"]; ok {
		for _, m := range mf.GetMetric() {
			created += m.GetCounter().GetValue()
		}
	}
	if created <= 0 {
		t.Errorf("/metrics: sluice_flows_created_total is %v, want more than 0 after the flows above", created)
	}
	for _, path := range []string{"/healthz", "/readyz"} {
		if code, body := get(path); code != http.StatusOK {
			t.Errorf("GET %s: %d %s", path, code, body)
		}
	}
	if code, body := get("/v1/config"); code != http.StatusOK || !strings.Contains(string(body), e2eTUN) {
		t.Errorf("GET /v1/config: %d, want the running configuration, which names %s:\n%s", code, e2eTUN, body)
	}
	c := admin.NewUnixClient(sock)
	if err := c.Reload(ctx); err != nil {
		t.Errorf("POST /v1/reload: %v", err)
	}
	if _, err := c.Peers(ctx); err == nil || !strings.Contains(err.Error(), "TUN") {
		t.Errorf("GET /v1/peers of a TUN gateway: %v, want an error that says TUN mode has no peers", err)
	}

	// The TCP listener wants the token that the state directory holds.
	out, stderr, _, err := wgeSluice(ctx, topo.g, 10*time.Second, bin, "status", "--admin", e2eAdminAddr, "--state", filepath.Dir(sock), "-o", "json")
	if err != nil {
		t.Fatalf("sluice status --admin %s: %v: %s", e2eAdminAddr, err, stderr)
	}
	var st admin.Status
	if err := json.Unmarshal(out, &st); err != nil || st.Mode != "tun" || st.Device != e2eTUN {
		t.Errorf("sluice status --admin %s -o json: %v\n%s", e2eAdminAddr, err, out)
	}
}

// e2eKeys lists m's addresses for messages.
func e2eKeys(m map[netip.Addr]bool) []netip.Addr {
	var out []netip.Addr
	for a := range m {
		out = append(out, a)
	}
	return out
}

// e2eICMPErrno reports whether errno is what Linux gives a socket for an
// ICMP destination-unreachable error (net, host, prohibited codes).
func e2eICMPErrno(errno string) bool {
	switch errno {
	case "EHOSTUNREACH", "ENETUNREACH", "EACCES":
		return true
	}
	return false
}

// e2eBlob is what the HTTP server serves: deterministic, incompressible.
func e2eBlob() []byte {
	b := make([]byte, e2eBlobSize)
	var seed [32]byte
	copy(seed[:], "sluice serve --tun e2e blob")
	r := rand.NewChaCha8(seed)
	_, _ = r.Read(b)
	return b
}

// e2eBuildSluice builds the sluice binary once for the test, with the race
// detector when the test itself has it, so the build shares the test's
// cached packages and the gateway is race-checked end to end.
func e2eBuildSluice(t *testing.T) string {
	t.Helper()
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("serve --tun end-to-end: the go command is not in PATH to build sluice; skipping")
	}
	bin := filepath.Join(t.TempDir(), "sluice")
	args := []string{"build", "-o", bin}
	if e2eRaceEnabled() {
		args = append(args, "-race")
	}
	args = append(args, "github.com/sluice-vpn/sluice/cmd/sluice")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	start := time.Now()
	out, err := exec.CommandContext(ctx, goTool, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("go %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	t.Logf("built sluice in %v", time.Since(start).Round(time.Millisecond))
	return bin
}

func e2eRaceEnabled() bool {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return false
	}
	for _, s := range bi.Settings {
		if s.Key == "-race" {
			return s.Value == "true"
		}
	}
	return false
}

// e2eTopology is the three namespaces, deleted when the test ends.
type e2eTopology struct {
	c, g, s string
}

func newE2ETopology(t *testing.T, ctx context.Context) *e2eTopology {
	t.Helper()
	e2eRemoveStaleNamespaces(t, ctx)
	pid := os.Getpid()
	topo := &e2eTopology{
		c: fmt.Sprintf("slc-%d", pid),
		g: fmt.Sprintf("slg-%d", pid),
		s: fmt.Sprintf("sls-%d", pid),
	}
	for _, ns := range []string{topo.c, topo.g, topo.s} {
		e2eIP(t, ctx, "netns", "add", ns)
		t.Cleanup(func() {
			// Not ctx: the namespace must go even when the test ran out of time.
			if out, err := exec.Command("ip", "netns", "del", ns).CombinedOutput(); err != nil {
				t.Errorf("delete namespace %s: %v: %s", ns, err, out)
			}
		})
		e2eIP(t, ctx, "-n", ns, "link", "set", "lo", "up")
	}
	// Veths are created inside the namespaces, so their short names cannot
	// clash with anything outside and they vanish with the namespaces.
	e2eIP(t, ctx, "-n", topo.g, "link", "add", "g-c", "type", "veth", "peer", "name", "c-g", "netns", topo.c)
	e2eIP(t, ctx, "-n", topo.g, "link", "add", "g-s", "type", "veth", "peer", "name", "s-g", "netns", topo.s)

	e2eSysctl(t, ctx, topo.g,
		"net.ipv4.ip_forward=1",
		"net.ipv6.conf.all.forwarding=1",
		"net.ipv4.conf.all.rp_filter=0",
		"net.ipv4.conf.default.rp_filter=0",
		"net.ipv4.conf.g-c.rp_filter=0",
		"net.ipv4.conf.g-s.rp_filter=0")

	for _, f := range e2eFamilies() {
		fam := "-4"
		if f.client.Is6() {
			fam = "-6"
		}
		e2eIP(t, ctx, "-n", topo.c, fam, "addr", "add", f.prefix(f.client), "dev", "c-g", "nodad")
		e2eIP(t, ctx, "-n", topo.g, fam, "addr", "add", f.prefix(f.gwClient), "dev", "g-c", "nodad")
		e2eIP(t, ctx, "-n", topo.g, fam, "addr", "add", f.prefix(f.gwServer), "dev", "g-s", "nodad")
		e2eIP(t, ctx, "-n", topo.s, fam, "addr", "add", f.prefix(f.server), "dev", "s-g", "nodad")
	}
	veths := []struct{ ns, dev string }{{topo.c, "c-g"}, {topo.g, "g-c"}, {topo.g, "g-s"}, {topo.s, "s-g"}}
	for _, l := range veths {
		e2eIP(t, ctx, "-n", l.ns, "link", "set", l.dev, "up")
	}
	// Until the kernel's link watcher has processed carrier-up, a veth
	// keeps its no-op qdisc and drops what it sends: a neighbour
	// advertisement lost that way costs the first flow a 1 s retry. Asking
	// for the link's state makes the kernel process the pending event.
	for _, l := range veths {
		e2eWaitOperUp(t, ctx, l.ns, l.dev, 5*time.Second)
	}
	for _, f := range e2eFamilies() {
		fam := "-4"
		if f.client.Is6() {
			fam = "-6"
		}
		// C goes through G for everything; S gets no route to C on purpose.
		e2eIP(t, ctx, "-n", topo.c, fam, "route", "add", "default", "via", f.gwClient.String())
		e2eIP(t, ctx, "-n", topo.g, fam, "rule", "add", "iif", "g-c", "lookup", e2eTable)
	}
	return topo
}

// e2eWaitOperUp waits until dev in ns has operational state UP.
func e2eWaitOperUp(t *testing.T, ctx context.Context, ns, dev string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		out, err := exec.CommandContext(ctx, "ip", "-n", ns, "-o", "link", "show", "dev", dev).Output()
		if err == nil && strings.Contains(string(out), " state UP ") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s in %s not operationally up after %v: %q, %v", dev, ns, timeout, out, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// routeIntoTUN sends everything arriving from C into the TUN, once it exists.
func (topo *e2eTopology) routeIntoTUN(t *testing.T, ctx context.Context, tun string) {
	t.Helper()
	e2eSysctl(t, ctx, topo.g, "net.ipv4.conf."+tun+".rp_filter=0")
	for _, fam := range []string{"-4", "-6"} {
		e2eIP(t, ctx, "-n", topo.g, fam, "route", "add", "default", "dev", tun, "table", e2eTable)
	}
}

// e2eRemoveStaleNamespaces deletes namespaces left by an earlier run of this
// test whose process died before its cleanup could run.
func e2eRemoveStaleNamespaces(t *testing.T, ctx context.Context) {
	t.Helper()
	out, err := exec.CommandContext(ctx, "ip", "netns", "list").Output()
	if err != nil {
		return
	}
	for _, line := range e2eNonEmptyLines(string(out)) {
		name, _, _ := strings.Cut(line, " ")
		var pidStr string
		// sl*: TestServeTUNEndToEnd; sw*: TestServeWireGuardEndToEnd;
		// sx*: TestExposeEndToEnd.
		for _, p := range []string{"slc-", "slg-", "sls-", "swc-", "swg-", "sws-", "sxo-", "sxg-", "sxc-"} {
			if s, ok := strings.CutPrefix(name, p); ok {
				pidStr = s
			}
		}
		pid, err := strconv.Atoi(pidStr)
		if err != nil || pid == os.Getpid() {
			continue
		}
		if !e2eProcessAlive(pid) {
			t.Logf("deleting namespace %s left by dead test process %d", name, pid)
			_ = exec.CommandContext(ctx, "ip", "netns", "del", name).Run()
		}
	}
}

// e2eProcessAlive reports whether pid is a running process: a zombie,
// which a container's init may never reap, counts as dead.
func e2eProcessAlive(pid int) bool {
	if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
		return false
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return !errors.Is(err, os.ErrNotExist)
	}
	// The state follows the command name, which is in parentheses.
	if i := bytes.LastIndexByte(stat, ')'); i >= 0 && i+2 < len(stat) {
		return stat[i+2] != 'Z'
	}
	return true
}

func e2eIP(t *testing.T, ctx context.Context, args ...string) {
	t.Helper()
	if out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// e2eSysctl sets key=value pairs inside ns, through the helper process so
// that no sysctl binary is needed.
func e2eSysctl(t *testing.T, ctx context.Context, ns string, kv ...string) {
	t.Helper()
	e2eRunHelper(t, ctx, ns, 10*time.Second, "sysctl", kv...)
}

// e2eLockedBuffer collects a child's output for the test log.
type e2eLockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *e2eLockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *e2eLockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// e2eProc is a long-running child: sluice itself or a helper server.
type e2eProc struct {
	name   string
	cmd    *exec.Cmd
	stderr e2eLockedBuffer
	exited chan struct{}
	// waitErr is cmd.Wait's result, valid once exited is closed.
	waitErr error

	mu    sync.Mutex
	lines []string // stdout lines, for helper servers
	ready chan struct{}
}

// e2eStart starts argv inside ns and stops it when the test ends, logging
// its stderr if the test failed.
func e2eStart(t *testing.T, name, ns string, env []string, argv ...string) *e2eProc {
	t.Helper()
	p := &e2eProc{name: name, exited: make(chan struct{}), ready: make(chan struct{})}
	// Not CommandContext: cleanup below stops the process and reaps it.
	p.cmd = exec.Command("ip", append([]string{"netns", "exec", ns}, argv...)...)
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stderr = &p.stderr
	// ip netns exec execs the command in place, so this also reaches it if
	// the test process dies.
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdout, err := p.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			line := sc.Text()
			p.mu.Lock()
			if line == "ready" {
				close(p.ready)
			} else {
				p.lines = append(p.lines, line)
			}
			p.mu.Unlock()
		}
		_, _ = io.Copy(io.Discard, stdout)
	}()
	go func() {
		<-readDone // Wait closes stdout; read all of it first
		p.waitErr = p.cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-p.exited:
		default:
			_ = p.cmd.Process.Kill()
			<-p.exited
		}
		stderr := p.stderr.String()
		if strings.Contains(stderr, "WARNING: DATA RACE") {
			t.Errorf("%s reported a data race", name)
		}
		if t.Failed() {
			t.Logf("%s stderr:\n%s", name, stderr)
		}
	})
	return p
}

func e2eStartSluice(t *testing.T, ns, bin string, args ...string) *e2eProc {
	t.Helper()
	t.Logf("ip netns exec %s sluice %s", ns, strings.Join(args, " "))
	return e2eStart(t, "sluice", ns, nil, append([]string{bin}, args...)...)
}

// waitUp waits until sluice has created the TUN and brought it up.
func (p *e2eProc) waitUp(t *testing.T, ctx context.Context, ns, dev string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		out, err := exec.CommandContext(ctx, "ip", "-n", ns, "-o", "link", "show", "dev", dev).Output()
		if err == nil && e2eLinkUp(string(out)) {
			return
		}
		select {
		case <-p.exited:
			t.Fatalf("sluice exited before %s was up: %v\nstderr:\n%s", dev, p.waitErr, p.stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not up %v after starting sluice (ip link show: %q, %v)", dev, timeout, out, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// e2eLinkUp reports whether `ip -o link show` output has UP among the flags.
func e2eLinkUp(out string) bool {
	_, rest, ok := strings.Cut(out, "<")
	if !ok {
		return false
	}
	flags, _, _ := strings.Cut(rest, ">")
	for _, f := range strings.Split(flags, ",") {
		if f == "UP" {
			return true
		}
	}
	return false
}

// e2eHelperCmd is the argv that re-runs this test binary as a helper.
func e2eHelperCmd(role string, args ...string) (argv, env []string) {
	argv = append([]string{os.Args[0], "-test.run=^TestServeTUNHelperProcess$", "--"}, args...)
	// A race-enabled binary otherwise sleeps a second at exit, waiting
	// for late race reports; the helpers are short and many.
	gorace := strings.TrimSpace(os.Getenv("GORACE") + " atexit_sleep_ms=0")
	return argv, []string{e2eHelperEnv + "=" + role, "GORACE=" + gorace}
}

func e2eStartHelper(t *testing.T, ns, role string, args ...string) *e2eProc {
	t.Helper()
	argv, env := e2eHelperCmd(role, args...)
	return e2eStart(t, role, ns, env, argv...)
}

func (p *e2eProc) waitReady(t *testing.T, timeout time.Duration) {
	t.Helper()
	select {
	case <-p.ready:
	case <-p.exited:
		t.Fatalf("%s exited before it was ready: %v\nstderr:\n%s", p.name, p.waitErr, p.stderr.String())
	case <-time.After(timeout):
		t.Fatalf("%s not ready after %v\nstderr:\n%s", p.name, timeout, p.stderr.String())
	}
}

// e2eFlow is one flow a helper server reported.
type e2eFlow struct{ local, remote netip.AddrPort }

// outputLines returns what p has printed so far, but "ready".
func (p *e2eProc) outputLines() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.lines)
}

// flows returns the flows a helper server reported ("peer LOCAL REMOTE").
func (p *e2eProc) flows() []e2eFlow {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []e2eFlow
	for _, l := range p.lines {
		f := strings.Fields(l)
		if len(f) != 3 || f[0] != "peer" {
			continue
		}
		local, err1 := netip.ParseAddrPort(f[1])
		remote, err2 := netip.ParseAddrPort(f[2])
		if err1 != nil || err2 != nil {
			continue
		}
		out = append(out, e2eFlow{e2eUnmapPort(local), e2eUnmapPort(remote)})
	}
	return out
}

// peers returns the remote ends of the flows a helper server reported.
func (p *e2eProc) peers() []netip.AddrPort {
	var out []netip.AddrPort
	for _, f := range p.flows() {
		out = append(out, f.remote)
	}
	return out
}

func e2eUnmapPort(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap().WithZone(""), ap.Port())
}

// waitPeers waits until the server has reported at least n peers from addr.
// The server reports a peer before it answers, but the line may still be in
// the pipe when the client has its answer.
func (p *e2eProc) waitPeers(t *testing.T, addr netip.Addr, n int, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		got := 0
		for _, ap := range p.peers() {
			if ap.Addr().Unmap() == addr {
				got++
			}
		}
		if got >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("%s saw %d peers from %s, want at least %d; all peers: %v", p.name, got, addr, n, p.peers())
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// e2eRunHelper runs a helper role to completion inside ns and returns its
// stdout; a failure or timeout fails the test with the helper's stderr.
func e2eRunHelper(t *testing.T, ctx context.Context, ns string, timeout time.Duration, role string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	argv, env := e2eHelperCmd(role, args...)
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns}, argv...)...)
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("helper %s %s in %s: %v\nstdout:\n%s\nstderr:\n%s", role, strings.Join(args, " "), ns, err, stdout.String(), stderr.String())
	}
	return stdout.String()
}

// e2eLookTool finds a Debian tool the test uses as an independent client,
// or skips the subtest.
func e2eLookTool(t *testing.T, name string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("%s is not installed (make deps installs it); skipping this check", name)
	}
	return path
}

// e2eRunTool runs a program inside ns and returns its output, how long it
// ran and its error.
func e2eRunTool(ctx context.Context, ns string, timeout time.Duration, argv ...string) (stdout, stderr []byte, elapsed time.Duration, err error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns}, argv...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	start := time.Now()
	err = cmd.Run()
	return out.Bytes(), errOut.Bytes(), time.Since(start), err
}

func e2eNonEmptyLines(s string) []string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if l = strings.TrimSpace(l); l != "" {
			out = append(out, l)
		}
	}
	return out
}

// e2eDialResult is what the tcp-dial and udp-refused roles print:
// "ok elapsed=D" or "err errno=NAME elapsed=D msg=...".
type e2eDialResult struct {
	errno   string
	elapsed time.Duration
}

func e2eParseDial(t *testing.T, out string) e2eDialResult {
	t.Helper()
	var r e2eDialResult
	line := strings.TrimSpace(out)
	fields := strings.Fields(line)
	if len(fields) < 2 {
		t.Fatalf("unparseable helper output %q", out)
	}
	for _, f := range fields[1:] {
		k, v, _ := strings.Cut(f, "=")
		switch k {
		case "errno":
			r.errno = v
		case "elapsed":
			d, err := time.ParseDuration(v)
			if err != nil {
				t.Fatalf("bad elapsed in helper output %q: %v", out, err)
			}
			r.elapsed = d
		}
	}
	if fields[0] == "ok" {
		r.errno = "none (it succeeded)"
	}
	return r
}

// TestServeTUNHelperProcess is not a test: TestServeTUNEndToEnd re-runs the
// test binary with it inside a namespace to play a client or server role.
func TestServeTUNHelperProcess(t *testing.T) {
	role := os.Getenv(e2eHelperEnv)
	if role == "" {
		return
	}
	args := flag.Args()
	var err error
	switch role {
	case "sysctl":
		err = e2eHelperSysctl(args)
	case "http-server":
		err = e2eHelperHTTPServer(args)
	case "udp-echo-server":
		err = e2eHelperUDPEchoServer(args)
	case "http-get":
		err = e2eHelperHTTPGet(args)
	case "udp-echo":
		err = e2eHelperUDPEcho(args)
	case "tcp-dial":
		err = e2eHelperTCPDial(args)
	case "udp-refused":
		err = e2eHelperUDPRefused(args)
	case "ping":
		err = e2eHelperPing(args)
	case "tcp-hold":
		err = e2eHelperTCPHold(args)
	case "dns-server": // serve_wireguard_test.go
		err = e2eHelperDNSServer(args)
	case "dns-query":
		err = e2eHelperDNSQuery(args)
	case "expose-origin": // expose_e2e_test.go
		err = e2eHelperExposeOrigin(args)
	default:
		err = fmt.Errorf("unknown role %q", role)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "helper %s: %v\n", role, err)
		os.Exit(1)
	}
	os.Exit(0)
}

func e2eHelperSysctl(args []string) error {
	for _, kv := range args {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return fmt.Errorf("want key=value, have %q", kv)
		}
		path := "/proc/sys/" + strings.ReplaceAll(k, ".", "/")
		if err := os.WriteFile(path, []byte(v), 0); err != nil {
			return err
		}
	}
	return nil
}

// e2eReporter writes a server's report lines whole, from any goroutine.
type e2eReporter struct{ mu sync.Mutex }

func (r *e2eReporter) println(a ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	fmt.Println(a...)
}

// peer reports a flow: "peer LOCAL REMOTE".
func (r *e2eReporter) peer(local, remote net.Addr) {
	r.println("peer", local.String(), remote.String())
}

// e2eReportingListener reports every accepted connection before the server
// sees it.
type e2eReportingListener struct {
	net.Listener
	report *e2eReporter
}

func (l e2eReportingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.report.peer(c.LocalAddr(), c.RemoteAddr())
	}
	return c, err
}

// e2eHelperHTTPServer serves e2eBlob at /blob on every address in args until
// killed.
func e2eHelperHTTPServer(args []string) error {
	blob := e2eBlob()
	mux := http.NewServeMux()
	mux.HandleFunc("/blob", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", strconv.Itoa(len(blob)))
		_, _ = w.Write(blob)
	})
	report := new(e2eReporter)
	errc := make(chan error, len(args))
	for _, a := range args {
		ln, err := net.Listen("tcp", a)
		if err != nil {
			return err
		}
		srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go func() { errc <- srv.Serve(e2eReportingListener{ln, report}) }()
	}
	report.println("ready")
	return <-errc
}

// e2eHelperUDPEchoServer echoes datagrams on every address in args until
// killed.
func e2eHelperUDPEchoServer(args []string) error {
	report := new(e2eReporter)
	errc := make(chan error, len(args))
	for _, a := range args {
		pc, err := net.ListenPacket("udp", a)
		if err != nil {
			return err
		}
		go func() {
			buf := make([]byte, 65536)
			for {
				n, from, err := pc.ReadFrom(buf)
				if err != nil {
					errc <- err
					return
				}
				report.peer(pc.LocalAddr(), from)
				if _, err := pc.WriteTo(buf[:n], from); err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	report.println("ready")
	return <-errc
}

// e2eHelperHTTPGet fetches URL args[0] args[1] times, each on a new
// connection, and prints each response's status, length and hash.
func e2eHelperHTTPGet(args []string) error {
	if len(args) != 2 {
		return errors.New("want URL COUNT")
	}
	n, err := strconv.Atoi(args[1])
	if err != nil {
		return err
	}
	client := &http.Client{
		Timeout:   15 * time.Second,
		Transport: &http.Transport{DisableKeepAlives: true, DisableCompression: true},
	}
	for range n {
		start := time.Now()
		resp, err := client.Get(args[0])
		if err != nil {
			return err
		}
		h := sha256.New()
		nb, err := io.Copy(h, resp.Body)
		resp.Body.Close()
		if err != nil {
			return fmt.Errorf("read body after %d bytes: %w", nb, err)
		}
		fmt.Printf("status=%d bytes=%d sha256=%x elapsed=%v\n", resp.StatusCode, nb, h.Sum(nil), time.Since(start))
	}
	return nil
}

// e2eHelperUDPEcho sends a datagram to args[0] until the same payload comes
// back (UDP may lose the first one while neighbours are resolved).
func e2eHelperUDPEcho(args []string) error {
	if len(args) != 1 {
		return errors.New("want ADDR")
	}
	c, err := net.Dial("udp", args[0])
	if err != nil {
		return err
	}
	defer c.Close()
	payload := fmt.Appendf(nil, "sluice e2e %d %d", os.Getpid(), time.Now().UnixNano())
	buf := make([]byte, 2048)
	var lastErr error
	for range 5 {
		if _, err := c.Write(payload); err != nil {
			return err
		}
		_ = c.SetReadDeadline(time.Now().Add(time.Second))
		n, err := c.Read(buf)
		if err != nil {
			lastErr = err
			continue
		}
		if !bytes.Equal(buf[:n], payload) {
			return fmt.Errorf("echo %q, want %q", buf[:n], payload)
		}
		fmt.Println("echo from", c.RemoteAddr())
		return nil
	}
	return fmt.Errorf("no echo after 5 tries: %w", lastErr)
}

// e2eErrno names the errno inside err, or "" if there is none.
func e2eErrno(err error) string {
	var en syscall.Errno
	if !errors.As(err, &en) {
		return ""
	}
	for name, v := range map[string]syscall.Errno{
		"ECONNREFUSED": syscall.ECONNREFUSED,
		"EHOSTUNREACH": syscall.EHOSTUNREACH,
		"ENETUNREACH":  syscall.ENETUNREACH,
		"EACCES":       syscall.EACCES,
		"ETIMEDOUT":    syscall.ETIMEDOUT,
		"ECONNRESET":   syscall.ECONNRESET,
	} {
		if en == v {
			return name
		}
	}
	return fmt.Sprintf("errno%d", int(en))
}

// e2eHelperTCPHold fetches /blob from the HTTP server at args[0] on one
// connection, prints "local ADDR bytes=N" and "ready", then keeps the
// connection open (HTTP keep-alive) until it ends, and prints how:
// "closed eof", "closed errno=NAME ..." or, after args[1], "closed timeout".
func e2eHelperTCPHold(args []string) error {
	if len(args) != 2 {
		return errors.New("want ADDR TIMEOUT")
	}
	timeout, err := time.ParseDuration(args[1])
	if err != nil {
		return err
	}
	c, err := net.DialTimeout("tcp", args[0], 8*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := io.WriteString(c, "GET /blob HTTP/1.1\r\nHost: sluice-e2e\r\n\r\n"); err != nil {
		return err
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return err
	}
	n, err := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err != nil {
		return fmt.Errorf("read body after %d bytes: %w", n, err)
	}
	fmt.Printf("local %s bytes=%d\n", c.LocalAddr(), n)
	fmt.Println("ready")
	_, err = br.ReadByte()
	switch {
	case err == nil:
		fmt.Println("closed never: the server sent more")
	case errors.Is(err, io.EOF):
		fmt.Println("closed eof")
	case errors.Is(err, os.ErrDeadlineExceeded):
		fmt.Println("closed timeout")
	default:
		fmt.Printf("closed errno=%s msg=%q\n", e2eErrno(err), err.Error())
	}
	return nil
}

// e2eHelperTCPDial connects to args[0] and prints how that went.
func e2eHelperTCPDial(args []string) error {
	if len(args) != 1 {
		return errors.New("want ADDR")
	}
	start := time.Now()
	c, err := net.DialTimeout("tcp", args[0], 8*time.Second)
	elapsed := time.Since(start)
	if err != nil {
		errno := e2eErrno(err)
		if errno == "" {
			errno = "none"
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				errno = "timeout"
			}
		}
		fmt.Printf("err errno=%s elapsed=%v msg=%q\n", errno, elapsed, err.Error())
		return nil
	}
	c.Close()
	fmt.Printf("ok elapsed=%v\n", elapsed)
	return nil
}

// e2eHelperUDPRefused sends datagrams to args[0] on a connected socket,
// where Linux reports an ICMP error for an earlier datagram on a later
// read, and prints whether an echo or an error came back.
func e2eHelperUDPRefused(args []string) error {
	if len(args) != 1 {
		return errors.New("want ADDR")
	}
	c, err := net.Dial("udp", args[0])
	if err != nil {
		return err
	}
	defer c.Close()
	start := time.Now()
	buf := make([]byte, 2048)
	var lastErr error
	for range 3 {
		if _, err := c.Write([]byte("denied?")); err != nil {
			lastErr = err
			if e2eErrno(err) != "" {
				break
			}
			continue
		}
		_ = c.SetReadDeadline(time.Now().Add(time.Second))
		_, err := c.Read(buf)
		if err == nil {
			fmt.Printf("ok elapsed=%v\n", time.Since(start))
			return nil
		}
		lastErr = err
		if e2eErrno(err) != "" {
			break
		}
	}
	errno := e2eErrno(lastErr)
	if errno == "" {
		errno = "none"
	}
	fmt.Printf("err errno=%s elapsed=%v msg=%q\n", errno, time.Since(start), lastErr.Error())
	return nil
}

// e2eHelperPing sends args[1] ICMP echo requests to args[0] over a raw
// socket and prints how many matching replies came back from it.
func e2eHelperPing(args []string) error {
	if len(args) != 2 {
		return errors.New("want ADDR COUNT")
	}
	dst, err := netip.ParseAddr(args[0])
	if err != nil {
		return err
	}
	count, err := strconv.Atoi(args[1])
	if err != nil {
		return err
	}
	network, reqType, replyType := "ip4:icmp", byte(8), byte(0)
	if dst.Is6() {
		network, reqType, replyType = "ip6:ipv6-icmp", 128, 129
	}
	c, err := net.ListenPacket(network, "")
	if err != nil {
		return err
	}
	defer c.Close()
	id := uint16(os.Getpid())
	payload := []byte("sluice e2e ping payload")
	replies := 0
	buf := make([]byte, 2048)
	for seq := 1; seq <= count; seq++ {
		msg := make([]byte, 8+len(payload))
		msg[0] = reqType
		binary.BigEndian.PutUint16(msg[4:], id)
		binary.BigEndian.PutUint16(msg[6:], uint16(seq))
		copy(msg[8:], payload)
		if dst.Is4() {
			// The kernel fills in ICMPv6 checksums on raw sockets, not ICMPv4 ones.
			binary.BigEndian.PutUint16(msg[2:], e2eChecksum(msg))
		}
		if _, err := c.WriteTo(msg, &net.IPAddr{IP: dst.AsSlice()}); err != nil {
			return err
		}
		deadline := time.Now().Add(2 * time.Second)
		for {
			_ = c.SetReadDeadline(deadline)
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				if ne, ok := err.(net.Error); ok && ne.Timeout() {
					break
				}
				return err
			}
			m := buf[:n]
			fa, _ := netip.AddrFromSlice(from.(*net.IPAddr).IP)
			if len(m) < 8 || m[0] != replyType || fa.Unmap() != dst ||
				binary.BigEndian.Uint16(m[4:]) != id || binary.BigEndian.Uint16(m[6:]) != uint16(seq) {
				continue
			}
			if !bytes.Equal(m[8:], payload) {
				return fmt.Errorf("reply %d payload %q, want %q", seq, m[8:], payload)
			}
			replies++
			break
		}
	}
	fmt.Printf("replies=%d\n", replies)
	return nil
}

// e2eChecksum is the Internet checksum (RFC 1071).
func e2eChecksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}
