package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/sluice-vpn/sluice/pkg/admin"
	"github.com/sluice-vpn/sluice/pkg/service"
	"github.com/sluice-vpn/sluice/pkg/state"
)

// tokenEnv names the environment variable that can carry the admin token.
const tokenEnv = "SLUICE_ADMIN_TOKEN"

// target is how a command finds the running gateway: its state directory
// (the control socket in it) or an explicit admin address.
type target struct {
	stateDir string
	admin    string
	token    string
}

func (t *target) flags(cmd *cobra.Command) {
	cmd.PersistentFlags().StringVar(&t.stateDir, "state", "", "the gateway's state `DIR` (default as for serve)")
	cmd.PersistentFlags().StringVar(&t.admin, "admin", "", "the gateway's admin API: `HOST:PORT`, or the path of its unix socket")
	cmd.PersistentFlags().StringVar(&t.token, "admin-token", "", "the bearer `TOKEN` of --admin HOST:PORT (default $"+tokenEnv+", else the state directory's "+admin.TokenName+")")
}

// client returns a client of the running gateway's API.
func (t *target) client() (*admin.Client, error) {
	if t.admin != "" && (strings.HasPrefix(t.admin, "/") || strings.HasPrefix(t.admin, ".")) {
		return admin.NewUnixClient(t.admin), nil
	}
	dir := t.stateDir
	if dir == "" {
		var err error
		if dir, err = state.DefaultDir(); err != nil {
			return nil, err
		}
	}
	if t.admin == "" {
		return admin.NewUnixClient(filepath.Join(dir, service.SocketName)), nil
	}
	tok, err := t.adminToken(dir)
	if err != nil {
		return nil, err
	}
	return admin.NewTCPClient(t.admin, tok), nil
}

// adminToken is the token for a TCP admin address: given, or read from
// the gateway's state directory, which only its owner can read.
func (t *target) adminToken(dir string) (string, error) {
	if t.token != "" {
		return t.token, nil
	}
	if tok := os.Getenv(tokenEnv); tok != "" {
		return tok, nil
	}
	tok, err := admin.ReadTokenFile(filepath.Join(dir, admin.TokenName))
	if err != nil {
		return "", fmt.Errorf("the admin API on %s needs its token: give --admin-token or $%s, or --state of the gateway (%w)", t.admin, tokenEnv, err)
	}
	return tok, nil
}
