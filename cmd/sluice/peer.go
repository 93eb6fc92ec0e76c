package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/mdp/qrterminal/v3"
	"github.com/spf13/cobra"

	"github.com/sluice-vpn/sluice/pkg/admin"
	"github.com/sluice-vpn/sluice/pkg/service"
	"github.com/sluice-vpn/sluice/tunnel/wireguard"
)

func newPeerCmd() *cobra.Command {
	var t target
	cmd := &cobra.Command{
		Use:   "peer",
		Short: "Add, list and remove the gateway's WireGuard peers",
		Long: `Add, list and remove peers. With the gateway running the change applies at
once, through its control socket; with it stopped, the state is edited.
With --admin, only a running gateway is asked.`,
	}
	t.flags(cmd)
	cmd.AddCommand(newPeerAddCmd(&t), newPeerListCmd(&t), newPeerRemoveCmd(&t))
	return cmd
}

func newPeerAddCmd(t *target) *cobra.Command {
	var pubKey, endpoint string
	var qr bool
	cmd := &cobra.Command{
		Use:   "add NAME",
		Short: "Add a peer and print its client configuration",
		Example: `  sluice peer add laptop > laptop.conf
  sluice peer add phone --qr
  sluice peer add server2 --public-key 'xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg='`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req := service.PeerRequest{Name: args[0], Endpoint: endpoint}
			if pubKey != "" {
				k, err := wireguard.ParseKey(pubKey)
				if err != nil {
					return fmt.Errorf("--public-key: %v", err)
				}
				req.PublicKey = k
			}
			if endpoint != "" {
				if _, _, err := splitHostPort(endpoint); err != nil {
					return fmt.Errorf("--endpoint %q: %v", endpoint, err)
				}
			}
			var np service.NewPeer
			var err error
			if t.admin != "" {
				var c *admin.Client
				if c, err = t.client(); err == nil {
					np, err = service.AddPeerVia(cmd.Context(), c, req)
				}
			} else {
				np, err = service.AddPeer(cmd.Context(), t.stateDir, req)
			}
			if err != nil {
				return err
			}
			printPeerConfig(cmd.OutOrStdout(), &np, qr)
			return nil
		},
	}
	cmd.Flags().StringVar(&pubKey, "public-key", "", "the peer's public `KEY`, when it keeps its private key itself")
	cmd.Flags().StringVar(&endpoint, "endpoint", "", "the gateway's public `HOST:PORT` for the configuration")
	cmd.Flags().BoolVar(&qr, "qr", false, "also print the configuration as a QR code, for phones")
	return cmd
}

// printPeerConfig prints a peer's wg-quick configuration, marking what
// the user must check, and a QR code of it if asked.
func printPeerConfig(w io.Writer, np *service.NewPeer, qr bool) {
	conf := np.Config.String()
	if !np.PrivateKeyKnown {
		// The peer keeps its private key: leave the line for it to fill.
		conf = strings.Replace(conf, "PrivateKey = "+np.Config.Interface.PrivateKey.String()+"\n", "", 1)
	}
	var b strings.Builder
	if np.EndpointGuessed {
		fmt.Fprintf(&b, "# NOTE: the Endpoint below is a guess. If clients reach this gateway at\n# another address, change it (or give --endpoint HOST:PORT).\n")
	}
	if !np.PrivateKeyKnown {
		fmt.Fprintf(&b, "# NOTE: add the PrivateKey that belongs to %s under [Interface].\n", np.Peer.PublicKey)
	}
	b.WriteString(conf)
	fmt.Fprint(w, b.String())
	if qr {
		fmt.Fprintln(w)
		qrterminal.GenerateHalfBlock(conf, qrterminal.L, w)
	}
}

func newPeerListCmd(t *target) *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List the peers",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if output != "table" && output != "json" {
				return fmt.Errorf("-o %q: want table or json", output)
			}
			var peers []admin.PeerInfo
			running := true
			var err error
			if t.admin != "" {
				var c *admin.Client
				if c, err = t.client(); err == nil {
					peers, err = c.Peers(cmd.Context())
				}
			} else {
				peers, running, err = service.ListPeers(cmd.Context(), t.stateDir)
			}
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if output == "json" {
				enc := json.NewEncoder(w)
				enc.SetIndent("", "  ")
				return enc.Encode(peers)
			}
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tPUBLIC KEY\tADDRESSES\tLAST HANDSHAKE\tRECEIVED\tSENT")
			for _, p := range peers {
				hs := "never"
				if p.LastHandshake != nil {
					hs = time.Since(*p.LastHandshake).Round(time.Second).String() + " ago"
				}
				if !running {
					hs = "(gateway stopped)"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", p.Name, p.PublicKey, joinAddrs(p.Addrs), hs, bytesHuman(p.RxBytes), bytesHuman(p.TxBytes))
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output `FORMAT`: table or json")
	return cmd
}

func newPeerRemoveCmd(t *target) *cobra.Command {
	return &cobra.Command{
		Use:   "remove NAME",
		Short: "Remove a peer; a running gateway closes its flows at once",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var err error
			if t.admin != "" {
				var c *admin.Client
				if c, err = t.client(); err == nil {
					err = c.RemovePeer(cmd.Context(), args[0])
				}
			} else {
				err = service.RemovePeer(cmd.Context(), t.stateDir, args[0])
			}
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "removed peer %q\n", args[0])
			return nil
		},
	}
}

func joinAddrs(addrs []netip.Addr) string {
	s := make([]string, len(addrs))
	for i, a := range addrs {
		s[i] = a.String()
	}
	return strings.Join(s, ",")
}

func bytesHuman(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
