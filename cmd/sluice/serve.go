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
	"github.com/sluice-vpn/sluice/tunnel/kerneltun"
)

// serveFlags are the flags of sluice serve, as typed.
type serveFlags struct {
	tun         string
	tunFD       int
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
		Long: `Run the gateway on a packet source: a kernel TUN device that sluice creates
(--tun NAME) or one handed in as an open file descriptor (--tun-fd N).
Every TCP and UDP flow and every ping that arrives on it is terminated in
user space and re-dialled from this host's sockets.`,
		Example: `  sluice serve --tun sluice0
  sluice serve --tun sluice0 --egress-ports 40000-49999 --shard 1/4 --allow 10.1.0.0/16:443`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runServe(cmd, f)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.tun, "tun", "", "create the kernel TUN device `NAME` and serve it")
	fl.IntVar(&f.tunFD, "tun-fd", -1, "serve the already open TUN file descriptor `N`")
	fl.IntVar(&f.mtu, "mtu", 1420, "MTU of the TUN device")
	fl.StringArrayVar(&f.egressAddrs, "egress-addr", nil, "local `ADDR` egress sockets bind to, at most one per family (repeatable; default: the kernel's choice)")
	fl.StringVar(&f.egressPorts, "egress-ports", nat.DefaultEgressPorts.String(), "egress port range `LO-HI`, shared by all shards")
	fl.StringVar(&f.shard, "shard", "0/1", "this instance's slice `I/N` of the egress port range")
	fl.StringArrayVar(&f.allow, "allow", nil, "open a destination the default policy denies; `RULE` is [PROTO/]CIDR[:PORTS] (repeatable)")
	fl.StringArrayVar(&f.deny, "deny", nil, "close a destination; `RULE` is [PROTO/]CIDR[:PORTS] (repeatable)")
	fl.StringVar(&f.logLevel, "log-level", "info", "log `LEVEL`: debug, info, warn or error")
	return cmd
}

// gatewayOptions turns the flags into gateway options, naming the flag
// that is wrong.
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
	opts, err := f.gatewayOptions()
	if err != nil {
		return err
	}
	opts.Logger = log
	raiseFileLimit(log)

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
	case f.tun != "":
		if opts.Device, err = kerneltun.Open(kerneltun.Options{Name: f.tun, MTU: f.mtu, Logger: log}); err != nil {
			return fmt.Errorf("--tun %q: %w", f.tun, err)
		}
	default:
		return errors.New("no packet source: give --tun NAME (needs CAP_NET_ADMIN) or --tun-fd N")
	}

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
