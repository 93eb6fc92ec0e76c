//go:build linux

package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/sluice-vpn/sluice/pkg/admin"
)

// The WireGuard end-to-end topology: three network namespaces that the
// test creates and deletes, so every packet stays inside them.
//
//	C (client)   c-g ──veth── g-c   G (sluice)   g-s ──veth── s-g   S (server)
//	10.88.1.2                 10.88.1.1          10.88.2.1          10.88.2.2
//	                                             fd88:2::1          fd88:2::2
//	wg0-like device from wireguard-go, routing only S's networks and the
//	gateway's tunnel addresses
//
// G does not forward and has no policy routing: C only ever talks UDP to
// sluice's WireGuard port, and S has no route back to C. A reply can only
// reach C if sluice decrypted the packets, terminated the flow and
// re-dialled it from its egress address on S's side.
const (
	wgeClient      = "10.88.1.2"
	wgeGateway     = "10.88.1.1"
	wgeListenPort  = 51820
	wgeEgressV4    = "10.88.2.1"
	wgeEgressV6    = "fd88:2::1"
	wgeServerV4    = "10.88.2.2"
	wgeServerV6    = "fd88:2::2"
	wgeServerNetV4 = "10.88.2.0/24"
	wgeServerNetV6 = "fd88:2::/64"
	wgePeerName    = "laptop"
	wgeDNSName     = "sluice-e2e.test."
	wgeDNSPort     = 53
	// wgeRemovedWithin is how long a GET gets once the peer is removed:
	// over a working tunnel it takes a fraction of this.
	wgeRemovedWithin = 3 * time.Second
)

// wgeDNSAnswer is the A record the DNS server in S gives for wgeDNSName;
// nothing else in the test produces this address.
var wgeDNSAnswer = netip.MustParseAddr("192.0.2.53")

