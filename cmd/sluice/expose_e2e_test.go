//go:build linux

package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sluice-vpn/sluice/pkg/admin"
)

// The expose end-to-end topology, three namespaces that the test creates:
//
//	O (origin)   o-g ──veth── g-o   G (sluice serve)   g-c ──veth── c-g   C (client)
//	10.89.1.2                 10.89.1.1   10.89.2.1                 10.89.2.2
//	an HTTP service on         WireGuard   the edge's
//	127.0.0.1 only; a          UDP 51820   HTTP and HTTPS
//	firewall that lets out
//	only UDP to the gateway
//
// O publishes its service with sluice expose, as a WireGuard peer of G in
// user space; C reaches it with curl at G's edge address. G has no route
// to O's service: O listens on loopback, and O's firewall drops every
// packet that is not WireGuard to or from G.
const (
	xeOrigin     = "10.89.1.2"
	xeGatewayO   = "10.89.1.1"
	xeGatewayC   = "10.89.2.1"
	xeClient     = "10.89.2.2"
	xeWGPort     = 51820
	xeOriginPort = 8000
	xeHostname   = "app.e2e.test"
)

func TestExposeEndToEnd(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("expose end-to-end: needs root to create network namespaces; skipping")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("expose end-to-end: iproute2's ip command is not installed; skipping")
	}
	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Skip("expose end-to-end: curl is not installed (make deps installs it); skipping")
	}
	bin := e2eBuildSluice(t)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	t.Cleanup(cancel)
	o, g, c := newExposeTopology(t, ctx)
	tmp := t.TempDir()
	stateDir := filepath.Join(tmp, "state")
	certFile, keyFile, caFile := xeWriteCerts(t, tmp, xeHostname)

	// The origin's firewall: WireGuard to and from the gateway, and
	// loopback; nothing else in or out.
	if _, err := exec.LookPath("iptables"); err != nil {
		t.Skip("expose end-to-end: iptables is not installed (make deps installs it) for the origin's firewall; skipping")
	}
	{
		for _, rule := range [][]string{
			{"-A", "INPUT", "-i", "lo", "-j", "ACCEPT"},
			{"-A", "INPUT", "-p", "udp", "-s", xeGatewayO, "--sport", strconv.Itoa(xeWGPort), "-j", "ACCEPT"},
			{"-P", "INPUT", "DROP"},
			{"-A", "OUTPUT", "-o", "lo", "-j", "ACCEPT"},
			{"-A", "OUTPUT", "-p", "udp", "-d", xeGatewayO, "--dport", strconv.Itoa(xeWGPort), "-j", "ACCEPT"},
			{"-P", "OUTPUT", "DROP"},
		} {
			if out, err := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", o, "iptables"}, rule...)...).CombinedOutput(); err != nil {
				t.Fatalf("iptables %s in the origin namespace: %v: %s", strings.Join(rule, " "), err, out)
			}
		}
	}

	// The service also listens on the origin's own address: only the
	// firewall keeps the gateway's namespace from reaching it directly.
	originSrv := e2eStartHelper(t, o, "expose-origin",
		net.JoinHostPort("127.0.0.1", strconv.Itoa(xeOriginPort)), net.JoinHostPort(xeOrigin, strconv.Itoa(xeOriginPort)))
	originSrv.waitReady(t, 10*time.Second)

	gw := e2eStartSluice(t, g, bin, "serve",
		"--state", stateDir,
		"--listen", fmt.Sprintf(":%d", xeWGPort),
		"--endpoint", net.JoinHostPort(xeGatewayO, strconv.Itoa(xeWGPort)),
		"--dns-upstream", "127.0.0.1:53", // never asked: nothing here resolves names
		"--edge-http", xeGatewayC+":80",
		"--edge-https", xeGatewayC+":443", "--edge-cert", certFile, "--edge-key", keyFile,
		"--log-level", "debug")
	wgeWaitControlSocket(t, gw, filepath.Join(stateDir, "sluice.sock"), 20*time.Second)

	out, stderr, _, err := wgeSluice(ctx, g, 10*time.Second, bin, "peer", "add", "origin", "--state", stateDir)
	if err != nil {
		t.Fatalf("sluice peer add: %v: %s", err, stderr)
	}
	confFile := filepath.Join(tmp, "origin.conf")
	if err := os.WriteFile(confFile, out, 0o600); err != nil {
		t.Fatal(err)
	}
	agent := e2eStartSluice(t, o, bin, "expose", "--config", confFile,
		"--hostname", xeHostname, "--to", fmt.Sprintf("http://127.0.0.1:%d", xeOriginPort),
		"--label", "release=stable", "--log-level", "debug")

	// The gateway lists the service once the agent has registered.
	var svcs []admin.ServiceInfo
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, stderr, _, err := wgeSluice(ctx, g, 10*time.Second, bin, "services", "--state", stateDir, "-o", "json")
		if err != nil {
			t.Fatalf("sluice services: %v: %s", err, stderr)
		}
		if err := json.Unmarshal(out, &svcs); err != nil {
			t.Fatalf("sluice services -o json: %v\n%s", err, out)
		}
		if len(svcs) == 1 && len(svcs[0].Replicas) == 1 && svcs[0].Replicas[0].Healthy {
			break
		}
		select {
		case <-agent.exited:
			t.Fatalf("sluice expose exited: %v\n%s", agent.waitErr, agent.stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("the agent never registered: %+v\nagent:\n%s", svcs, agent.stderr.String())
		}
		time.Sleep(200 * time.Millisecond)
	}
	rep := svcs[0].Replicas[0]
	if svcs[0].Hostname != xeHostname || rep.Peer != "origin" || rep.Labels["release"] != "stable" {
		t.Errorf("services: %+v", svcs)
	}
	table, _, _, _ := wgeSluice(ctx, g, 10*time.Second, bin, "services", "--state", stateDir)
	t.Logf("sluice services:\n%s", table)

	blobSum := sha256.Sum256(e2eBlob())
	t.Run("HTTP", func(t *testing.T) {
		body := xeCurl(t, ctx, c, curl, "--resolve", xeHostname+":80:"+xeGatewayC, "http://"+xeHostname+"/whoami")
		want := fmt.Sprintf("xff=%s proto=http host=%s", xeClient, xeHostname)
		if body != want {
			t.Errorf("the origin saw %q, want %q", body, want)
		}
		blob := xeCurl(t, ctx, c, curl, "--resolve", xeHostname+":80:"+xeGatewayC, "http://"+xeHostname+"/blob")
		if sum := sha256.Sum256([]byte(blob)); sum != blobSum {
			t.Errorf("the blob through the edge (%d bytes) differs from the origin's, sha256 %s", len(blob), hex.EncodeToString(sum[:8]))
		}
	})
	t.Run("HTTPS", func(t *testing.T) {
		body := xeCurl(t, ctx, c, curl, "--cacert", caFile, "--resolve", xeHostname+":443:"+xeGatewayC, "https://"+xeHostname+"/whoami")
		want := fmt.Sprintf("xff=%s proto=https host=%s", xeClient, xeHostname)
		if body != want {
			t.Errorf("the origin saw %q, want %q", body, want)
		}
	})
	t.Run("UnknownHost", func(t *testing.T) {
		out, _, _, err := e2eRunTool(ctx, c, 15*time.Second, curl, "-sS", "-o", "/dev/null", "-w", "%{http_code}",
			"--resolve", "other.e2e.test:80:"+xeGatewayC, "http://other.e2e.test/")
		if err != nil || string(out) != "404" {
			t.Errorf("an unknown hostname: %q, %v; want 404", out, err)
		}
	})
	t.Run("NoPortOnOrigin", func(t *testing.T) {
		// Nothing in O listens but the service itself: the agent's
		// listener is inside the tunnel.
		out, _, _, err := e2eRunTool(ctx, o, 10*time.Second, "ss", "-Htln")
		if err != nil {
			t.Skipf("ss: %v", err)
		}
		service := map[string]bool{
			fmt.Sprintf("127.0.0.1:%d", xeOriginPort):    true,
			fmt.Sprintf("%s:%d", xeOrigin, xeOriginPort): true,
		}
		for _, line := range e2eNonEmptyLines(string(out)) {
			f := strings.Fields(line)
			if len(f) >= 4 && !service[f[3]] {
				t.Errorf("something besides the service listens in the origin namespace: %s", line)
			}
		}
		// And the gateway cannot reach the service directly, though it
		// listens on the origin's address: the firewall lets nothing in.
		if _, _, _, err := e2eRunTool(ctx, g, 10*time.Second, curl, "-sS", "--max-time", "2",
			fmt.Sprintf("http://%s:%d/whoami", xeOrigin, xeOriginPort)); err == nil {
			t.Error("the gateway namespace reached the origin's service directly")
		}
	})
	if t.Failed() {
		t.Logf("agent stderr:\n%s", agent.stderr.String())
	}
}

