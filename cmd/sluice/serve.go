package main

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"

	"github.com/spf13/cobra"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/sluice-vpn/sluice/nat"
	"github.com/sluice-vpn/sluice/pkg/gateway"
	"github.com/sluice-vpn/sluice/pkg/service"
	"github.com/sluice-vpn/sluice/pkg/state"
	"github.com/sluice-vpn/sluice/tunnel/kerneltun"
)

// serveFlags are the flags of sluice serve, as typed.
type serveFlags struct {
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

	mtu         int
	egressAddrs []string
	egressPorts string
	shard       string
	allow, deny []string
	logLevel    string
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

With --tun NAME (or --tun-fd N) it serves a kernel TUN device instead.

Either way every TCP and UDP flow and every ping that arrives is terminated
in user space and re-dialled from this host's sockets.`,
		Example: `  sluice serve
  sluice serve --listen :51821 --endpoint vpn.example.com:51821 --state /srv/sluice
  sluice serve --tun sluice0 --egress-ports 40000-49999 --shard 1/4 --allow 10.1.0.0/16:443`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runServe(cmd, f)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.listen, "listen", ":51820", "WireGuard's UDP `[ADDR]:PORT`")
	fl.StringVar(&f.stateDir, "state", "", "state `DIR` (default $STATE_DIRECTORY, else $XDG_STATE_HOME/sluice, else ~/.local/state/sluice; /var/lib/sluice as root)")
	fl.StringVar(&f.endpoint, "endpoint", "", "public `HOST:PORT` written into client configurations (default: a guess)")
	fl.StringArrayVar(&f.dnsUpstream, "dns-upstream", nil, "resolver `ADDR[:PORT]` for clients' DNS queries (repeatable; default: /etc/resolv.conf)")
	fl.StringVar(&f.poolV4, "pool-v4", state.DefaultPools.V4.String(), "IPv4 tunnel address `PREFIX` of a new state")
	fl.StringVar(&f.poolV6, "pool-v6", state.DefaultPools.V6.String(), "IPv6 tunnel address `PREFIX` of a new state")
	fl.StringVar(&f.tun, "tun", "", "serve a new kernel TUN device `NAME` instead of WireGuard")
	fl.IntVar(&f.tunFD, "tun-fd", -1, "serve the already open TUN file descriptor `N` instead of WireGuard")
	fl.IntVar(&f.mtu, "mtu", 1420, "MTU of the tunnel")
	fl.StringArrayVar(&f.egressAddrs, "egress-addr", nil, "local `ADDR` egress sockets bind to, at most one per family (repeatable; default: the kernel's choice)")
	fl.StringVar(&f.egressPorts, "egress-ports", nat.DefaultEgressPorts.String(), "egress port range `LO-HI`, shared by all shards")
	fl.StringVar(&f.shard, "shard", "0/1", "this instance's slice `I/N` of the egress port range")
	fl.StringArrayVar(&f.allow, "allow", nil, "open a destination the default policy denies; `RULE` is [PROTO/]CIDR[:PORTS] (repeatable)")
	fl.StringArrayVar(&f.deny, "deny", nil, "close a destination; `RULE` is [PROTO/]CIDR[:PORTS] (repeatable)")
	fl.StringVar(&f.logLevel, "log-level", "info", "log `LEVEL`: debug, info, warn or error")
	return cmd
}

// gatewayOptions turns the flags shared by both modes into gateway
// options, naming the flag that is wrong.
func (f serveFlags) gatewayOptions() (gateway.Options, error) {
	var o gateway.Options
	if f.mtu < 1280 || f.mtu > 65535 {
		return o, fmt.Errorf("--mtu %d: must be within 1280-65535", f.mtu)
	}
	o.MTU = f.mtu
	for _, s := range f.egressAddrs {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return o, fmt.Errorf("--egress-addr %q: not an IP address", s)
		}
		o.Egress.Addrs = append(o.Egress.Addrs, a)
	}
	ports, err := nat.ParsePortRange(f.egressPorts)
	if err != nil {
		return o, fmt.Errorf("--egress-ports %q: %v", f.egressPorts, err)
	}
	o.Egress.Ports = ports
	if o.Egress.Shard, o.Egress.Shards, err = parseShard(f.shard); err != nil {
		return o, fmt.Errorf("--shard %q: %v", f.shard, err)
	}
	for _, s := range f.allow {
		r, err := nat.ParseRule(s)
		if err != nil {
			return o, fmt.Errorf("--allow %q: %v", s, err)
		}
		o.Policy.Allow = append(o.Policy.Allow, r)
	}
	for _, s := range f.deny {
		r, err := nat.ParseRule(s)
		if err != nil {
			return o, fmt.Errorf("--deny %q: %v", s, err)
		}
		o.Policy.Deny = append(o.Policy.Deny, r)
	}
	return o, nil
}

