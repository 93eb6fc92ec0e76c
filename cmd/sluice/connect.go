package main

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/sluice-vpn/sluice/pkg/client"
	"github.com/sluice-vpn/sluice/pkg/proxy"
)

// proxyAuthEnv is where --proxy-auth is read from when the flag is not
// given, so that the password need not appear in the process list.
const proxyAuthEnv = "SLUICE_PROXY_AUTH"

// connectFlags are the flags of sluice connect, as typed.
type connectFlags struct {
	configFile       string
	socks5           string
	httpProxy        string
	proxyAuth        string
	proxyInsecure    bool
	handshakeTimeout time.Duration
	maxConns         int
	logLevel         string
}

func newConnectCmd() *cobra.Command {
	var f connectFlags
	cmd := &cobra.Command{
		Use:   "connect --config FILE [-- COMMAND [ARG...]]",
		Short: "Bring a WireGuard tunnel up in user space and serve SOCKS5 and HTTP proxies into it",
		Long: `Bring up the WireGuard tunnel that a wg-quick configuration describes, in
user space, as an ordinary user: no TUN device, no routes, nothing changes on
the host. Programs reach the tunnel through a SOCKS5 proxy (CONNECT and UDP
ASSOCIATE) and an HTTP proxy (CONNECT and plain requests) on loopback. Names
are resolved by the DNS servers of the configuration, through the tunnel.

connect waits for the first handshake (--handshake-timeout), then serves
until it is interrupted. It repeats handshakes by itself; when the peer stops
answering it resolves the peer's endpoint name again and opens new sockets.

With a command after --, connect runs it with ALL_PROXY, HTTPS_PROXY and
HTTP_PROXY (and their lower-case forms) pointing at the proxies, on ports of
their own unless --socks5 or --http-proxy say otherwise, and exits with its
exit status.

The proxies listen on loopback only: anyone who can reach them uses the
tunnel as you. --proxy-insecure allows other addresses; set --proxy-auth then.`,
		Example: `  sluice connect --config client.conf
  sluice connect -c client.conf --socks5 127.0.0.1:1081 --http-proxy ""
  SLUICE_PROXY_AUTH=me:secret sluice connect -c client.conf
  sluice connect -c client.conf -- curl https://internal.example/`,
		Args: cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if n := cmd.ArgsLenAtDash(); n > 0 {
				return fmt.Errorf("unexpected %q: put the command to run after --", args[0])
			}
			return runConnect(cmd, f, args)
		},
	}
	fl := cmd.Flags()
	fl.StringVarP(&f.configFile, "config", "c", "", "the tunnel's wg-quick configuration `FILE` (required)")
	fl.StringVar(&f.socks5, "socks5", "127.0.0.1:1080", "serve the SOCKS5 proxy on `ADDR:PORT`; empty: no SOCKS5 proxy")
	fl.StringVar(&f.httpProxy, "http-proxy", "127.0.0.1:8080", "serve the HTTP proxy on `ADDR:PORT`; empty: no HTTP proxy")
	fl.StringVar(&f.proxyAuth, "proxy-auth", "", "require `USER:PASSWORD` of the proxies' clients (default $"+proxyAuthEnv+")")
	fl.BoolVar(&f.proxyInsecure, "proxy-insecure", false, "allow the proxies on addresses other than loopback")
	fl.DurationVar(&f.handshakeTimeout, "handshake-timeout", 30*time.Second, "give up if the first handshake takes longer; 0 waits for ever")
	fl.IntVar(&f.maxConns, "max-conns", proxy.DefaultMaxConns, "proxy clients served at once, per proxy")
	fl.StringVar(&f.logLevel, "log-level", "info", "log `LEVEL`: debug, info, warn or error (warn while running a command)")
	cmd.MarkFlagRequired("config")
	return cmd
}