// xeCurl runs curl in ns and returns the body of a 200 answer.
func xeCurl(t *testing.T, ctx context.Context, ns, curl string, args ...string) string {
	t.Helper()
	argv := append([]string{curl, "-sS", "--fail-with-body", "--max-time", "15"}, args...)
	out, stderr, elapsed, err := e2eRunTool(ctx, ns, 20*time.Second, argv...)
	if err != nil {
		t.Fatalf("curl %s: %v after %v: %s %s", strings.Join(args, " "), err, elapsed, stderr, out)
	}
	return string(out)
}

func newExposeTopology(t *testing.T, ctx context.Context) (o, g, c string) {
	t.Helper()
	e2eRemoveStaleNamespaces(t, ctx)
	pid := os.Getpid()
	o, g, c = fmt.Sprintf("sxo-%d", pid), fmt.Sprintf("sxg-%d", pid), fmt.Sprintf("sxc-%d", pid)
	for _, ns := range []string{o, g, c} {
		e2eIP(t, ctx, "netns", "add", ns)
		t.Cleanup(func() {
			if out, err := exec.Command("ip", "netns", "del", ns).CombinedOutput(); err != nil {
				t.Errorf("delete namespace %s: %v: %s", ns, err, out)
			}
		})
		e2eIP(t, ctx, "-n", ns, "link", "set", "lo", "up")
	}
	e2eIP(t, ctx, "-n", g, "link", "add", "g-o", "type", "veth", "peer", "name", "o-g", "netns", o)
	e2eIP(t, ctx, "-n", g, "link", "add", "g-c", "type", "veth", "peer", "name", "c-g", "netns", c)
	e2eIP(t, ctx, "-n", o, "addr", "add", xeOrigin+"/24", "dev", "o-g")
	e2eIP(t, ctx, "-n", g, "addr", "add", xeGatewayO+"/24", "dev", "g-o")
	e2eIP(t, ctx, "-n", g, "addr", "add", xeGatewayC+"/24", "dev", "g-c")
	e2eIP(t, ctx, "-n", c, "addr", "add", xeClient+"/24", "dev", "c-g")
	veths := []struct{ ns, dev string }{{o, "o-g"}, {g, "g-o"}, {g, "g-c"}, {c, "c-g"}}
	for _, l := range veths {
		e2eIP(t, ctx, "-n", l.ns, "link", "set", l.dev, "up")
	}
	for _, l := range veths {
		e2eWaitOperUp(t, ctx, l.ns, l.dev, 5*time.Second)
	}
	return o, g, c
}

