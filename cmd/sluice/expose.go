package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/sluice-vpn/sluice/pkg/client"
	"github.com/sluice-vpn/sluice/pkg/expose"
)

// exposeStaleAfter is client.Options.StaleAfter for an agent's tunnel.
const exposeStaleAfter = 10 * time.Second

// exposeFlags are the flags of sluice expose, as typed.
type exposeFlags struct {
	configFile         string
	hostname           string
	to                 string
	labels             []string
	control            string
	port               uint16
	insecureSkipVerify bool
	maxConns           int
	handshakeTimeout   time.Duration
	logLevel           string
}

func newExposeCmd() *cobra.Command {
	var f exposeFlags
	cmd := &cobra.Command{
		Use:   "expose --config FILE --hostname NAME --to URL",
		Short: "Publish a local service through the gateway, with no port open here",
		Long: `Publish a service of this machine through a sluice gateway's edge. expose
joins the gateway as the WireGuard peer of --config, in user space, as an
ordinary user; registers --hostname with the gateway over the tunnel (the
peer's key is its identity); and relays the connections that the gateway's
edge sends through the tunnel to --to. Its listener exists only inside the
tunnel: nothing listens on this machine's interfaces.

--to is http://HOST:PORT or https://HOST:PORT for a web service (the edge
routes requests by Host), or tcp://HOST:PORT for any TCP service (the edge
routes one of its TCP ports, --edge-tcp on the gateway, to it).

Several agents may publish one hostname, from different peers listed for it
in the gateway's configuration; the gateway splits the traffic between them,
by --label if its configuration weights labels. expose keeps its registration
alive and registers again by itself after the gateway or the tunnel was
away; on exit it withdraws it.`,
		Example: `  sluice expose --config laptop.conf --hostname app.example.com --to http://localhost:4000
  sluice expose -c vm.conf --hostname app.example.com --to http://127.0.0.1:8080 --label release=canary
  sluice expose -c db.conf --hostname db.example.com --to tcp://127.0.0.1:5432`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return runExpose(cmd, f) },
	}
	fl := cmd.Flags()
	fl.StringVarP(&f.configFile, "config", "c", "", "the peer's wg-quick configuration `FILE`, as sluice peer add writes it (required)")
	fl.StringVar(&f.hostname, "hostname", "", "the `NAME` the gateway's edge publishes the service under (required)")
	fl.StringVar(&f.to, "to", "", "the local service: http://HOST:PORT, https://HOST:PORT or tcp://HOST:PORT (required)")
	fl.StringArrayVarP(&f.labels, "label", "l", nil, "describe this replica to the gateway with `KEY=VALUE` (repeatable)")
	fl.StringVar(&f.control, "control", "", "the gateway's control API `ADDR:PORT` inside the tunnel (default: the configuration's first DNS server, port 7460)")
	fl.Uint16Var(&f.port, "port", 0, "tunnel `PORT` to listen on (default: a free one)")
	fl.BoolVar(&f.insecureSkipVerify, "insecure-skip-verify", false, "accept any certificate from an https:// service")
	fl.IntVar(&f.maxConns, "max-conns", expose.DefaultMaxConns, "connections relayed at once")
	fl.DurationVar(&f.handshakeTimeout, "handshake-timeout", 30*time.Second, "give up if the first handshake takes longer; 0 waits for ever")
	fl.StringVar(&f.logLevel, "log-level", "info", "log `LEVEL`: debug, info, warn or error")
	cmd.MarkFlagRequired("config")
	cmd.MarkFlagRequired("hostname")
	cmd.MarkFlagRequired("to")
	return cmd
}

// parseLabels reads KEY=VALUE flags.
func parseLabels(in []string) (map[string]string, error) {
	if len(in) == 0 {
		return nil, nil
	}
	labels := map[string]string{}
	for _, s := range in {
		k, v, ok := strings.Cut(s, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("--label %q: want KEY=VALUE", s)
		}
		if _, dup := labels[k]; dup {
			return nil, fmt.Errorf("--label %q: %s given twice", s, k)
		}
		labels[k] = v
	}
	if err := expose.CheckLabels(labels); err != nil {
		return nil, fmt.Errorf("--label: %v", err)
	}
	return labels, nil
}

func runExpose(cmd *cobra.Command, f exposeFlags) error {
	if err := expose.CheckHostname(f.hostname); err != nil {
		return fmt.Errorf("--hostname: %v", err)
	}
	labels, err := parseLabels(f.labels)
	if err != nil {
		return err
	}
	if err := expose.CheckTo(f.to); err != nil {
		return fmt.Errorf("--to %q: %v", f.to, err)
	}
	if f.maxConns < 1 {
		return fmt.Errorf("--max-conns %d: want at least 1", f.maxConns)
	}
	if f.handshakeTimeout < 0 {
		return fmt.Errorf("--handshake-timeout %s is negative", f.handshakeTimeout)
	}
	var control netip.AddrPort
	if f.control != "" {
		if control, err = netip.ParseAddrPort(f.control); err != nil {
			return fmt.Errorf("--control %q: want ADDR:PORT", f.control)
		}
	}
	lvl, err := zapcore.ParseLevel(f.logLevel)
	if err != nil {
		return fmt.Errorf("--log-level %q: want debug, info, warn or error", f.logLevel)
	}
	log := newLogger(lvl)
	defer log.Sync()

	// The agent's tunnel is never idle: it refreshes its lease every
	// couple of seconds. A gateway silent for exposeStaleAfter is gone,
	// or restarted and has forgotten the session, which the client then
	// drops for a fresh handshake instead of waiting out WireGuard's own
	// timers.
	c, err := newTunnel(f.configFile, client.Options{StaleAfter: exposeStaleAfter, Logger: log})
	if err != nil {
		return err
	}
	defer c.Close()
	if !control.IsValid() {
		if control, err = expose.ControlAddr(c.DNSServers()); err != nil {
			return fmt.Errorf("--config %s: %w", f.configFile, err)
		}
	}
	agent, err := expose.New(expose.Options{
		Tunnel:             c,
		Control:            control,
		Hostname:           f.hostname,
		To:                 f.to,
		Labels:             labels,
		Port:               f.port,
		InsecureSkipVerify: f.insecureSkipVerify,
		MaxConns:           f.maxConns,
		Logger:             log,
	})
	if err != nil {
		return err
	}

	ctx := cmd.Context()
	if up, err := upTunnel(ctx, c, f.handshakeTimeout, log); !up {
		return err // nil if interrupted while waiting
	}
	log.Info("publishing", zap.String("hostname", f.hostname), zap.String("to", f.to), zap.Stringer("control", control))
	if err := agent.Run(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}
