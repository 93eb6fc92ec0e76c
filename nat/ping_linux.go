package nat

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Socket options for ICMP filters; x/sys/unix does not name them for Linux.
const (
	solRaw       = 255 // SOL_RAW
	icmpFilter   = 1   // ICMP_FILTER, at SOL_RAW: bit n set blocks ICMP type n
	icmpv6Filter = 1   // ICMPV6_FILTER, at SOL_ICMPV6: bit n set blocks type n
)

// icmpSocket is an ICMP socket of one family: a datagram ("ping") socket,
// for which the kernel assigns the echo identifier and delivers only echo
// replies carrying it, or a raw socket, which sees every echo reply that
// reaches the host. It goes through the runtime's poller, so a blocked read
// ends when the socket is closed.
type icmpSocket struct {
	f   *os.File
	rc  syscall.RawConn
	v6  bool
	raw bool
}

// openICMP opens an ICMP socket of the given family and kind. It fails
// with EACCES for a datagram socket when net.ipv4.ping_group_range excludes
// the process's group, and with EPERM for a raw one without CAP_NET_RAW.
func openICMP(v6, raw bool) (*icmpSocket, error) {
	family, proto := unix.AF_INET, unix.IPPROTO_ICMP
	if v6 {
		family, proto = unix.AF_INET6, unix.IPPROTO_ICMPV6
	}
	typ := unix.SOCK_DGRAM
	if raw {
		typ = unix.SOCK_RAW
	}
	fd, err := unix.Socket(family, typ|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		return nil, os.NewSyscallError("socket", err)
	}
	if err := setupICMP(fd, v6, raw); err != nil {
		unix.Close(fd)
		return nil, err
	}
	f := os.NewFile(uintptr(fd), "icmp")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &icmpSocket{f: f, rc: rc, v6: v6, raw: raw}, nil
}

func setupICMP(fd int, v6, raw bool) error {
	if !raw {
		// Binding port 0 makes the kernel pick the echo identifier now, so
		// that it can be recorded before the first request goes out.
		var sa unix.Sockaddr = &unix.SockaddrInet4{}
		if v6 {
			sa = &unix.SockaddrInet6{}
		}
		return os.NewSyscallError("bind", unix.Bind(fd, sa))
	}
	// A raw socket is woken by every ICMP packet the host receives; the
	// filter keeps all but echo replies in the kernel.
	if v6 {
		var f unix.ICMPv6Filter
		for i := range f.Data {
			f.Data[i] = ^uint32(0)
		}
		const echoReply = 129
		f.Data[echoReply>>5] &^= 1 << (echoReply & 31)
		return os.NewSyscallError("setsockopt ICMPV6_FILTER", unix.SetsockoptICMPv6Filter(fd, unix.SOL_ICMPV6, icmpv6Filter, &f))
	}
	const echoReply = 0
	blocked := ^uint32(1 << echoReply)
	return os.NewSyscallError("setsockopt ICMP_FILTER", unix.SetsockoptInt(fd, solRaw, icmpFilter, int(int32(blocked))))
}

// localID returns the echo identifier the kernel assigned to a datagram
// socket.
func (s *icmpSocket) localID() (uint16, error) {
	var sa unix.Sockaddr
	var serr error
	if err := s.rc.Control(func(fd uintptr) { sa, serr = unix.Getsockname(int(fd)) }); err != nil {
		return 0, err
	}
	if serr != nil {
		return 0, os.NewSyscallError("getsockname", serr)
	}
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return uint16(sa.Port), nil
	case *unix.SockaddrInet6:
		return uint16(sa.Port), nil
	}
	return 0, fmt.Errorf("getsockname: unexpected address %T", sa)
}

// sendTo sends one ICMP message (header included, without IP header) to
// dst. The kernel fills in the checksum for ICMPv6 and, on datagram
// sockets, the identifier.
func (s *icmpSocket) sendTo(msg []byte, dst netip.Addr) error {
	var sa unix.Sockaddr
	if s.v6 {
		sa = &unix.SockaddrInet6{Addr: dst.As16()}
	} else {
		sa = &unix.SockaddrInet4{Addr: dst.As4()}
	}
	var serr error
	err := s.rc.Write(func(fd uintptr) bool {
		serr = unix.Sendto(int(fd), msg, 0, sa)
		return serr != unix.EAGAIN
	})
	if err != nil {
		return err
	}
	return os.NewSyscallError("sendto", serr)
}

// recv waits for the next datagram and returns the ICMP message in it
// (without IP header) and its source. The buffer comes from pool only once
// a datagram is ready, so that idle sockets hold no buffer; the caller
// returns *buf to pool when done with msg.
func (s *icmpSocket) recv(pool *sync.Pool) (buf *[]byte, msg []byte, from netip.Addr, err error) {
	var n int
	var sa unix.Sockaddr
	var rerr error
	err = s.rc.Read(func(fd uintptr) bool {
		buf = pool.Get().(*[]byte)
		n, sa, rerr = unix.Recvfrom(int(fd), *buf, unix.MSG_DONTWAIT)
		if rerr == unix.EAGAIN || rerr == unix.EINTR {
			pool.Put(buf)
			buf = nil
			return false
		}
		return true
	})
	if err != nil {
		// Read itself fails only once the socket is closed; the error it
		// returns then (internal/poll's "use of closed file") matches
		// nothing exported.
		err = fmt.Errorf("%w: %v", os.ErrClosed, err)
	} else if rerr != nil {
		err = os.NewSyscallError("recvfrom", rerr)
	}
	if err != nil {
		if buf != nil {
			pool.Put(buf)
		}
		return nil, nil, netip.Addr{}, err
	}
	msg = (*buf)[:n]
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		from = netip.AddrFrom4(sa.Addr)
	case *unix.SockaddrInet6:
		from = netip.AddrFrom16(sa.Addr)
	}
	if s.raw && !s.v6 {
		// Raw IPv4 sockets deliver the IP header too.
		if len(msg) < 20 || msg[0]>>4 != 4 || int(msg[0]&0x0f)*4 > len(msg) {
			return buf, nil, from, nil
		}
		msg = msg[int(msg[0]&0x0f)*4:]
	}
	return buf, msg, from, nil
}

func (s *icmpSocket) close() error { return s.f.Close() }

// errClosed reports whether err comes from a socket closed under a reader.
func errClosed(err error) bool { return errors.Is(err, os.ErrClosed) }

// errNotPermitted reports whether opening a socket failed for lack of
// permission (ping_group_range, CAP_NET_RAW) or support, as opposed to a
// shortage that may pass (descriptors, memory).
func errNotPermitted(err error) bool {
	for _, e := range []error{unix.EACCES, unix.EPERM, unix.EAFNOSUPPORT, unix.EPROTONOSUPPORT, unix.ESOCKTNOSUPPORT, unix.EINVAL} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}
