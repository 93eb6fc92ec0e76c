package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"github.com/spf13/cobra"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/sys/unix"

	"github.com/sluice-vpn/sluice/nat"
	"github.com/sluice-vpn/sluice/pkg/config"
	"github.com/sluice-vpn/sluice/pkg/service"
	"github.com/sluice-vpn/sluice/tunnel/kerneltun"
)

// serveFlags are the flags of sluice serve, as typed. A flag given on the
// command line overrides the configuration file.
type serveFlags struct {
	configFile string

	// WireGuard mode, the default.
	listen      string
	stateDir    string
	endpoint    string
	dnsUpstream []string
	poolV4      string
	poolV6      string

	// TUN mode.
	tun   string
	tunFD int

	mtu           int
	egressAddrs   []string
	egressPorts   string
	shard         string
	allow, deny   []string
	logLevel      string
	admin         string
	adminInsecure bool

	// The edge, for services that peers publish.
	edgeHTTP, edgeHTTPS string
	edgeCerts, edgeKeys []string
	edgeTCP             []string
}

func newServeCmd() *cobra.Command {
	var f serveFlags
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the gateway",
		Long: `Run the gateway. By default it is a WireGuard server in user space, as an
ordinary user: it listens on UDP 51820, keeps its key and peers in a state
directory, and on its first start creates a peer and prints its
configuration and QR code.

With --tun NAME (or --tun-fd N) it serves a kernel TUN device instead; the
state directory then holds only its lock and the control socket, through
which sluice status and sluice flows reach the gateway as in WireGuard mode.

Either way every TCP and UDP flow and every ping that arrives is terminated
in user space and re-dialled from this host's sockets.

--edge-http, --edge-https and --edge-tcp publish the services that peers
expose with sluice expose: requests to a hostname go through the tunnel to
the agents that registered it. Per-hostname weights, rate limits, client
lists, paths and credentials are set in the configuration file (edge:).

--config FILE reads every option from a YAML file (see sluice config
check); flags override it. SIGHUP re-reads it: policy and limits change at
once, and flows the new policy denies are closed. SIGTERM stops taking new
flows and lets open ones drain for shutdown.grace before closing them; a
second SIGTERM or SIGINT ends sluice at once.`,
		Example: `  sluice serve
  sluice serve --config /etc/sluice/sluice.yaml
  sluice serve --listen :51821 --endpoint vpn.example.com:51821 --state /srv/sluice
  sluice serve --tun sluice0 --egress-ports 40000-49999 --shard 1/4 --allow 10.1.0.0/16:443
  sluice serve --edge-http :80 --edge-https :443 --edge-cert app.pem --edge-key app.key`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runServe(cmd, f)
		},
	}
	d := config.Default()
	fl := cmd.Flags()
	fl.StringVarP(&f.configFile, "config", "c", "", "read the configuration from YAML `FILE`; flags override it")
	fl.StringVar(&f.listen, "listen", d.Listen.String(), "WireGuard's UDP `[ADDR]:PORT`")
	fl.StringVar(&f.stateDir, "state", "", "state `DIR` (default $STATE_DIRECTORY, else $XDG_STATE_HOME/sluice, else ~/.local/state/sluice; /var/lib/sluice as root)")
	fl.StringVar(&f.endpoint, "endpoint", "", "public `HOST:PORT` written into client configurations (default: a guess)")
	fl.StringArrayVar(&f.dnsUpstream, "dns-upstream", nil, "resolver `ADDR[:PORT]` for clients' DNS queries (repeatable; default: /etc/resolv.conf)")
	fl.StringVar(&f.poolV4, "pool-v4", d.Pools.V4.String(), "IPv4 tunnel address `PREFIX` of a new state")
	fl.StringVar(&f.poolV6, "pool-v6", d.Pools.V6.String(), "IPv6 tunnel address `PREFIX` of a new state")
	fl.StringVar(&f.tun, "tun", "", "serve a new kernel TUN device `NAME` instead of WireGuard")
	fl.IntVar(&f.tunFD, "tun-fd", -1, "serve the already open TUN file descriptor `N` instead of WireGuard")
	fl.IntVar(&f.mtu, "mtu", d.MTU, "MTU of the tunnel")
	fl.StringArrayVar(&f.egressAddrs, "egress-addr", nil, "local `ADDR` egress sockets bind to, at most one per family (repeatable; default: the kernel's choice)")
	fl.StringVar(&f.egressPorts, "egress-ports", d.Egress.Ports.String(), "egress port range `LO-HI`, shared by all shards")
	fl.StringVar(&f.shard, "shard", "0/1", "this instance's slice `I/N` of the egress port range")
	fl.StringArrayVar(&f.allow, "allow", nil, "open a destination the default policy denies; `RULE` is [PROTO/]CIDR[:PORTS] (repeatable)")
	fl.StringArrayVar(&f.deny, "deny", nil, "close a destination; `RULE` is [PROTO/]CIDR[:PORTS] (repeatable)")
	fl.StringVar(&f.logLevel, "log-level", "info", "log `LEVEL`: debug, info, warn or error")
	fl.StringVar(&f.admin, "admin", "", "also serve the admin API on TCP `ADDR:PORT` (loopback only, unless --admin-insecure)")
	fl.BoolVar(&f.adminInsecure, "admin-insecure", false, "allow --admin on an address other than loopback (the API is then reachable by others, its token sent in plain text)")
	fl.StringVar(&f.edgeHTTP, "edge-http", "", "publish peers' services (sluice expose) over HTTP on `[ADDR]:PORT`, routed by Host")
	fl.StringVar(&f.edgeHTTPS, "edge-https", "", "publish peers' services over HTTPS on `[ADDR]:PORT`, with --edge-cert and --edge-key")
	fl.StringArrayVar(&f.edgeCerts, "edge-cert", nil, "PEM certificate chain `FILE` for --edge-https, chosen by SNI (repeatable, paired with --edge-key in order)")
	fl.StringArrayVar(&f.edgeKeys, "edge-key", nil, "PEM private key `FILE` of the --edge-cert in the same position (repeatable)")
	fl.StringArrayVar(&f.edgeTCP, "edge-tcp", nil, "publish a peer's TCP service on an edge port: `[ADDR:]PORT=HOSTNAME` (repeatable)")
	return cmd
}