// listenAddr checks a proxy's listening address: loopback, unless
// --proxy-insecure. Empty means the proxy is off.
func (f connectFlags) listenAddr(flag, addr string) error {
	if addr == "" {
		return nil
	}
	host, _, err := splitHostPort(addr)
	if err != nil {
		return fmt.Errorf("--%s %q: %v", flag, addr, err)
	}
	if f.proxyInsecure || host == "localhost" {
		return nil
	}
	if a, err := netip.ParseAddr(host); err != nil || !a.IsLoopback() {
		return fmt.Errorf("--%s %q: not a loopback address, and anyone who can reach the proxy uses your tunnel; pass --proxy-insecure to allow it (with --proxy-auth)", flag, addr)
	}
	return nil
}

// credentials parses --proxy-auth, or $SLUICE_PROXY_AUTH.
func (f connectFlags) credentials(cmd *cobra.Command) (*proxy.Credentials, error) {
	auth, from := f.proxyAuth, "--proxy-auth"
	if !cmd.Flags().Changed("proxy-auth") {
		auth, from = os.Getenv(proxyAuthEnv), "$"+proxyAuthEnv
	}
	if auth == "" {
		return nil, nil
	}
	user, pass, ok := strings.Cut(auth, ":")
	if !ok || user == "" {
		return nil, fmt.Errorf("%s: want USER:PASSWORD", from)
	}
	return &proxy.Credentials{Username: user, Password: pass}, nil
}

func runConnect(cmd *cobra.Command, f connectFlags, argv []string) error {
	set := cmd.Flags().Changed
	runs := len(argv) > 0
	if runs {
		// A command gets proxies of its own unless told otherwise, so
		// that it does not collide with a connect that is serving.
		if !set("socks5") {
			f.socks5 = "127.0.0.1:0"
		}
		if !set("http-proxy") {
			f.httpProxy = "127.0.0.1:0"
		}
		if !set("log-level") {
			f.logLevel = "warn"
		}
	}
	if err := f.listenAddr("socks5", f.socks5); err != nil {
		return err
	}
	if err := f.listenAddr("http-proxy", f.httpProxy); err != nil {
		return err
	}
	if f.socks5 == "" && f.httpProxy == "" {
		return errors.New("--socks5 and --http-proxy are both empty: there would be no way into the tunnel")
	}
	if f.maxConns < 1 {
		return fmt.Errorf("--max-conns %d: want at least 1", f.maxConns)
	}
	if f.handshakeTimeout < 0 {
		return fmt.Errorf("--handshake-timeout %s is negative", f.handshakeTimeout)
	}
	creds, err := f.credentials(cmd)
	if err != nil {
		return err
	}
	lvl, err := zapcore.ParseLevel(f.logLevel)
	if err != nil {
		return fmt.Errorf("--log-level %q: want debug, info, warn or error", f.logLevel)
	}
	log := newLogger(lvl)
	defer log.Sync()
	if f.proxyInsecure && creds == nil {
		log.Warn("--proxy-insecure without --proxy-auth: whoever reaches the proxies uses your tunnel")
	}

	c, err := newTunnel(f.configFile, client.Options{Logger: log})
	if err != nil {
		return err
	}
	defer c.Close()
	ctx := cmd.Context()
	if up, err := upTunnel(ctx, c, f.handshakeTimeout, log); !up {
		return err // nil if interrupted while waiting
	}

	px, err := startProxies(c, f, creds, log)
	if err != nil {
		return err
	}
	defer px.close()
	if runs {
		return runWithProxies(cmd, argv, px.env())
	}
	out := cmd.OutOrStdout()
	if px.socksAddr != nil {
		fmt.Fprintf(out, "SOCKS5 proxy: socks5h://%s\n", px.socksAddr)
	}
	if px.httpAddr != nil {
		fmt.Fprintf(out, "HTTP proxy:   http://%s\n", px.httpAddr)
	}
	select {
	case <-ctx.Done():
		log.Info("shutting down")
		return nil
	case err := <-px.failed:
		return err
	}
}

// proxies are the running proxy servers.
type proxies struct {
	socks     *proxy.SOCKS5Server
	http      *proxy.HTTPServer
	socksAddr net.Addr
	httpAddr  net.Addr
	creds     *proxy.Credentials
	failed    chan error // a listener that stopped by itself
	wg        sync.WaitGroup
}

