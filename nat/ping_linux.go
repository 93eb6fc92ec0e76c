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
// A socket whose descriptor falls among the last reserve below the open
// file limit is closed and refused with ErrFileReserve, as egress sockets
// are (Egress.fileGuard says why).
func openICMP(v6, raw bool, reserve int) (*icmpSocket, error) {
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
	if limit := fileLimit(); reserve > 0 && limit > 0 && int64(fd) >= limit-int64(reserve) {
		unix.Close(fd)
		return nil, fmt.Errorf("%w (limit %d, reserve %d)", ErrFileReserve, limit, reserve)
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
		// The errors that come back for the requests (a router's time
		// exceeded for traceroute, unreachables) are queued, not dropped.
		// Without it pings still work: best effort.
		if v6 {
			_ = unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_RECVERR, 1)
		} else {
			_ = unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_RECVERR, 1)
		}
		// Binding port 0 makes the kernel pick the echo identifier now, so
		// that it can be recorded before the first request goes out.
		var sa unix.Sockaddr = &unix.SockaddrInet4{}
		if v6 {
			sa = &unix.SockaddrInet6{}
		}
		return os.NewSyscallError("bind", unix.Bind(fd, sa))
	}
	// A raw socket is woken by every ICMP packet the host receives; the
	// filter keeps all but echo replies and the errors that may quote a
	// request (unreachable, time exceeded) in the kernel.
	if v6 {
		var f unix.ICMPv6Filter
		for i := range f.Data {
			f.Data[i] = ^uint32(0)
		}
		for _, typ := range []int{icmpv6Unreachable, icmpv6TimeExceeded, 129} { // 129: echo reply
			f.Data[typ>>5] &^= 1 << (typ & 31)
		}
		return os.NewSyscallError("setsockopt ICMPV6_FILTER", unix.SetsockoptICMPv6Filter(fd, unix.SOL_ICMPV6, icmpv6Filter, &f))
	}
	blocked := ^uint32(1<<0 | 1<<icmpv4Unreachable | 1<<icmpv4TimeExceeded) // 0: echo reply
	return os.NewSyscallError("setsockopt ICMP_FILTER", unix.SetsockoptInt(fd, solRaw, icmpFilter, int(int32(blocked))))
}

// ICMP error types.
const (
	icmpv4Unreachable  = 3
	icmpv4TimeExceeded = 11
	icmpv6Unreachable  = 1
	icmpv6TimeExceeded = 3
)

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
// dst, with TTL (hop limit) ttl unless it is 0. The kernel fills in the
// checksum for ICMPv6 and, on datagram sockets, the identifier.
func (s *icmpSocket) sendTo(msg []byte, dst netip.Addr, ttl uint8) error {
	var sa unix.Sockaddr
	if s.v6 {
		sa = &unix.SockaddrInet6{Addr: dst.As16()}
	} else {
		sa = &unix.SockaddrInet4{Addr: dst.As4()}
	}
	var oob []byte
	if ttl != 0 {
		oob = ttlControl(!s.v6, ttl)
	}
	var serr error
	retried := false
	err := s.rc.Write(func(fd uintptr) bool {
		for {
			if oob == nil {
				serr = unix.Sendto(int(fd), msg, 0, sa)
			} else {
				serr = unix.Sendmsg(int(fd), msg, oob, sa, 0)
			}
			if serr != nil && !s.raw && !retried && asyncSendError(serr) {
				// An ICMP error queued for an earlier request
				// (IP_RECVERR) is returned by the next send: the reader
				// reports that one from the queue, and this request is
				// sent again.
				retried = true
				continue
			}
			return serr != unix.EAGAIN
		}
	})
	if err != nil {
		return err
	}
	return os.NewSyscallError("sendto", serr)
}

