package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"go.uber.org/zap"

	"github.com/sluice-vpn/sluice/pkg/client"
	"github.com/sluice-vpn/sluice/tunnel/wireguard"
)

// newTunnel builds the user-space tunnel that the wg-quick file at path
// describes (connect's and expose's --config); opts.Config is set here.
func newTunnel(path string, opts client.Options) (*client.Client, error) {
	text, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--config: %w", err)
	}
	if opts.Config, err = wireguard.ParseConfig(string(text)); err != nil {
		return nil, fmt.Errorf("--config %s: %w", path, err)
	}
	c, err := client.New(opts)
	if err != nil {
		return nil, fmt.Errorf("--config %s: %w", path, err)
	}
	return c, nil
}

// upTunnel waits for c's first handshake, for at most timeout unless it
// is 0. It reports false, with no error, if ctx ended first: the user
// interrupted the wait.
func upTunnel(ctx context.Context, c *client.Client, timeout time.Duration, log *zap.Logger) (bool, error) {
	upCtx, cancel := context.WithCancel(ctx)
	if timeout > 0 {
		upCtx, cancel = context.WithTimeout(ctx, timeout)
	}
	err := c.Up(upCtx)
	cancel()
	if err != nil {
		if ctx.Err() != nil {
			return false, nil
		}
		return false, fmt.Errorf("%w: check the peer's Endpoint and PublicKey, and that the gateway has this peer's public key %s", err, c.PublicKey())
	}
	log.Info("tunnel up", zap.Stringers("addresses", c.Addrs()))
	return true, nil
}