// config reads the configuration file, if any, and lays the flags given on
// the command line over it. Errors name the flag or the file's field.
func (f serveFlags) config(cmd *cobra.Command) (*config.Config, error) {
	c := config.Default()
	if f.configFile != "" {
		var err error
		if c, err = config.Load(f.configFile); err != nil {
			return nil, err
		}
	}
	set := cmd.Flags().Changed
	var err error
	if set("listen") {
		host, portStr, err := splitHostPort(f.listen)
		if err != nil {
			return nil, fmt.Errorf("--listen %q: %v", f.listen, err)
		}
		c.Listen.Addr = netip.Addr{}
		if host != "" {
			if c.Listen.Addr, err = netip.ParseAddr(host); err != nil {
				return nil, fmt.Errorf("--listen %q: %q is not an IP address", f.listen, host)
			}
		}
		port, err := strconv.Atoi(portStr)
		if err != nil || port < 1 || port > 65535 {
			return nil, fmt.Errorf("--listen %q: port must be within 1-65535", f.listen)
		}
		c.Listen.Port = uint16(port)
	}
	if set("state") {
		c.State = f.stateDir
	}
	if set("endpoint") {
		if _, _, err := splitHostPort(f.endpoint); err != nil {
			return nil, fmt.Errorf("--endpoint %q: %v", f.endpoint, err)
		}
		c.Endpoint = f.endpoint
	}
	if set("dns-upstream") {
		c.DNS.Upstreams = nil
		for _, s := range f.dnsUpstream {
			ap, err := netip.ParseAddrPort(s)
			if err != nil {
				a, aerr := netip.ParseAddr(s)
				if aerr != nil {
					return nil, fmt.Errorf("--dns-upstream %q: want ADDR or ADDR:PORT", s)
				}
				ap = netip.AddrPortFrom(a, 53)
			}
			c.DNS.Upstreams = append(c.DNS.Upstreams, ap)
		}
	}
	if set("pool-v4") {
		if c.Pools.V4, err = netip.ParsePrefix(f.poolV4); err != nil || !c.Pools.V4.Addr().Is4() {
			return nil, fmt.Errorf("--pool-v4 %q: not an IPv4 prefix", f.poolV4)
		}
	}
	if set("pool-v6") {
		if c.Pools.V6, err = netip.ParsePrefix(f.poolV6); err != nil || !c.Pools.V6.Addr().Is6() {
			return nil, fmt.Errorf("--pool-v6 %q: not an IPv6 prefix", f.poolV6)
		}
	}
	if set("tun") {
		c.TUN.Name = f.tun
	}
	if set("tun-fd") {
		c.TUN.FD = f.tunFD
	}
	if set("mtu") {
		if f.mtu < 1280 || f.mtu > 65535 {
			return nil, fmt.Errorf("--mtu %d: must be within 1280-65535", f.mtu)
		}
		c.MTU = f.mtu
	}
	if set("egress-addr") {
		c.Egress.Addrs = nil
		for _, s := range f.egressAddrs {
			a, err := netip.ParseAddr(s)
			if err != nil {
				return nil, fmt.Errorf("--egress-addr %q: not an IP address", s)
			}
			c.Egress.Addrs = append(c.Egress.Addrs, a)
		}
	}
	if set("egress-ports") {
		if c.Egress.Ports, err = nat.ParsePortRange(f.egressPorts); err != nil {
			return nil, fmt.Errorf("--egress-ports %q: %v", f.egressPorts, err)
		}
	}
	if set("shard") {
		if c.Egress.Shard, c.Egress.Shards, err = parseShard(f.shard); err != nil {
			return nil, fmt.Errorf("--shard %q: %v", f.shard, err)
		}
	}
	if set("allow") {
		if c.Policy.Allow, err = parseRules("--allow", f.allow); err != nil {
			return nil, err
		}
	}
	if set("deny") {
		if c.Policy.Deny, err = parseRules("--deny", f.deny); err != nil {
			return nil, err
		}
	}
	if set("log-level") {
		if c.Log.Level, err = zapcore.ParseLevel(f.logLevel); err != nil {
			return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", f.logLevel)
		}
	}
	if set("admin") {
		if c.Admin.Listen, err = netip.ParseAddrPort(f.admin); err != nil {
			return nil, fmt.Errorf("--admin %q: want IP:PORT", f.admin)
		}
	}
	if set("admin-insecure") {
		c.Admin.Insecure = f.adminInsecure
	}
	if err := f.edge(c, set); err != nil {
		return nil, err
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return c, nil
}

// edge lays the --edge-* flags over c.Edge.
func (f serveFlags) edge(c *config.Config, set func(string) bool) error {
	listen := func(flag, s string) (config.ListenAddr, error) {
		l, err := config.ParseListenOff(s)
		if err != nil {
			return config.ListenAddr{}, fmt.Errorf("--%s: %v", flag, err)
		}
		return l, nil
	}
	var err error
	if set("edge-http") {
		if c.Edge.HTTP, err = listen("edge-http", f.edgeHTTP); err != nil {
			return err
		}
	}
	if set("edge-https") {
		if c.Edge.HTTPS, err = listen("edge-https", f.edgeHTTPS); err != nil {
			return err
		}
	}
	if set("edge-cert") || set("edge-key") {
		if len(f.edgeCerts) != len(f.edgeKeys) {
			return fmt.Errorf("--edge-cert and --edge-key: %d certificates and %d keys; give them in pairs", len(f.edgeCerts), len(f.edgeKeys))
		}
		c.Edge.Certificates = nil
		for i := range f.edgeCerts {
			c.Edge.Certificates = append(c.Edge.Certificates, config.Certificate{Cert: f.edgeCerts[i], Key: f.edgeKeys[i]})
		}
	}
	if set("edge-tcp") {
		c.Edge.TCP = nil
		for _, s := range f.edgeTCP {
			r, err := config.ParseTCPRoute(s)
			if err != nil {
				return fmt.Errorf("--edge-tcp %q: %v", s, err)
			}
			c.Edge.TCP = append(c.Edge.TCP, r)
		}
	}
	return nil
}

func parseRules(flag string, in []string) ([]nat.Rule, error) {
	var out []nat.Rule
	for _, s := range in {
		r, err := nat.ParseRule(s)
		if err != nil {
			return nil, fmt.Errorf("%s %q: %v", flag, s, err)
		}
		out = append(out, r)
	}
	return out, nil
}

// splitHostPort is net.SplitHostPort that also wants the port.
func splitHostPort(s string) (host, port string, err error) {
	host, port, err = net.SplitHostPort(s)
	if err != nil {
		return "", "", errors.New("want HOST:PORT")
	}
	if port == "" {
		return "", "", errors.New("the port is missing")
	}
	return host, port, nil
}

func parseShard(s string) (i, n int, err error) {
	is, ns, ok := strings.Cut(s, "/")
	if !ok {
		return 0, 0, errors.New("want I/N, for example 0/4")
	}
	if i, err = strconv.Atoi(is); err != nil {
		return 0, 0, fmt.Errorf("shard index %q is not a number", is)
	}
	if n, err = strconv.Atoi(ns); err != nil {
		return 0, 0, fmt.Errorf("shard count %q is not a number", ns)
	}
	if n < 1 || i < 0 || i >= n {
		return 0, 0, fmt.Errorf("want 0 <= I < N, got %d/%d", i, n)
	}
	return i, n, nil
}

func runServe(cmd *cobra.Command, f serveFlags) error {
	conf, err := f.config(cmd)
	if err != nil {
		return err
	}
	log := newLogger(conf.Log.Level)
	defer log.Sync()
	if conf.TUN.Enabled() {
		return serveTUN(cmd, f, conf, log)
	}
	raiseFileLimit(log, conf.Table.MaxFlows)

	ctx := cmd.Context()
	sopts := serviceOptions(cmd, f, conf, log)
	if sopts.Edge, err = conf.EdgeOptions(); err != nil {
		return err
	}
	svc, err := service.New(ctx, sopts)
	if err != nil {
		return err
	}
	if np := svc.FirstPeer(); np != nil {
		fmt.Fprintf(cmd.OutOrStdout(), "# sluice: no peers yet, so here is a first one, %q.\n", np.Peer.Name)
		fmt.Fprintf(cmd.OutOrStdout(), "# Import it in a WireGuard app (scan the QR code) or save it as a wg-quick file.\n")
		printPeerConfig(cmd.OutOrStdout(), np, true)
	}
	return runService(ctx, svc, log)
}

// serviceOptions are the service's options from conf; a reload, on SIGHUP
// or through the admin API, reads the same file and flags again.
func serviceOptions(cmd *cobra.Command, f serveFlags, conf *config.Config, log *zap.Logger) service.Options {
	sopts := conf.ServiceOptions()
	sopts.Logger = log
	sopts.ConfigYAML, _ = config.Marshal(conf.Redacted())
	sopts.Reload = func(context.Context) (service.Reloadable, []byte, error) {
		next, err := f.config(cmd)
		if err != nil {
			return service.Reloadable{}, nil, err
		}
		warnRestart(log, conf, next)
		yaml, err := config.Marshal(next.Redacted())
		return next.Reloadable(), yaml, err
	}
	return sopts
}

// runService runs svc until ctx is done, reloading it on SIGHUP.
func runService(ctx context.Context, svc *service.Service, log *zap.Logger) error {
	log.Info("state", zap.String("dir", svc.StateDir()))
	stop := onHangup(ctx, func() {
		if err := svc.Reload(ctx); err != nil {
			log.Error("reload rejected; the running configuration stays", zap.Error(err))
		}
	})
	defer stop()
	return svc.Run(ctx)
}

// onHangup calls reload on every SIGHUP until ctx is done; stop ends it.
func onHangup(ctx context.Context, reload func()) (stop func()) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-hup:
				reload()
			case <-ctx.Done():
				return
			}
		}
	}()
	return func() {
		signal.Stop(hup)
		<-done
	}
}