// serviceOptions turns the WireGuard mode's flags into service options.
func (f serveFlags) serviceOptions(gw gateway.Options) (service.Options, error) {
	o := service.Options{StateDir: f.stateDir, Endpoint: f.endpoint, Gateway: gw}
	host, portStr, err := splitHostPort(f.listen)
	if err != nil {
		return o, fmt.Errorf("--listen %q: %v", f.listen, err)
	}
	if host != "" {
		if o.ListenAddr, err = netip.ParseAddr(host); err != nil {
			return o, fmt.Errorf("--listen %q: %q is not an IP address", f.listen, host)
		}
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port < 1 || port > 65535 {
		return o, fmt.Errorf("--listen %q: port must be within 1-65535", f.listen)
	}
	o.ListenPort = port
	if f.endpoint != "" {
		if _, _, err := splitHostPort(f.endpoint); err != nil {
			return o, fmt.Errorf("--endpoint %q: %v", f.endpoint, err)
		}
	}
	for _, s := range f.dnsUpstream {
		ap, err := netip.ParseAddrPort(s)
		if err != nil {
			a, aerr := netip.ParseAddr(s)
			if aerr != nil {
				return o, fmt.Errorf("--dns-upstream %q: want ADDR or ADDR:PORT", s)
			}
			ap = netip.AddrPortFrom(a, 53)
		}
		o.DNSUpstreams = append(o.DNSUpstreams, ap)
	}
	if o.Pools.V4, err = netip.ParsePrefix(f.poolV4); err != nil || !o.Pools.V4.Addr().Is4() {
		return o, fmt.Errorf("--pool-v4 %q: not an IPv4 prefix", f.poolV4)
	}
	if o.Pools.V6, err = netip.ParsePrefix(f.poolV6); err != nil || !o.Pools.V6.Addr().Is6() {
		return o, fmt.Errorf("--pool-v6 %q: not an IPv6 prefix", f.poolV6)
	}
	return o, nil
}

func splitHostPort(s string) (host, port string, err error) {
	i := strings.LastIndex(s, ":")
	if i < 0 {
		return "", "", errors.New("want HOST:PORT")
	}
	host, port = strings.Trim(s[:i], "[]"), s[i+1:]
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
	log, err := newLogger(f.logLevel)
	if err != nil {
		return err
	}
	defer log.Sync()
	gopts, err := f.gatewayOptions()
	if err != nil {
		return err
	}
	gopts.Logger = log
	if f.tun != "" || f.tunFD >= 0 {
		return serveTUN(cmd, f, gopts, log)
	}
	sopts, err := f.serviceOptions(gopts)
	if err != nil {
		return err
	}
	sopts.Logger = log
	raiseFileLimit(log)

	ctx := cmd.Context()
	svc, err := service.New(ctx, sopts)
	if err != nil {
		return err
	}
	if np := svc.FirstPeer(); np != nil {
		fmt.Fprintf(cmd.OutOrStdout(), "# sluice: no peers yet, so here is a first one, %q.\n", np.Peer.Name)
		fmt.Fprintf(cmd.OutOrStdout(), "# Import it in a WireGuard app (scan the QR code) or save it as a wg-quick file.\n")
		printPeerConfig(cmd.OutOrStdout(), np, true)
	}
	log.Info("state", zap.String("dir", svc.StateDir()))
	return svc.Run(ctx)
}

func serveTUN(cmd *cobra.Command, f serveFlags, opts gateway.Options, log *zap.Logger) (err error) {
	switch {
	case f.tun != "" && f.tunFD >= 0:
		return errors.New("--tun and --tun-fd: give one packet source, not both")
	case f.tunFD >= 0:
		file := os.NewFile(uintptr(f.tunFD), "tun-fd")
		if file == nil {
			return fmt.Errorf("--tun-fd %d: not an open file descriptor", f.tunFD)
		}
		if opts.Device, err = kerneltun.Open(kerneltun.Options{File: file, MTU: f.mtu, Logger: log}); err != nil {
			return fmt.Errorf("--tun-fd %d: %w", f.tunFD, err)
		}
	default:
		if opts.Device, err = kerneltun.Open(kerneltun.Options{Name: f.tun, MTU: f.mtu, Logger: log}); err != nil {
			return fmt.Errorf("--tun %q: %w", f.tun, err)
		}
	}
	raiseFileLimit(log)
	srv, err := gateway.New(opts)
	if err != nil {
		return err
	}
	ctx := cmd.Context()
	if err := srv.Start(ctx); err != nil {
		srv.Close()
		return err
	}
	<-ctx.Done()
	log.Info("shutting down")
	return srv.Close()
}

// raiseFileLimit lifts the soft limit on open files to the hard limit:
// every flow holds an egress socket.
func raiseFileLimit(log *zap.Logger) {
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
	log.Info("open file limit", zap.Uint64("limit", lim.Cur),
		zap.String("note", "each TCP flow holds one egress socket; the hard limit caps the flows"))
}
