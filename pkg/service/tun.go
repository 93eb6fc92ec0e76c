package service

import (
	"context"
	"errors"
	"fmt"

	"github.com/sluice-vpn/sluice/pkg/admin"
	"github.com/sluice-vpn/sluice/pkg/gateway"
)

// The modes a Status reports.
const (
	modeWireGuard = "wireguard"
	modeTUN       = "tun"
)

// newTUN builds a service in TUN mode: the state directory is locked and
// holds the control socket, and the gateway serves opts.Device. Nothing
// is written to the directory besides the lock and the socket, so a
// WireGuard state that happens to be there is left as it is.
func newTUN(ctx context.Context, opts Options) (*Service, error) {
	dev := opts.Device
	if opts.Edge != nil {
		dev.Close()
		return nil, errors.New("service: Options.Edge: the edge publishes services of WireGuard peers; TUN mode has none")
	}
	s, err := open(ctx, opts)
	if err != nil {
		dev.Close()
		return nil, err
	}
	if s.device, err = dev.Name(); err != nil {
		s.device = ""
	}
	gopts := opts.Gateway
	gopts.Device = dev
	if gopts.Logger == nil {
		gopts.Logger = s.opts.Logger
	}
	// gateway.New owns the device from here, and closes it if it fails.
	if s.gw, err = gateway.New(gopts); err != nil {
		s.unlock()
		return nil, err
	}
	return s, nil
}

// isTUN reports whether the service runs in TUN mode.
func (s *Service) isTUN() bool { return s.opts.Device != nil }

// deviceName is the TUN device's name now (it may have been renamed since
// New), or the one it had at New if the device no longer says.
func (s *Service) deviceName() string {
	if name, err := s.opts.Device.Name(); err == nil && name != "" {
		return name
	}
	return s.device
}

// errNoPeers is what the peer API answers in TUN mode: the admin API
// serves the same routes in both modes, so that a peer command aimed at a
// TUN gateway is told why it cannot work rather than "404 not found".
func (s *Service) errNoPeers() error {
	return fmt.Errorf("%w: this gateway serves the TUN device %s, not WireGuard: it has no peers (peers exist only in WireGuard mode)",
		admin.ErrInvalid, s.deviceName())
}