// warnRestart says when a reload changes settings it cannot apply.
func warnRestart(log *zap.Logger, old, next *config.Config) {
	a, b := old.Clone(), next.Clone()
	a.Policy, b.Policy = config.Policy{}, config.Policy{}
	a.Edge.Hostnames, b.Edge.Hostnames = nil, nil
	a.Edge.OnlyListed, b.Edge.OnlyListed = false, false
	ya, _ := config.Marshal(a)
	yb, _ := config.Marshal(b)
	if string(ya) != string(yb) {
		log.Warn("the new configuration changes settings other than the policy, the limits and the edge's hostnames; they apply at the next restart")
	}
}

// serveTUN serves a kernel TUN device through the same service as
// WireGuard mode (the state directory's lock and control socket, --admin,
// metrics, reload, drain on shutdown); only the packet source differs.
func serveTUN(cmd *cobra.Command, f serveFlags, conf *config.Config, log *zap.Logger) (err error) {
	sopts := serviceOptions(cmd, f, conf, log)
	if conf.TUN.FD >= 0 {
		file := os.NewFile(uintptr(conf.TUN.FD), "tun-fd")
		if file == nil {
			return fmt.Errorf("--tun-fd %d: not an open file descriptor", conf.TUN.FD)
		}
		if sopts.Device, err = kerneltun.Open(kerneltun.Options{File: file, MTU: conf.MTU, VirtioNetHdr: true, Logger: log}); err != nil {
			return fmt.Errorf("--tun-fd %d: %w", conf.TUN.FD, err)
		}
	} else if sopts.Device, err = kerneltun.Open(kerneltun.Options{Name: conf.TUN.Name, MTU: conf.MTU, VirtioNetHdr: true, Logger: log}); err != nil {
		return fmt.Errorf("--tun %q: %w", conf.TUN.Name, err)
	}
	raiseFileLimit(log, conf.Table.MaxFlows)
	// The service owns the device from here, and closes it if New fails.
	svc, err := service.New(cmd.Context(), sopts)
	if err != nil {
		return err
	}
	return runService(cmd.Context(), svc, log)
}

// raiseFileLimit lifts the soft limit on open files to the hard limit:
// every TCP flow holds an egress socket, so the limit, not the table, may
// be what caps the flows; then it says so.
func raiseFileLimit(log *zap.Logger, maxFlows int) {
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		return
	}
	if lim.Cur < lim.Max {
		lim.Cur = lim.Max
		if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
			log.Warn("cannot raise the open file limit", zap.Error(err))
			return
		}
	}
	// A few hundred descriptors go to everything but flows.
	const reserve = 256
	if lim.Cur < uint64(maxFlows)+reserve {
		log.Warn("the open file limit caps the TCP flows below the table's size: each holds an egress socket",
			zap.Uint64("limit", lim.Cur), zap.Uint64("tcp_flows_at_most", lim.Cur-min(lim.Cur, reserve)),
			zap.Int("table_max_flows", maxFlows))
		return
	}
	log.Info("open file limit", zap.Uint64("limit", lim.Cur))
}
