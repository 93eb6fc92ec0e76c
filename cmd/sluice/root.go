package main

import (
	"github.com/spf13/cobra"
)

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:   "sluice",
		Short: "A VPN gateway that runs entirely in user space",
		Long: `sluice terminates every TCP and UDP flow its clients open in a user-space
network stack and re-dials it from ordinary sockets: no iptables, no
conntrack, no kernel NAT.`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(newServeCmd(), newPeerCmd(), newStatusCmd(), newFlowsCmd(), newConfigCmd(), newConnectCmd(),
		newExposeCmd(), newServicesCmd(), newEdgeCmd())
	return root
}
