package kerneltun

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// withFd runs fn on f's descriptor. Unlike f.Fd it leaves the descriptor in
// non-blocking mode, and f cannot be closed (and its number reused) while fn
// runs.
func withFd(f *os.File, fn func(fd int) error) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var fnErr error
	if err := rc.Control(func(fd uintptr) { fnErr = fn(int(fd)) }); err != nil {
		return err
	}
	return fnErr
}

// tunInfo returns the name and IFF_* flags of the interface a TUN descriptor
// is attached to; the kernel keeps both current across renames.
func tunInfo(fd int) (name string, flags uint16, err error) {
	ifr, err := unix.NewIfreq("")
	if err != nil {
		return "", 0, err
	}
	if err := unix.IoctlIfreq(fd, unix.TUNGETIFF, ifr); err != nil {
		return "", 0, os.NewSyscallError("ioctl TUNGETIFF", err)
	}
	return ifr.Name(), ifr.Uint16(), nil
}

// controlSocket opens the datagram socket that interface ioctls go through.
// A socket belongs to the network namespace it was created in, so ioctls on
// it find the right interface whichever thread later makes them.
func controlSocket() (*os.File, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err == unix.EAFNOSUPPORT {
		fd, err = unix.Socket(unix.AF_INET6, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	}
	if err != nil {
		return nil, os.NewSyscallError("socket", err)
	}
	return os.NewFile(uintptr(fd), "kerneltun-control"), nil
}

func getMTU(sock int, name string) (int, error) {
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return 0, fmt.Errorf("interface name %q: %w", name, err)
	}
	if err := unix.IoctlIfreq(sock, unix.SIOCGIFMTU, ifr); err != nil {
		return 0, os.NewSyscallError("ioctl SIOCGIFMTU", err)
	}
	return int(int32(ifr.Uint32())), nil
}

func setMTU(sock int, name string, mtu int) error {
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return fmt.Errorf("interface name %q: %w", name, err)
	}
	ifr.SetUint32(uint32(mtu))
	if err := unix.IoctlIfreq(sock, unix.SIOCSIFMTU, ifr); err != nil {
		return os.NewSyscallError("ioctl SIOCSIFMTU", err)
	}
	return nil
}

// setUp sets IFF_UP and IFF_RUNNING, keeping the other flags as they are.
func setUp(sock int, name string) error {
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return fmt.Errorf("interface name %q: %w", name, err)
	}
	if err := unix.IoctlIfreq(sock, unix.SIOCGIFFLAGS, ifr); err != nil {
		return os.NewSyscallError("ioctl SIOCGIFFLAGS", err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP | unix.IFF_RUNNING)
	if err := unix.IoctlIfreq(sock, unix.SIOCSIFFLAGS, ifr); err != nil {
		return os.NewSyscallError("ioctl SIOCSIFFLAGS", err)
	}
	return nil
}

// sameNetns reports whether the interface behind a TUN descriptor lives in
// the same network namespace as a socket. ok is false when the kernel will
// not say (before Linux 5.2, or without CAP_NET_ADMIN over the namespace).
func sameNetns(tunFd, sock int) (same, ok bool) {
	devNs, err := unix.IoctlRetInt(tunFd, unix.TUNGETDEVNETNS)
	if err != nil {
		return false, false
	}
	defer unix.Close(devNs)
	sockNs, err := unix.IoctlRetInt(sock, unix.SIOCGSKNS)
	if err != nil {
		return false, false
	}
	defer unix.Close(sockNs)
	var a, b unix.Stat_t
	if unix.Fstat(devNs, &a) != nil || unix.Fstat(sockNs, &b) != nil {
		return false, false
	}
	return a.Dev == b.Dev && a.Ino == b.Ino, true
}
