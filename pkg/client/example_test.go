package client_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-vpn/sluice/pkg/client"
)

// TestMain builds the world the examples run in, in a directory of its
// own that it makes the working directory: a gateway on loopback, the
// client.conf it would give a new peer, and a web server that the
// gateway's DNS knows as web.sluice.test, on port 8080 of a loopback
// address of its own.
func TestMain(m *testing.M) {
	os.Exit(runWithExampleWorld(m))
}

func runWithExampleWorld(m *testing.M) int {
	l, err := newLab(labOptions{})
	if err != nil {
		fmt.Fprintln(os.Stderr, "example world:", err)
		return 1
	}
	defer l.dns.close()
	defer l.gw.Close()
	web, err := listenExampleWeb()
	if err != nil {
		fmt.Fprintln(os.Stderr, "example world:", err)
		return 1
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from behind the gateway, %s\n", r.URL.Path)
	})}
	go srv.Serve(web)
	defer srv.Close()
	l.dns.set("web.sluice.test", netip.MustParseAddrPort(web.Addr().String()).Addr())

	conf, err := l.addClient()
	if err != nil {
		fmt.Fprintln(os.Stderr, "example world:", err)
		return 1
	}
	dir, err := os.MkdirTemp("", "sluice-client-examples")
	if err != nil {
		fmt.Fprintln(os.Stderr, "example world:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	if err := os.WriteFile(filepath.Join(dir, "client.conf"), []byte(conf.String()), 0o600); err != nil {
		fmt.Fprintln(os.Stderr, "example world:", err)
		return 1
	}
	wd, err := os.Getwd()
	if err != nil {
		fmt.Fprintln(os.Stderr, "example world:", err)
		return 1
	}
	os.Chdir(dir)
	defer os.Chdir(wd)
	return m.Run()
}

// listenExampleWeb listens on port 8080 of some address in 127.0.0.0/8,
// so that the examples can name a fixed URL without colliding with
// whatever else uses 127.0.0.1:8080.
func listenExampleWeb() (net.Listener, error) {
	var err error
	for range 20 {
		a := netip.AddrFrom4([4]byte{127, byte(1 + rand.IntN(254)), byte(1 + rand.IntN(254)), byte(1 + rand.IntN(254))})
		var ln net.Listener
		if ln, err = net.Listen("tcp4", netip.AddrPortFrom(a, 8080).String()); err == nil {
			return ln, nil
		}
	}
	return nil, fmt.Errorf("no loopback address with port 8080 free: %w", err)
}

// Fetching a URL through the tunnel: the name is resolved by the DNS
// server of the configuration, through the tunnel, and the connection
// leaves from the gateway.
func Example() {
	c, err := client.New(client.Options{ConfigFile: "client.conf"})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Up(ctx); err != nil {
		log.Fatal(err)
	}

	resp, err := c.HTTPClient().Get("http://web.sluice.test:8080/hello")
	if err != nil {
		log.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%s: %s", resp.Status, body)
	// Output: 200 OK: hello from behind the gateway, /hello
}

// A program that only makes outgoing connections takes the tunnel by
// swapping its dial function for the client's, and exposes nothing: no
// TUN device, no route, no port of the host's, and nothing listening in
// the tunnel either, so that what comes in through it is refused.
func ExampleClient_DialContext() {
	c, err := client.New(client.Options{ConfigFile: "client.conf"})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Up(ctx); err != nil {
		log.Fatal(err)
	}

	// The one line that moves an existing program's HTTP into the tunnel.
	hc := &http.Client{Transport: &http.Transport{DialContext: c.DialContext}}
	resp, err := hc.Get("http://web.sluice.test:8080/dial")
	if err != nil {
		log.Fatal(err)
	}
	resp.Body.Close()
	fmt.Println("through the tunnel:", resp.Status)

	// Nothing listens on the client's tunnel address.
	own := netip.AddrPortFrom(c.Addrs()[0], 22)
	_, err = c.DialContext(ctx, "tcp", own.String())
	fmt.Println("connecting to", own, "refused:", errors.Is(err, syscall.ECONNREFUSED))
	// Output:
	// through the tunnel: 200 OK
	// connecting to 100.96.0.2:22 refused: true
}

// Listening on the tunnel address: the listener exists only inside the
// tunnel, and who can connect to it is up to the peers. A sluice gateway
// does not route between its peers, so here the client connects to itself.
func ExampleClient_Listen() {
	c, err := client.New(client.Options{ConfigFile: "client.conf"})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	ln, err := c.Listen("tcp", ":8080")
	if err != nil {
		log.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		fmt.Fprintln(w, "served inside the tunnel to", host)
	})}
	go srv.Serve(ln)
	defer srv.Close()
	fmt.Println("listening on", ln.Addr())

	url := "http://" + net.JoinHostPort(c.Addrs()[0].String(), "8080") + "/"
	resp, err := c.HTTPClient().Get(url)
	if err != nil {
		log.Fatal(err)
	}
	defer resp.Body.Close()
	io.Copy(os.Stdout, resp.Body)
	// Output:
	// listening on [::]:8080
	// served inside the tunnel to 100.96.0.2
}
