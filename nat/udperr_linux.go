package nat

import (
	"errors"
	"net"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// enableRecvErr asks the kernel to queue the ICMP errors that come back
// for what conn sends. Without it an unconnected UDP socket drops them,
// and the client, whose datagram met a closed port, would hear nothing.
func enableRecvErr(conn *net.UDPConn, v6 bool) error {
	rc, err := conn.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		if v6 {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_RECVERR, 1)
			// A dual-stack socket reports IPv4 errors through IP_RECVERR.
			_ = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_RECVERR, 1)
			return
		}
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_RECVERR, 1)
	}); err != nil {
		return err
	}
	return serr
}

// queuedError is one ICMP error from a socket's error queue.
type queuedError struct {
	dst     netip.AddrPort // where the datagram that caused it was going
	payload []byte         // as much of that datagram's payload as came back
	err     ICMPError
}

// udpReader reads datagrams from a socket, draining its error queue into
// errs whenever there is no datagram to read: a socket that queues errors
// becomes readable for them, but an ordinary read does not return them
// (and with epoll's edge triggering they would never wake it again). The
// queued errors' payloads are copied. One datagram costs no allocation:
// the callback the poller runs is bound once.
type udpReader struct {
	rc   syscall.RawConn
	buf  []byte
	errs func(queuedError)
	step func(fd uintptr) bool // r.read, bound once

	n    int
	from netip.AddrPort
	err  error
	oob  [512]byte
}

func newUDPReader(rc syscall.RawConn, buf []byte, errs func(queuedError)) *udpReader {
	r := &udpReader{rc: rc, buf: buf, errs: errs}
	r.step = r.read
	return r
}

// next reads one datagram into the reader's buffer. It returns n < 0,
// and no error, when it handled queued errors instead.
func (r *udpReader) next() (int, netip.AddrPort, error) {
	if err := r.rc.Read(r.step); err != nil {
		return 0, netip.AddrPort{}, err
	}
	if r.err != nil {
		return 0, netip.AddrPort{}, &net.OpError{Op: "read", Net: "udp", Err: r.err}
	}
	return r.n, r.from, nil
}

func (r *udpReader) read(fd uintptr) bool {
	r.n, r.from, r.err = recvFrom(fd, r.buf)
	if r.err == nil {
		return true
	}
	if r.err == unix.EINTR {
		return false
	}
	// EAGAIN, or an error the kernel reports once for the first queued
	// ICMP error (ECONNREFUSED, ...): the queue tells which datagram each
	// belongs to.
	drained := false
	for {
		qn, qoobn, _, qsa, qerr := unix.Recvmsg(int(fd), r.buf, r.oob[:], unix.MSG_ERRQUEUE|unix.MSG_DONTWAIT)
		if qerr != nil {
			break
		}
		drained = true
		if qe, ok := parseQueuedError(r.buf[:qn], r.oob[:qoobn], qsa); ok {
			r.errs(qe)
		}
	}
	if r.err == unix.EAGAIN {
		return false // wait for data or the next error
	}
	if drained {
		// The error was one of those just handled.
		r.err, r.n = nil, -1
	}
	return true
}

// recvFrom is recvfrom(2) without a Sockaddr to allocate for each
// datagram, as unix.Recvfrom has.
func recvFrom(fd uintptr, buf []byte) (int, netip.AddrPort, error) {
	var rsa unix.RawSockaddrAny
	alen := uint32(unix.SizeofSockaddrAny)
	var p unsafe.Pointer
	if len(buf) > 0 {
		p = unsafe.Pointer(&buf[0])
	}
	r, _, e := unix.Syscall6(unix.SYS_RECVFROM, fd, uintptr(p), uintptr(len(buf)), unix.MSG_DONTWAIT,
		uintptr(unsafe.Pointer(&rsa)), uintptr(unsafe.Pointer(&alen)))
	if e != 0 {
		return 0, netip.AddrPort{}, e
	}
	var from netip.AddrPort
	switch rsa.Addr.Family {
	case unix.AF_INET:
		sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(&rsa))
		from = netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), portOf(sa.Port))
	case unix.AF_INET6:
		sa := (*unix.RawSockaddrInet6)(unsafe.Pointer(&rsa))
		from = netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), portOf(sa.Port))
	}
	return int(r), from, nil
}

