package main

import (
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/sluice-vpn/sluice/pkg/admin"
	"github.com/sluice-vpn/sluice/pkg/service"
	"github.com/sluice-vpn/sluice/pkg/state"
)

// target is how a command finds the running gateway: its state directory
// (the control socket in it) or an explicit admin address.
type target struct {
	stateDir string
	admin    string
}

func (t *target) flags(cmd *cobra.Command) {
	cmd.PersistentFlags().StringVar(&t.stateDir, "state", "", "the gateway's state `DIR` (default as for serve)")
	cmd.PersistentFlags().StringVar(&t.admin, "admin", "", "the gateway's admin API: `HOST:PORT`, or the path of its unix socket")
}

// client returns a client of the running gateway's API.
func (t *target) client() (*admin.Client, error) {
	if t.admin != "" {
		if strings.HasPrefix(t.admin, "/") || strings.HasPrefix(t.admin, ".") {
			return admin.NewUnixClient(t.admin), nil
		}
		return admin.NewTCPClient(t.admin), nil
	}
	dir := t.stateDir
	if dir == "" {
		var err error
		if dir, err = state.DefaultDir(); err != nil {
			return nil, err
		}
	}
	return admin.NewUnixClient(filepath.Join(dir, service.SocketName)), nil
}