// recv waits for the next datagram and returns the ICMP message in it
// (without IP header) and its source. The buffer comes from pool only once
// a datagram is ready, so that idle sockets hold no buffer; the caller
// returns *buf to pool when done with msg. The errors queued on a
// datagram socket for its requests go to onErr, if set, as they come:
// their payload is the request as sent.
func (s *icmpSocket) recv(pool *sync.Pool, onErr func(queuedError)) (buf *[]byte, msg []byte, from netip.Addr, err error) {
	var n int
	var sa unix.Sockaddr
	var rerr error
	var oob []byte // for the error queue, allocated once it is read
	err = s.rc.Read(func(fd uintptr) bool {
		buf = pool.Get().(*[]byte)
		for {
			n, sa, rerr = unix.Recvfrom(int(fd), *buf, unix.MSG_DONTWAIT)
			if rerr == nil {
				return true
			}
			if rerr == unix.EINTR {
				continue
			}
			// EAGAIN, or the error the kernel reports once for the
			// first queued one: the queue says which request each
			// concerns.
			drained := false
			if !s.raw && oob == nil {
				oob = make([]byte, 512)
			}
			for !s.raw {
				qn, qoobn, _, qsa, qerr := unix.Recvmsg(int(fd), *buf, oob, unix.MSG_ERRQUEUE|unix.MSG_DONTWAIT)
				if qerr != nil {
					break
				}
				drained = true
				if qe, ok := parseQueuedError((*buf)[:qn], oob[:qoobn], qsa); ok && onErr != nil {
					onErr(qe)
				}
			}
			switch {
			case drained:
				continue // there may be a reply behind them
			case rerr == unix.EAGAIN:
				pool.Put(buf)
				buf = nil
				return false
			}
			return true
		}
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

// quotedEcho reads an ICMP error (msg, without IP header) that quotes an
// echo request: the request's destination and as much of it as was
// quoted (at least its 8-byte header), and the error. The error's From is
// left to the caller.
func quotedEcho(v6 bool, msg []byte) (dst netip.Addr, echo []byte, e ICMPError, ok bool) {
	if len(msg) < 8 {
		return netip.Addr{}, nil, ICMPError{}, false
	}
	origin := uint8(unix.SO_EE_ORIGIN_ICMP)
	if v6 {
		origin = unix.SO_EE_ORIGIN_ICMP6
	}
	e, ok = classifyICMP(origin, msg[0], msg[1])
	if !ok {
		return netip.Addr{}, nil, ICMPError{}, false
	}
	e.Err = icmpErrno(v6, msg[0], msg[1])
	q := msg[8:]
	if v6 {
		if len(q) < 40+8 || q[0]>>4 != 6 || q[6] != 58 || q[40] != 128 {
			return netip.Addr{}, nil, ICMPError{}, false
		}
		return netip.AddrFrom16([16]byte(q[24:40])), q[40:], e, true
	}
	if len(q) < 20 || q[0]>>4 != 4 {
		return netip.Addr{}, nil, ICMPError{}, false
	}
	ihl := int(q[0]&0x0f) * 4
	if ihl < 20 || len(q) < ihl+8 || q[9] != 1 || q[ihl] != 8 {
		return netip.Addr{}, nil, ICMPError{}, false
	}
	return netip.AddrFrom4([4]byte(q[16:20])), q[ihl:], e, true
}

// icmpErrno is the error the kernel makes of an ICMP error, as a socket
// with IP_RECVERR would report it.
func icmpErrno(v6 bool, typ, code uint8) error {
	if v6 {
		if typ == icmpv6Unreachable {
			switch code {
			case 0:
				return unix.ENETUNREACH
			case 1:
				return unix.EACCES
			case 4:
				return unix.ECONNREFUSED
			}
		}
		return unix.EHOSTUNREACH
	}
	if typ == icmpv4Unreachable {
		switch code {
		case 0:
			return unix.ENETUNREACH
		case 3:
			return unix.ECONNREFUSED
		}
	}
	return unix.EHOSTUNREACH
}
