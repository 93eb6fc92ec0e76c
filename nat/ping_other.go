//go:build !linux

package nat

import (
	"errors"
	"net/netip"
	"os"
	"sync"
)

// errICMPUnsupported is why ICMP echo is unavailable off Linux: the socket
// code is written for Linux's ping and raw sockets only.
var errICMPUnsupported = errors.New("ICMP sockets are only supported on Linux")

// icmpSocket is never opened off Linux.
type icmpSocket struct{}

func openICMP(v6, raw bool, reserve int) (*icmpSocket, error) { return nil, errICMPUnsupported }

func (s *icmpSocket) localID() (uint16, error)                         { return 0, errICMPUnsupported }
func (s *icmpSocket) sendTo(msg []byte, dst netip.Addr, _ uint8) error { return errICMPUnsupported }
func (s *icmpSocket) recv(pool *sync.Pool, _ func(queuedError)) (*[]byte, []byte, netip.Addr, error) {
	return nil, nil, netip.Addr{}, os.ErrClosed
}
func (s *icmpSocket) close() error { return nil }

func errClosed(err error) bool { return errors.Is(err, os.ErrClosed) }

func errNotPermitted(err error) bool { return errors.Is(err, errICMPUnsupported) }
