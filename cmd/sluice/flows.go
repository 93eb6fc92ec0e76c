package main

import (
	"errors"
	"fmt"
	"io"
	"net/url"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/sluice-vpn/sluice/pkg/admin"
)

// flowFilterFlags are the filters of flows and flows delete, as typed.
type flowFilterFlags struct {
	peer, proto, dest, port, state string
}

func (f *flowFilterFlags) register(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.StringVar(&f.peer, "peer", "", "only the flows of peer `NAME`")
	fl.StringVarP(&f.proto, "proto", "p", "", "only `PROTO` flows: tcp, udp or icmp")
	fl.StringVarP(&f.dest, "dest", "d", "", "only flows to destinations in `CIDR`")
	fl.StringVar(&f.port, "port", "", "only flows to destination `PORT`")
	// Not --state: that names the state directory in every command.
	fl.StringVar(&f.state, "flow-state", "", "only flows in `STATE`: new, established, closing, unreplied, assured")
}

func (f *flowFilterFlags) filter() (admin.FlowFilter, error) {
	v := url.Values{}
	for k, s := range map[string]string{"peer": f.peer, "proto": f.proto, "dest": f.dest, "port": f.port, "state": f.state} {
		if s != "" {
			v.Set(k, s)
		}
	}
	ff, err := admin.ParseFlowFilter(v)
	if err != nil {
		// Name the flag: "state ..." is --flow-state, the rest match.
		msg := strings.TrimPrefix(err.Error(), admin.ErrInvalid.Error()+": ")
		if strings.HasPrefix(msg, "state ") {
			msg = "flow-" + msg
		}
		return ff, errors.New("--" + msg)
	}
	return ff, nil
}

func newFlowsCmd() *cobra.Command {
	var t target
	var ff flowFilterFlags
	var output string
	var watch, count bool
	cmd := &cobra.Command{
		Use:   "flows",
		Short: "List the connection table, like conntrack -L",
		Long: `List the flows the gateway carries, like conntrack -L; --watch streams new and
ended flows like conntrack -E, --count counts them like conntrack -C, and
flows delete ends them like conntrack -D.`,
		Example: `  sluice flows
  sluice flows --peer laptop -p tcp --port 443
  sluice flows --watch -o json
  sluice flows --count
  sluice flows delete --peer laptop`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			f, err := ff.filter()
			if err != nil {
				return err
			}
			c, err := t.client()
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			switch {
			case watch:
				events, err := c.Events(cmd.Context(), f)
				if err != nil {
					return err
				}
				for ev := range events {
					if output == "json" {
						if err := writeJSONLine(w, ev); err != nil {
							return err
						}
						continue
					}
					tag := "[NEW]"
					if ev.Type == "ended" {
						tag = "[END " + ev.Reason + "]"
					}
					fmt.Fprintf(w, "%-16s %s\n", tag, flowLine(ev.Flow))
				}
				return nil
			case count:
				n, err := c.CountFlows(cmd.Context(), f)
				if err != nil {
					return err
				}
				fmt.Fprintln(w, n)
				return nil
			}
			flows, err := c.Flows(cmd.Context(), f)
			if err != nil {
				return err
			}
			if output == "json" {
				return writeJSON(w, flows)
			}
			printFlows(w, flows)
			return nil
		},
	}
	t.flags(cmd)
	ff.register(cmd)
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output `FORMAT`: table or json")
	cmd.Flags().BoolVarP(&watch, "watch", "w", false, "stream new and ended flows until interrupted, like conntrack -E")
	cmd.Flags().BoolVarP(&count, "count", "c", false, "print how many flows match, like conntrack -C")
	cmd.AddCommand(newFlowsDeleteCmd(&t))
	return cmd
}

func newFlowsDeleteCmd(t *target) *cobra.Command {
	var ff flowFilterFlags
	var all bool
	cmd := &cobra.Command{
		Use:   "delete [ID...]",
		Short: "End flows, closing both sides, like conntrack -D",
		Example: `  sluice flows delete 42
  sluice flows delete --peer laptop
  sluice flows delete --dest 203.0.113.0/24 -p udp`,
		RunE: func(cmd *cobra.Command, args []string) error {
			f, err := ff.filter()
			if err != nil {
				return err
			}
			if len(args) > 0 && (!f.IsZero() || all) {
				return fmt.Errorf("give flow IDs or filters, not both")
			}
			c, err := t.client()
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if len(args) > 0 {
				for _, a := range args {
					id, err := strconv.ParseUint(a, 10, 64)
					if err != nil {
						return fmt.Errorf("flow ID %q is not a number", a)
					}
					if err := c.DeleteFlow(cmd.Context(), id); err != nil {
						return err
					}
				}
				fmt.Fprintf(w, "deleted %d flows\n", len(args))
				return nil
			}
			if f.IsZero() && !all {
				return fmt.Errorf("give flow IDs, a filter, or --all")
			}
			n, err := c.DeleteFlows(cmd.Context(), f, all)
			if err != nil {
				return err
			}
			fmt.Fprintf(w, "deleted %d flows\n", n)
			return nil
		},
	}
	ff.register(cmd)
	cmd.Flags().BoolVar(&all, "all", false, "delete every flow")
	return cmd
}

func printFlows(w io.Writer, flows []admin.FlowInfo) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tPROTO\tSTATE\tPEER\tCLIENT\tDESTINATION\tEGRESS\tSENT\tRECEIVED\tAGE\tIDLE")
	for _, f := range flows {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s/%d\t%s/%d\t%s\t%s\n",
			f.ID, f.Proto, f.State, orDash(f.Peer), f.Client, f.Dest, egress(f),
			bytesHuman(f.OrigBytes), f.OrigPackets, bytesHuman(f.ReplyBytes), f.ReplyPackets,
			time.Since(f.Created).Round(time.Second), time.Since(f.LastSeen).Round(time.Second))
	}
	tw.Flush()
	fmt.Fprintf(w, "%d flows\n", len(flows))
}

// flowLine is one flow in conntrack -E's spirit.
func flowLine(f admin.FlowInfo) string {
	return fmt.Sprintf("%s %s peer=%s src=%s dst=%s egress=%s packets=%d bytes=%d packets=%d bytes=%d id=%d",
		f.Proto, f.State, orDash(f.Peer), f.Client, f.Dest, egress(f), f.OrigPackets, f.OrigBytes, f.ReplyPackets, f.ReplyBytes, f.ID)
}

func egress(f admin.FlowInfo) string {
	if !f.Egress.IsValid() {
		return "-"
	}
	return f.Egress.String()
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func writeJSONLine(w io.Writer, v any) error {
	b, err := jsonMarshal(v)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "%s\n", b)
	return err
}