func startProxies(c *client.Client, f connectFlags, creds *proxy.Credentials, log *zap.Logger) (px *proxies, err error) {
	px = &proxies{creds: creds, failed: make(chan error, 2)}
	defer func() {
		if err != nil {
			px.close()
		}
	}()
	serve := func(name string, ln net.Listener, s interface{ Serve(net.Listener) error }) {
		px.wg.Add(1)
		go func() {
			defer px.wg.Done()
			if err := s.Serve(ln); !errors.Is(err, proxy.ErrServerClosed) {
				px.failed <- fmt.Errorf("%s proxy: %w", name, err)
			}
		}()
		log.Info(name+" proxy listening", zap.Stringer("addr", ln.Addr()))
	}
	if f.socks5 != "" {
		if px.socks, err = proxy.NewSOCKS5(proxy.SOCKS5Options{Dialer: c, Credentials: creds, MaxConns: f.maxConns, Logger: log}); err != nil {
			return nil, err
		}
		ln, err := net.Listen("tcp", f.socks5)
		if err != nil {
			return nil, fmt.Errorf("--socks5: %w", err)
		}
		px.socksAddr = ln.Addr()
		serve("SOCKS5", ln, px.socks)
	}
	if f.httpProxy != "" {
		if px.http, err = proxy.NewHTTP(proxy.HTTPOptions{Dialer: c, Credentials: creds, MaxConns: f.maxConns, Logger: log}); err != nil {
			return nil, err
		}
		ln, err := net.Listen("tcp", f.httpProxy)
		if err != nil {
			return nil, fmt.Errorf("--http-proxy: %w", err)
		}
		px.httpAddr = ln.Addr()
		serve("HTTP", ln, px.http)
	}
	return px, nil
}

func (px *proxies) close() {
	if px.socks != nil {
		px.socks.Close()
	}
	if px.http != nil {
		px.http.Close()
	}
	px.wg.Wait()
}

// env is the environment that sends a command's traffic to the proxies:
// ALL_PROXY to SOCKS5 with names resolved by the proxy (socks5h), the
// HTTP variables to the HTTP proxy, each in upper and lower case since
// programs disagree on which they read.
func (px *proxies) env() []string {
	userinfo := ""
	if px.creds != nil {
		userinfo = url.UserPassword(px.creds.Username, px.creds.Password).String() + "@"
	}
	var env []string
	set := func(name, value string) {
		env = append(env, name+"="+value, strings.ToLower(name)+"="+value)
	}
	all := ""
	if px.httpAddr != nil {
		all = "http://" + userinfo + px.httpAddr.String()
		set("HTTP_PROXY", all)
		set("HTTPS_PROXY", all)
	}
	if px.socksAddr != nil {
		all = "socks5h://" + userinfo + px.socksAddr.String()
	}
	set("ALL_PROXY", all)
	return env
}

// exitStatus is the exit status of the command connect ran. main exits
// with it and prints nothing: the command has spoken for itself.
type exitStatus int

func (e exitStatus) Error() string { return fmt.Sprintf("the command exited with status %d", int(e)) }

// ExitStatus is what main exits with.
func (e exitStatus) ExitStatus() int { return int(e) }

// runWithProxies runs argv with env added to sluice's own, and returns
// its exit status as an exitStatus. An interrupt for sluice is passed on
// as SIGTERM; connect waits for the command to end.
func runWithProxies(cmd *cobra.Command, argv []string, env []string) error {
	c := exec.Command(argv[0], argv[1:]...)
	c.Env = append(os.Environ(), env...) // later entries win
	c.Stdin, c.Stdout, c.Stderr = cmd.InOrStdin(), cmd.OutOrStdout(), cmd.ErrOrStderr()
	if err := c.Start(); err != nil {
		return err
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		select {
		case <-cmd.Context().Done():
			c.Process.Signal(syscall.SIGTERM)
		case <-done:
		}
	}()
	err := c.Wait()
	close(done)
	wg.Wait()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return exitStatus(128 + int(ws.Signal()))
		}
		return exitStatus(ee.ExitCode())
	}
	return err
}
