//go:build !linux

package nat

import "syscall"

// kernelPortRangeUsable reports that only Linux can confine the kernel's
// port choice to a slice; elsewhere the pool always binds explicitly.
func kernelPortRangeUsable(PortRange) (bool, string) {
	return false, "IP_LOCAL_PORT_RANGE is Linux-only"
}

// kernelRangeControl is never used off Linux, where kernelPortRangeUsable
// is false.
func kernelRangeControl(PortRange, bool) func(string, string, syscall.RawConn) error {
	return nil
}

// reuseAddrControl does nothing off Linux: the meaning of SO_REUSEADDR for
// connected sockets varies between systems, so there each explicitly bound
// port carries one connection and ports are not shared between
// destinations.
func reuseAddrControl(string, string, syscall.RawConn) error { return nil }

// fileLimit is not known off Linux: no descriptors are kept in reserve.
func fileLimit() int64 { return 0 }
