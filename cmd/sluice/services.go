package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/crypto/bcrypt"

	"github.com/sluice-vpn/sluice/pkg/admin"
	"github.com/sluice-vpn/sluice/pkg/edge"
)

func newServicesCmd() *cobra.Command {
	var t target
	var output string
	cmd := &cobra.Command{
		Use:   "services",
		Short: "List the hostnames that peers publish through the edge, with their replicas",
		Long: `List the hostnames that peers publish (sluice expose) through the running
gateway's edge: for each, the replicas that serve it, with their peer, tunnel
address, labels, share of the traffic and health. A replica is unhealthy
for a few seconds after a failed connection attempt; one whose agent stops
renewing its registration is dropped when the lease runs out.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			c, err := t.client()
			if err != nil {
				return err
			}
			svcs, err := c.Services(cmd.Context())
			if err != nil {
				return err
			}
			if output == "json" {
				return writeJSON(cmd.OutOrStdout(), svcs)
			}
			printServices(cmd.OutOrStdout(), svcs, time.Now())
			return nil
		},
	}
	t.flags(cmd)
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output `FORMAT`: table or json")
	return cmd
}

func printServices(w io.Writer, svcs []admin.ServiceInfo, now time.Time) {
	if len(svcs) == 0 {
		fmt.Fprintln(w, "no services: publish one with sluice expose, on a gateway started with --edge-http, --edge-https or --edge-tcp")
		return
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "HOSTNAME\tPROTOCOL\tPEER\tADDRESS\tLABELS\tWEIGHT\tHEALTH\tLAST SEEN")
	for _, s := range svcs {
		if len(s.Replicas) == 0 {
			health, peer := "no replica", "-"
			if s.HeldBy != "" {
				health = fmt.Sprintf("no replica; held for %s", s.HeldUntil.Sub(now).Round(time.Second))
				peer = s.HeldBy
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t-\t-\t-\t%s\t-\n", s.Hostname, orDash(s.Protocol), peer, health)
			continue
		}
		for _, r := range s.Replicas {
			health := "healthy"
			switch {
			case r.OriginDown:
				// The agent's own word, fresher than the edge's
				// last failed attempt.
				health = "unhealthy: the agent cannot reach its origin"
			case !r.Healthy:
				health = "unhealthy"
				if r.LastError != "" {
					health += ": " + r.LastError
				}
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s ago\n", s.Hostname, r.Protocol, r.Peer, r.Addr,
				orDash(formatLabels(r.Labels)), r.Weight, health, now.Sub(r.LastSeen).Round(100*time.Millisecond))
		}
	}
	tw.Flush()
}

func formatLabels(labels map[string]string) string {
	parts := make([]string, 0, len(labels))
	for _, k := range slices.Sorted(maps.Keys(labels)) {
		parts = append(parts, k+"="+labels[k])
	}
	return strings.Join(parts, ",")
}

func newEdgeCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "edge",
		Short: "Helpers for the edge's configuration",
	}
	cmd.AddCommand(newEdgeHashCmd())
	return cmd
}

func newEdgeHashCmd() *cobra.Command {
	var useBcrypt bool
	cmd := &cobra.Command{
		Use:   "hash [SECRET]",
		Short: "Print the hash of a bearer token or password for edge.hostnames.NAME.auth",
		Long: `Print the hash of a bearer token or a password, as the edge's configuration
stores credentials (edge.hostnames.NAME.auth.bearer and .basic). The secret
is read from standard input, one line, unless given as an argument, which
leaves it in the shell's history and the process list.

The default, sha256:HEX, suits long random tokens. --bcrypt makes a slow
hash, for passwords a person chose (HTTP basic only).`,
		Example: `  head -c 32 /dev/urandom | base64 | tee token.txt | sluice edge hash
  sluice edge hash --bcrypt < password.txt`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var secret string
			if len(args) == 1 {
				secret = args[0]
			} else {
				line, err := bufio.NewReader(cmd.InOrStdin()).ReadString('\n')
				if err != nil && !errors.Is(err, io.EOF) {
					return err
				}
				secret = strings.TrimRight(line, "\r\n")
			}
			if secret == "" {
				return errors.New("the secret is empty")
			}
			if !useBcrypt {
				fmt.Fprintln(cmd.OutOrStdout(), edge.HashSecret(secret))
				return nil
			}
			h, err := bcrypt.GenerateFromPassword([]byte(secret), bcrypt.DefaultCost)
			if err != nil {
				return fmt.Errorf("bcrypt: %w", err)
			}
			fmt.Fprintln(cmd.OutOrStdout(), string(h))
			return nil
		},
	}
	cmd.Flags().BoolVar(&useBcrypt, "bcrypt", false, "a bcrypt hash, for HTTP basic passwords")
	return cmd
}