// portOf reads a port as the kernel stores it, in network byte order.
func portOf(p uint16) uint16 {
	b := (*[2]byte)(unsafe.Pointer(&p))
	return uint16(b[0])<<8 | uint16(b[1])
}

// parseQueuedError reads an error queue message: the payload of the
// datagram, where it went, and the ICMP error.
func parseQueuedError(payload, oob []byte, sa unix.Sockaddr) (queuedError, bool) {
	dst := sockaddrAddrPort(sa)
	for len(oob) >= unix.CmsgLen(0) {
		h, data, rest, err := unix.ParseOneSocketControlMessage(oob)
		if err != nil {
			return queuedError{}, false
		}
		oob = rest
		if !(h.Level == unix.IPPROTO_IP && h.Type == unix.IP_RECVERR) &&
			!(h.Level == unix.IPPROTO_IPV6 && h.Type == unix.IPV6_RECVERR) {
			continue
		}
		if len(data) < int(unsafe.Sizeof(unix.SockExtendedErr{})) {
			return queuedError{}, false
		}
		ee := (*unix.SockExtendedErr)(unsafe.Pointer(&data[0]))
		ue, ok := classifyICMP(ee.Origin, ee.Type, ee.Code)
		if !ok {
			return queuedError{}, false
		}
		ue.Err = syscall.Errno(ee.Errno)
		// The offender, the ICMP error's sender, follows the structure.
		off := data[unsafe.Sizeof(unix.SockExtendedErr{}):]
		ue.From = offender(off)
		if !ue.From.IsValid() {
			ue.From = dst.Addr()
		}
		return queuedError{dst: dst, payload: append([]byte(nil), payload...), err: ue}, dst.IsValid()
	}
	return queuedError{}, false
}

// classifyICMP keeps the errors a client should hear of: unreachables
// and time exceeded. Too big is left out: the kernel learns the path
// MTU from it and fragments, which the client cannot do for it.
func classifyICMP(origin, typ, code uint8) (ICMPError, bool) {
	switch origin {
	case unix.SO_EE_ORIGIN_ICMP:
		switch {
		case typ == 3 && code != 4: // unreachable, but fragmentation needed
			return ICMPError{}, true
		case typ == 11:
			return ICMPError{TimeExceeded: true}, true
		}
	case unix.SO_EE_ORIGIN_ICMP6:
		switch typ {
		case 1: // unreachable
			return ICMPError{}, true
		case 3:
			return ICMPError{TimeExceeded: true}, true
		}
	}
	return ICMPError{}, false
}

// offender parses the sockaddr the kernel puts after sock_extended_err.
func offender(b []byte) netip.Addr {
	if len(b) < 2 {
		return netip.Addr{}
	}
	switch *(*uint16)(unsafe.Pointer(&b[0])) {
	case unix.AF_INET:
		if len(b) >= unix.SizeofSockaddrInet4 {
			return netip.AddrFrom4([4]byte(b[4:8]))
		}
	case unix.AF_INET6:
		if len(b) >= unix.SizeofSockaddrInet6 {
			return netip.AddrFrom16([16]byte(b[8:24])).Unmap()
		}
	}
	return netip.Addr{}
}

func sockaddrAddrPort(sa unix.Sockaddr) netip.AddrPort {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port))
	}
	return netip.AddrPort{}
}

// asyncSendError reports whether a send failed with an error that an
// earlier datagram's ICMP error left on the socket rather than with one
// of its own: the kernel returns the pending error from the next send.
func asyncSendError(err error) bool {
	for _, e := range []error{unix.ECONNREFUSED, unix.EHOSTUNREACH, unix.ENETUNREACH, unix.EHOSTDOWN, unix.EPROTO} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// ttlControl is the control message that sets one datagram's TTL (IPv6:
// hop limit).
func ttlControl(v4 bool, ttl uint8) []byte {
	b := make([]byte, unix.CmsgSpace(4))
	h := (*unix.Cmsghdr)(unsafe.Pointer(&b[0]))
	if v4 {
		h.Level, h.Type = unix.IPPROTO_IP, unix.IP_TTL
	} else {
		h.Level, h.Type = unix.IPPROTO_IPV6, unix.IPV6_HOPLIMIT
	}
	h.SetLen(unix.CmsgLen(4))
	*(*int32)(unsafe.Pointer(&b[unix.CmsgLen(0)])) = int32(ttl)
	return b
}