// TestServeWireGuardEndToEnd runs `sluice serve` as a WireGuard server in a
// gateway namespace and connects to it from a client namespace with the
// reference client: wireguard-go on a kernel TUN, configured by wg from
// wireguard-tools with the configuration that `sluice peer add` printed.
func TestServeWireGuardEndToEnd(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("serve WireGuard end-to-end: needs root to create network namespaces and a TUN device; skipping")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("serve WireGuard end-to-end: iproute2's ip command is not installed; skipping")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skipf("serve WireGuard end-to-end: /dev/net/tun is missing (%v); wireguard-go needs the kernel TUN driver; skipping", err)
	}
	wgTool, err := exec.LookPath("wg")
	if err != nil {
		t.Skip("serve WireGuard end-to-end: wg from wireguard-tools is not installed (make deps installs it); skipping")
	}

	start := time.Now()
	bin := e2eBuildSluice(t)
	wgGo := wgeBuildWireGuardGo(t)

	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Second)
	t.Cleanup(cancel)

	topo := newWGETopology(t, ctx)
	tmp := t.TempDir()
	stateDir := filepath.Join(tmp, "state")

	httpSrv := e2eStartHelper(t, topo.s, "http-server",
		net.JoinHostPort(wgeServerV4, strconv.Itoa(e2eHTTPPort)),
		net.JoinHostPort(wgeServerV6, strconv.Itoa(e2eHTTPPort)))
	dnsSrv := e2eStartHelper(t, topo.s, "dns-server", net.JoinHostPort(wgeServerV4, strconv.Itoa(wgeDNSPort)))
	httpSrv.waitReady(t, 10*time.Second)
	dnsSrv.waitReady(t, 10*time.Second)

	gw := e2eStartSluice(t, topo.g, bin, "serve",
		"--state", stateDir,
		"--listen", fmt.Sprintf(":%d", wgeListenPort),
		"--endpoint", net.JoinHostPort(wgeGateway, strconv.Itoa(wgeListenPort)),
		"--egress-addr", wgeEgressV4, "--egress-addr", wgeEgressV6,
		"--egress-ports", fmt.Sprintf("%d-%d", e2eEgressLo, e2eEgressHi),
		"--allow", wgeServerNetV4, "--allow", wgeServerNetV6,
		"--dns-upstream", net.JoinHostPort(wgeServerV4, strconv.Itoa(wgeDNSPort)),
		"--log-level", "debug")
	wgeWaitControlSocket(t, gw, filepath.Join(stateDir, "sluice.sock"), 20*time.Second)
	t.Logf("sluice up %v after the test started", time.Since(start).Round(time.Millisecond))

	t.Run("FileLimitLogged", func(t *testing.T) {
		// The gateway inherits this process's hard limit; with the
		// default table of 65536 flows, a lower one caps the flows.
		var lim syscall.Rlimit
		if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			t.Skip(err)
		}
		want := `"open file limit"`
		if lim.Max < 65536+256 {
			want = fmt.Sprintf(`"limit": %d, "tcp_flows_at_most"`, lim.Max)
		}
		if log := gw.stderr.String(); !strings.Contains(log, want) {
			t.Errorf("the log does not say %s:\n%s", want, log)
		}
	})

	t.Run("FirstPeerPrinted", func(t *testing.T) {
		// serve prints it before it opens the control socket, but the
		// lines may still be in the pipe.
		first := wgeWaitOutput(gw, "[Peer]", 5*time.Second)
		conf, err := wgeQuickStrip(first)
		if err != nil {
			t.Fatalf("the first peer's configuration that serve printed: %v\n%s", err, first)
		}
		if want := net.JoinHostPort(wgeGateway, strconv.Itoa(wgeListenPort)); conf.endpoint != want {
			t.Errorf("first peer's Endpoint = %q, want %q (from --endpoint)", conf.endpoint, want)
		}
	})

	// The words: the client is configured with wg from the
	// configuration that `sluice peer add` printed.
	out, stderr, _, err := wgeSluice(ctx, topo.g, 15*time.Second, bin, "peer", "add", wgePeerName, "--state", stateDir)
	if err != nil {
		t.Fatalf("sluice peer add %s: %v\n%s%s", wgePeerName, err, out, stderr)
	}
	conf, err := wgeQuickStrip(string(out))
	if err != nil {
		t.Fatalf("the configuration that sluice peer add printed: %v\n%s", err, out)
	}
	if want := net.JoinHostPort(wgeGateway, strconv.Itoa(wgeListenPort)); conf.endpoint != want {
		t.Errorf("%s's Endpoint = %q, want %q (kept in the state from serve --endpoint)", wgePeerName, conf.endpoint, want)
	}
	if len(conf.addrs) == 0 || len(conf.dns) == 0 || conf.mtu == "" {
		t.Fatalf("%s's configuration lacks Address, DNS or MTU:\n%s", wgePeerName, out)
	}
	t.Logf("%s: addresses %v, DNS %v, MTU %s", wgePeerName, conf.addrs, conf.dns, conf.mtu)

	iface := wgeStartClient(t, ctx, topo.c, wgGo, wgTool, conf, tmp)

	wantSum := sha256.Sum256(e2eBlob())
	wantGet := fmt.Sprintf("status=200 bytes=%d sha256=%s", e2eBlobSize, hex.EncodeToString(wantSum[:]))
	urlV4 := "http://" + net.JoinHostPort(wgeServerV4, strconv.Itoa(e2eHTTPPort)) + "/blob"
	urlV6 := "http://" + net.JoinHostPort(wgeServerV6, strconv.Itoa(e2eHTTPPort)) + "/blob"

	for _, tc := range []struct{ name, url, egress string }{
		{"HTTPGet1MiBIPv4", urlV4, wgeEgressV4},
		{"HTTPGet1MiBIPv6", urlV6, wgeEgressV6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// The first GET also carries the handshake.
			out := e2eRunHelper(t, ctx, topo.c, 20*time.Second, "http-get", tc.url, "1")
			got, elapsed, _ := strings.Cut(strings.TrimSpace(out), " elapsed=")
			if got != wantGet {
				t.Fatalf("GET %s through the tunnel: got %q, want %q", tc.url, got, wantGet)
			}
			t.Logf("GET %s took %s", tc.url, elapsed)
			httpSrv.waitPeers(t, netip.MustParseAddr(tc.egress), 1, 5*time.Second)
		})
	}

	t.Run("DNSThroughGateway", func(t *testing.T) {
		for _, resolver := range conf.dns {
			server := netip.AddrPortFrom(resolver, wgeDNSPort).String()
			out := e2eRunHelper(t, ctx, topo.c, 15*time.Second, "dns-query", server, wgeDNSName)
			if got, want := strings.TrimSpace(out), "A "+wgeDNSAnswer.String(); got != want {
				t.Errorf("query %s for %s A: got %q, want %q", server, wgeDNSName, got, want)
			}
		}
		dnsSrv.waitPeers(t, netip.MustParseAddr(wgeEgressV4), 1, 5*time.Second)
	})

	t.Run("ServerSawOnlyEgress", func(t *testing.T) {
		want := map[netip.Addr]bool{netip.MustParseAddr(wgeEgressV4): true, netip.MustParseAddr(wgeEgressV6): true}
		for _, srv := range []*e2eProc{httpSrv, dnsSrv} {
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
		}
	})

	t.Run("ClientHandshake", func(t *testing.T) {
		out, stderr, _, err := e2eRunTool(ctx, topo.c, 10*time.Second, wgTool, "show", iface, "latest-handshakes")
		if err != nil {
			t.Fatalf("wg show %s latest-handshakes: %v: %s", iface, err, stderr)
		}
		// One line per peer: "PUBLIC-KEY<tab>UNIX-SECONDS", 0 for never.
		lines := e2eNonEmptyLines(string(out))
		if len(lines) != 1 {
			t.Fatalf("wg show %s latest-handshakes: %d peers, want the gateway alone:\n%s", iface, len(lines), out)
		}
		key, secs, _ := strings.Cut(lines[0], "\t")
		if key != conf.serverKey {
			t.Errorf("wg show: peer %s, want the gateway's key %s", key, conf.serverKey)
		}
		ts, err := strconv.ParseInt(strings.TrimSpace(secs), 10, 64)
		if err != nil || ts == 0 {
			t.Fatalf("wg show %s latest-handshakes: %q, want a handshake time", iface, lines[0])
		}
		if age := time.Since(time.Unix(ts, 0)); age < -time.Minute || age > time.Minute {
			t.Errorf("wg show: latest handshake %v ago, want within this test", age)
		}
	})

	t.Run("PeerListShowsHandshake", func(t *testing.T) {
		peers := wgePeerList(t, ctx, topo.g, bin, stateDir)
		i := slices.IndexFunc(peers, func(p admin.PeerInfo) bool { return p.Name == wgePeerName })
		if i < 0 {
			t.Fatalf("sluice peer list has no %s: %+v", wgePeerName, peers)
		}
		p := peers[i]
		if p.LastHandshake == nil {
			t.Errorf("peer list: %s has no handshake", wgePeerName)
		} else if age := time.Since(*p.LastHandshake); age < -time.Minute || age > time.Minute {
			t.Errorf("peer list: %s's handshake %v ago, want within this test", wgePeerName, age)
		}
		// Two 1 MiB bodies went to the client, and its requests came in.
		if p.TxBytes < 2*e2eBlobSize || p.RxBytes == 0 {
			t.Errorf("peer list: %s received %d bytes and sent %d, want >0 and >= %d", wgePeerName, p.RxBytes, p.TxBytes, 2*e2eBlobSize)
		}
		var confAddrs []netip.Addr
		for _, a := range conf.addrs {
			confAddrs = append(confAddrs, a.Addr())
		}
		if !slices.Equal(p.Addrs, confAddrs) {
			t.Errorf("peer list: %s has addresses %v, its configuration %v", wgePeerName, p.Addrs, confAddrs)
		}
		table, stderr, _, err := wgeSluice(ctx, topo.g, 10*time.Second, bin, "peer", "list", "--state", stateDir)
		if err != nil {
			t.Fatalf("sluice peer list: %v: %s", err, stderr)
		}
		t.Logf("sluice peer list:\n%s", table)
	})

	t.Run("RemovedPeerCutOff", func(t *testing.T) {
		out, stderr, _, err := wgeSluice(ctx, topo.g, 10*time.Second, bin, "peer", "remove", wgePeerName, "--state", stateDir)
		if err != nil {
			t.Fatalf("sluice peer remove %s: %v\n%s%s", wgePeerName, err, out, stderr)
		}
		// A fresh process runs the GET: the helper's own client would give
		// up only after 15 s, so it is killed after wgeRemovedWithin.
		argv, env := e2eHelperCmd("http-get", urlV4, "1")
		argv = append(append([]string{"env"}, env...), argv...)
		got, _, elapsed, err := e2eRunTool(ctx, topo.c, wgeRemovedWithin, argv...)
		if err == nil {
			t.Fatalf("GET %s after sluice peer remove %s succeeded in %v: %s", urlV4, wgePeerName, elapsed, got)
		}
		t.Logf("GET %s after removing the peer: %v after %v", urlV4, err, elapsed.Round(time.Millisecond))

		select {
		case <-gw.exited:
			t.Fatalf("sluice exited after the peer was removed: %v", gw.waitErr)
		default:
		}
		peers := wgePeerList(t, ctx, topo.g, bin, stateDir)
		for _, p := range peers {
			if p.Name == wgePeerName {
				t.Errorf("sluice peer list still has %s after it was removed: %+v", wgePeerName, p)
			}
		}
		if len(peers) == 0 {
			t.Errorf("sluice peer list is empty: the first peer went too")
		}
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
	})
	t.Logf("whole test took %v", time.Since(start).Round(time.Millisecond))
}

