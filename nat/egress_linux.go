package nat

import (
	"fmt"
	"math"
	"os"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// kernelPortRangeUsable reports whether the kernel can be trusted to pick
// ports inside slice: it supports IP_LOCAL_PORT_RANGE (Linux 6.3+) and the
// slice lies inside net.ipv4.ip_local_port_range, outside of which the
// kernel ignores the per-socket range. If not, it says why.
func kernelPortRangeUsable(slice PortRange) (bool, string) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		fd, err = unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	}
	if err != nil {
		return false, fmt.Sprintf("probe socket: %v", err)
	}
	defer unix.Close(fd)
	if err := unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_LOCAL_PORT_RANGE, portRangeOpt(slice)); err != nil {
		return false, fmt.Sprintf("IP_LOCAL_PORT_RANGE not supported: %v", err)
	}
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return false, fmt.Sprintf("cannot read the ephemeral port range: %v", err)
	}
	var lo, hi int
	if _, err := fmt.Sscan(strings.TrimSpace(string(b)), &lo, &hi); err != nil {
		return false, fmt.Sprintf("cannot parse the ephemeral port range %q: %v", b, err)
	}
	if int(slice.Lo) < lo || int(slice.Hi) > hi {
		return false, fmt.Sprintf("slice is not inside net.ipv4.ip_local_port_range %d-%d", lo, hi)
	}
	return true, ""
}

// portRangeOpt encodes r as IP_LOCAL_PORT_RANGE wants it: lo in the low 16
// bits, hi in the high 16 bits.
func portRangeOpt(r PortRange) int {
	return int(uint32(r.Lo) | uint32(r.Hi)<<16)
}

// kernelRangeControl returns a Dialer/ListenConfig Control function that
// confines the kernel's port choice to slice. For TCP it also defers the
// port choice from bind to connect (IP_BIND_ADDRESS_NO_PORT), which is what
// lets connect share a port between different destinations. The SOL_IP
// option applies to IPv6 sockets as well.
func kernelRangeControl(slice PortRange, tcp bool) func(network, address string, c syscall.RawConn) error {
	return func(network, address string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			if tcp {
				if serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1); serr != nil {
					serr = os.NewSyscallError("setsockopt IP_BIND_ADDRESS_NO_PORT", serr)
					return
				}
			}
			if serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_LOCAL_PORT_RANGE, portRangeOpt(slice)); serr != nil {
				serr = os.NewSyscallError("setsockopt IP_LOCAL_PORT_RANGE", serr)
			}
		})
		if err != nil {
			return err
		}
		return serr
	}
}

// reuseAddrControl sets SO_REUSEADDR so that an explicitly bound TCP port
// can be shared by connections to different destinations; connect still
// refuses a duplicate four-tuple.
func reuseAddrControl(network, address string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); serr != nil {
			serr = os.NewSyscallError("setsockopt SO_REUSEADDR", serr)
		}
	})
	if err != nil {
		return err
	}
	return serr
}

// fileLimit is the soft limit on open files, read each time so that a
// change after the pool was made (sluice serve raises it) counts; 0 if
// unknown.
func fileLimit() int64 {
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil || lim.Cur > math.MaxInt64 {
		return 0
	}
	return int64(lim.Cur)
}
