package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/sluice-vpn/sluice/pkg/admin"
)

func newStatusCmd() *cobra.Command {
	var t target
	var output string
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the running gateway at a glance, like wg show",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			c, err := t.client()
			if err != nil {
				return err
			}
			st, err := c.Status(cmd.Context())
			if err != nil {
				return err
			}
			if output == "json" {
				return writeJSON(cmd.OutOrStdout(), st)
			}
			printStatus(cmd.OutOrStdout(), st)
			return nil
		},
	}
	t.flags(cmd)
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output `FORMAT`: table or json")
	return cmd
}

func printStatus(w io.Writer, st admin.Status) {
	fmt.Fprintf(w, "gateway\n")
	if st.Mode != "" {
		fmt.Fprintf(w, "  mode: %s\n", st.Mode)
	}
	if st.Device != "" {
		fmt.Fprintf(w, "  device: %s\n", st.Device)
	}
	if st.PublicKey != "" {
		fmt.Fprintf(w, "  public key: %s\n  listening port: %d\n", st.PublicKey, st.ListenPort)
	}
	if len(st.Addrs) > 0 {
		fmt.Fprintf(w, "  addresses: %s\n", joinAddrs(st.Addrs))
	}
	fmt.Fprintf(w, "  flows: %d\n", st.Flows)
	if e := st.Edge; e != nil {
		fmt.Fprintf(w, "  edge: %s\n", strings.Join(e.Listeners, ", "))
		fmt.Fprintf(w, "  services: %d hostnames, %d of %d replicas healthy\n", e.Hostnames, e.Healthy, e.Replicas)
	}
	for _, p := range st.Peers {
		fmt.Fprintf(w, "\npeer: %s (%s)\n", p.Name, p.PublicKey)
		if p.Endpoint != "" {
			fmt.Fprintf(w, "  endpoint: %s\n", p.Endpoint)
		}
		fmt.Fprintf(w, "  allowed ips: %s\n", joinAddrs(p.Addrs))
		if p.LastHandshake != nil {
			fmt.Fprintf(w, "  latest handshake: %s ago\n", time.Since(*p.LastHandshake).Round(time.Second))
		}
		fmt.Fprintf(w, "  transfer: %s received, %s sent\n", bytesHuman(p.RxBytes), bytesHuman(p.TxBytes))
		fmt.Fprintf(w, "  flows: %d\n", p.Flows)
	}
}

func checkOutput(o string) error {
	if o != "table" && o != "json" {
		return fmt.Errorf("-o %q: want table or json", o)
	}
	return nil
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func jsonMarshal(v any) ([]byte, error) { return json.Marshal(v) }