// wgeBuildWireGuardGo builds the reference user-space client, the root
// package of the wireguard-go module that go.mod already requires, with
// the race detector when the test has it.
func wgeBuildWireGuardGo(t *testing.T) string {
	t.Helper()
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("serve WireGuard end-to-end: the go command is not in PATH to build wireguard-go; skipping")
	}
	bin := filepath.Join(t.TempDir(), "wireguard-go")
	args := []string{"build", "-o", bin}
	if e2eRaceEnabled() {
		args = append(args, "-race")
	}
	args = append(args, "golang.zx2c4.com/wireguard")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	start := time.Now()
	if out, err := exec.CommandContext(ctx, goTool, args...).CombinedOutput(); err != nil {
		t.Fatalf("go %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	t.Logf("built wireguard-go in %v", time.Since(start).Round(time.Millisecond))
	return bin
}

// newWGETopology makes the three namespaces, deleted when the test ends.
// Their names share e2eRemoveStaleNamespaces' scheme, so a run killed
// before its cleanup is tidied by the next.
func newWGETopology(t *testing.T, ctx context.Context) *e2eTopology {
	t.Helper()
	e2eRemoveStaleNamespaces(t, ctx)
	pid := os.Getpid()
	topo := &e2eTopology{
		c: fmt.Sprintf("swc-%d", pid),
		g: fmt.Sprintf("swg-%d", pid),
		s: fmt.Sprintf("sws-%d", pid),
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
	e2eIP(t, ctx, "-n", topo.g, "link", "add", "g-c", "type", "veth", "peer", "name", "c-g", "netns", topo.c)
	e2eIP(t, ctx, "-n", topo.g, "link", "add", "g-s", "type", "veth", "peer", "name", "s-g", "netns", topo.s)

	e2eIP(t, ctx, "-n", topo.c, "addr", "add", wgeClient+"/24", "dev", "c-g")
	e2eIP(t, ctx, "-n", topo.g, "addr", "add", wgeGateway+"/24", "dev", "g-c")
	e2eIP(t, ctx, "-n", topo.g, "addr", "add", wgeEgressV4+"/24", "dev", "g-s")
	e2eIP(t, ctx, "-n", topo.s, "addr", "add", wgeServerV4+"/24", "dev", "s-g")
	e2eIP(t, ctx, "-n", topo.g, "-6", "addr", "add", wgeEgressV6+"/64", "dev", "g-s", "nodad")
	e2eIP(t, ctx, "-n", topo.s, "-6", "addr", "add", wgeServerV6+"/64", "dev", "s-g", "nodad")

	veths := []struct{ ns, dev string }{{topo.c, "c-g"}, {topo.g, "g-c"}, {topo.g, "g-s"}, {topo.s, "s-g"}}
	for _, l := range veths {
		e2eIP(t, ctx, "-n", l.ns, "link", "set", l.dev, "up")
	}
	for _, l := range veths {
		e2eWaitOperUp(t, ctx, l.ns, l.dev, 5*time.Second)
	}
	return topo
}

// wgeWaitControlSocket waits until sluice answers on its control socket,
// which it opens once the gateway is running.
func wgeWaitControlSocket(t *testing.T, gw *e2eProc, sock string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.Dial("unix", sock)
		if err == nil {
			c.Close()
			return
		}
		select {
		case <-gw.exited:
			t.Fatalf("sluice exited before its control socket %s was up: %v\nstderr:\n%s", sock, gw.waitErr, gw.stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("sluice's control socket %s not up %v after start: %v", sock, timeout, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// wgeWaitOutput waits until p's stdout has a line starting with prefix
// and a blank line after it, and returns the output up to that blank line
// (all of it after timeout).
func wgeWaitOutput(p *e2eProc, prefix string, timeout time.Duration) string {
	deadline := time.Now().Add(timeout)
	for {
		p.mu.Lock()
		lines := slices.Clone(p.lines)
		p.mu.Unlock()
		if i := slices.IndexFunc(lines, func(l string) bool { return strings.HasPrefix(l, prefix) }); i >= 0 {
			// The section is complete at its blank line; a QR code follows.
			if j := slices.Index(lines[i:], ""); j >= 0 {
				return strings.Join(lines[:i+j], "\n")
			}
		}
		if time.Now().After(deadline) {
			return strings.Join(lines, "\n")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// wgeConfig is a wg-quick configuration taken apart: what `wg setconf`
// accepts, and the wg-quick keys that the test applies with ip instead.
type wgeConfig struct {
	setconf   string         // the configuration without wg-quick's keys
	addrs     []netip.Prefix // Address
	dns       []netip.Addr   // DNS
	mtu       string         // MTU
	endpoint  string         // the (only) peer's Endpoint
	serverKey string         // the (only) peer's PublicKey
}

// wgeQuickKeys are the [Interface] keys that wg-quick handles itself and
// that `wg setconf` rejects.
var wgeQuickKeys = []string{"address", "dns", "mtu", "table", "preup", "postup", "predown", "postdown", "saveconfig"}

// wgeQuickStrip does what `wg-quick strip` does to a configuration, and
// keeps what it removed. Lines outside any section (the notes and the QR
// code serve prints) are dropped.
func wgeQuickStrip(conf string) (wgeConfig, error) {
	var c wgeConfig
	var b strings.Builder
	section := ""
	interfaces, peers := 0, 0
	sc := bufio.NewScanner(strings.NewReader(conf))
	for sc.Scan() {
		line, _, _ := strings.Cut(sc.Text(), "#")
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		if strings.HasPrefix(line, "[") {
			section = strings.ToLower(line)
			switch section {
			case "[interface]":
				interfaces++
			case "[peer]":
				peers++
			default:
				// A QR code row, or a section wg would reject.
				section = ""
				continue
			}
			fmt.Fprintf(&b, "%s\n", line)
			continue
		}
		if section == "" {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			return c, fmt.Errorf("line %q: want KEY = VALUE", line)
		}
		k, v = strings.ToLower(strings.TrimSpace(k)), strings.TrimSpace(v)
		if section == "[interface]" && slices.Contains(wgeQuickKeys, k) {
			for _, item := range strings.Split(v, ",") {
				item = strings.TrimSpace(item)
				switch k {
				case "address":
					p, err := netip.ParsePrefix(item)
					if err != nil {
						return c, fmt.Errorf("Address %q: %v", item, err)
					}
					c.addrs = append(c.addrs, p)
				case "dns":
					a, err := netip.ParseAddr(item)
					if err != nil {
						return c, fmt.Errorf("DNS %q: not an address (search domains are not expected here)", item)
					}
					c.dns = append(c.dns, a)
				case "mtu":
					c.mtu = item
				}
			}
			continue
		}
		if section == "[peer]" {
			switch k {
			case "endpoint":
				c.endpoint = v
			case "publickey":
				c.serverKey = v
			}
		}
		fmt.Fprintf(&b, "%s = %s\n", k, v)
	}
	if interfaces != 1 || peers != 1 {
		return c, fmt.Errorf("want one [Interface] and one [Peer] section, found %d and %d", interfaces, peers)
	}
	c.setconf = b.String()
	return c, nil
}

// wgeStartClient runs wireguard-go inside ns, configures its device from
// conf with wg and ip, and returns the device's name. The device is named
// after the test process: wireguard-go's control socket lives in the
// host's /var/run/wireguard, which namespaces do not separate.
func wgeStartClient(t *testing.T, ctx context.Context, ns, wgGo, wgTool string, conf wgeConfig, dir string) string {
	t.Helper()
	iface := fmt.Sprintf("slwg%d", os.Getpid())
	sock := filepath.Join("/var/run/wireguard", iface+".sock")
	client := e2eStart(t, "wireguard-go", ns, []string{"WG_PROCESS_FOREGROUND=1", "LOG_LEVEL=debug"}, wgGo, "-f", iface)
	// Runs before e2eStart's own cleanup, which would SIGKILL it: on
	// SIGTERM wireguard-go removes its socket.
	t.Cleanup(func() {
		select {
		case <-client.exited:
		default:
			_ = client.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-client.exited:
			case <-time.After(5 * time.Second):
			}
		}
		_ = os.Remove(sock)
		if strings.Contains(client.stderr.String(), "WARNING: DATA RACE") {
			t.Errorf("wireguard-go reported a data race")
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("unix", sock)
		if err == nil {
			c.Close()
			break
		}
		select {
		case <-client.exited:
			t.Fatalf("wireguard-go exited before its socket %s was up: %v\nstderr:\n%s", sock, client.waitErr, client.stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("wireguard-go's socket %s not up after 10s: %v\nstderr:\n%s", sock, err, client.stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}

	file := filepath.Join(dir, "client.conf")
	if err := os.WriteFile(file, []byte(conf.setconf), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, stderr, _, err := e2eRunTool(ctx, ns, 10*time.Second, wgTool, "setconf", iface, file); err != nil {
		t.Fatalf("wg setconf %s:\n%s\n%v: %s%s", iface, conf.setconf, err, out, stderr)
	}
	for _, a := range conf.addrs {
		args := []string{"-n", ns, "addr", "add", a.String(), "dev", iface}
		if a.Addr().Is6() {
			args = append(args, "nodad")
		}
		e2eIP(t, ctx, args...)
	}
	e2eIP(t, ctx, "-n", ns, "link", "set", iface, "mtu", conf.mtu, "up")
	// Only S's networks and the gateway's resolver addresses go into the
	// tunnel; C keeps its own routes for the rest, the tunnel's UDP included.
	routes := []string{wgeServerNetV4, wgeServerNetV6}
	for _, a := range conf.dns {
		routes = append(routes, netip.PrefixFrom(a, a.BitLen()).String())
	}
	for _, r := range routes {
		e2eIP(t, ctx, "-n", ns, "route", "add", r, "dev", iface)
	}
	return iface
}

// wgeSluice runs a short sluice command inside ns. A race-enabled sluice
// would otherwise wait a second at exit for late race reports.
func wgeSluice(ctx context.Context, ns string, timeout time.Duration, bin string, args ...string) (stdout, stderr []byte, elapsed time.Duration, err error) {
	gorace := strings.TrimSpace(os.Getenv("GORACE") + " atexit_sleep_ms=0")
	argv := append([]string{"env", "GORACE=" + gorace, bin}, args...)
	return e2eRunTool(ctx, ns, timeout, argv...)
}

// wgePeerList runs `sluice peer list -o json` in ns.
func wgePeerList(t *testing.T, ctx context.Context, ns, bin, stateDir string) []admin.PeerInfo {
	t.Helper()
	out, stderr, _, err := wgeSluice(ctx, ns, 10*time.Second, bin, "peer", "list", "--state", stateDir, "-o", "json")
	if err != nil {
		t.Fatalf("sluice peer list: %v: %s", err, stderr)
	}
	var peers []admin.PeerInfo
	if err := json.Unmarshal(out, &peers); err != nil {
		t.Fatalf("sluice peer list -o json: %v\n%s", err, out)
	}
	return peers
}

// e2eHelperDNSServer answers DNS queries on the UDP addresses in args
// until killed: an A record for wgeDNSName, NXDOMAIN for anything else.
// It reports each query's source as a flow.
func e2eHelperDNSServer(args []string) error {
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
				resp, err := wgeDNSAnswerFor(buf[:n])
				if err != nil {
					fmt.Fprintf(os.Stderr, "dns-server: query from %v: %v\n", from, err)
					continue
				}
				if _, err := pc.WriteTo(resp, from); err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	report.println("ready")
	return <-errc
}

// wgeDNSAnswerFor builds the dns-server role's response to a query.
func wgeDNSAnswerFor(query []byte) ([]byte, error) {
	var p dnsmessage.Parser
	h, err := p.Start(query)
	if err != nil {
		return nil, err
	}
	q, err := p.Question()
	if err != nil {
		return nil, err
	}
	rh := dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true, RecursionDesired: h.RecursionDesired}
	found := strings.EqualFold(q.Name.String(), wgeDNSName) && q.Type == dnsmessage.TypeA && q.Class == dnsmessage.ClassINET
	if !found {
		rh.RCode = dnsmessage.RCodeNameError
	}
	b := dnsmessage.NewBuilder(nil, rh)
	b.EnableCompression()
	if err := b.StartQuestions(); err != nil {
		return nil, err
	}
	if err := b.Question(q); err != nil {
		return nil, err
	}
	if found {
		if err := b.StartAnswers(); err != nil {
			return nil, err
		}
		rr := dnsmessage.ResourceHeader{Name: q.Name, Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET, TTL: 60}
		if err := b.AResource(rr, dnsmessage.AResource{A: wgeDNSAnswer.As4()}); err != nil {
			return nil, err
		}
	}
	return b.Finish()
}

// e2eHelperDNSQuery asks the resolver args[0] for the A records of args[1]
// and prints each answer as "A ADDR" (or "rcode=CODE" if there is none).
// UDP may lose a datagram, so it asks up to five times.
func e2eHelperDNSQuery(args []string) error {
	if len(args) != 2 {
		return errors.New("want SERVER NAME")
	}
	name, err := dnsmessage.NewName(args[1])
	if err != nil {
		return err
	}
	c, err := net.Dial("udp", args[0])
	if err != nil {
		return err
	}
	defer c.Close()
	id := uint16(rand.Uint32())
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: id, RecursionDesired: true})
	if err := b.StartQuestions(); err != nil {
		return err
	}
	if err := b.Question(dnsmessage.Question{Name: name, Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}); err != nil {
		return err
	}
	query, err := b.Finish()
	if err != nil {
		return err
	}
	buf := make([]byte, 65536)
	var lastErr error
	for range 5 {
		if _, err := c.Write(query); err != nil {
			return err
		}
		_ = c.SetReadDeadline(time.Now().Add(time.Second))
		n, err := c.Read(buf)
		if err != nil {
			lastErr = err
			continue
		}
		var m dnsmessage.Message
		if err := m.Unpack(buf[:n]); err != nil {
			return fmt.Errorf("unpack the answer: %w", err)
		}
		if !m.Response || m.ID != id {
			lastErr = fmt.Errorf("a message with ID %d response=%v, want the answer to %d", m.ID, m.Response, id)
			continue
		}
		if len(m.Answers) == 0 {
			fmt.Printf("rcode=%v\n", m.RCode)
			return nil
		}
		for _, a := range m.Answers {
			if r, ok := a.Body.(*dnsmessage.AResource); ok {
				fmt.Printf("A %v\n", netip.AddrFrom4(r.A))
			}
		}
		return nil
	}
	return fmt.Errorf("no answer after 5 tries: %w", lastErr)
}