// xeWriteCerts writes a test CA and a certificate for host that it
// signed, as PEM files.
func xeWriteCerts(t *testing.T, dir, host string) (certFile, keyFile, caFile string) {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "sluice e2e test CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: host}, DNSNames: []string{host},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	write := func(name, typ string, der []byte) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	return write("cert.pem", "CERTIFICATE", leafDER), write("key.pem", "PRIVATE KEY", keyDER), write("ca.pem", "CERTIFICATE", caDER)
}

// e2eHelperExposeOrigin serves, on the addresses in args, /whoami (what
// the origin learns of the client from the edge's headers) and /blob.
func e2eHelperExposeOrigin(args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("want ADDR:PORT..., have %q", args)
	}
	blob := e2eBlob()
	mux := http.NewServeMux()
	mux.HandleFunc("/whoami", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "xff=%s proto=%s host=%s", r.Header.Get("X-Forwarded-For"), r.Header.Get("X-Forwarded-Proto"), r.Host)
	})
	mux.HandleFunc("/blob", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Write(blob)
	})
	errc := make(chan error, len(args))
	for _, a := range args {
		ln, err := net.Listen("tcp", a)
		if err != nil {
			return err
		}
		go func() { errc <- (&http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}).Serve(ln) }()
	}
	fmt.Println("ready")
	return <-errc
}
