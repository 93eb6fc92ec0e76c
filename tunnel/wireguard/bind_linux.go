package wireguard

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// controlSize is room for the one control message AddrBind reads or
// writes: UDP_GRO's or UDP_SEGMENT's segment size.
var controlSize = unix.CmsgSpace(2)

// setSocketOptions sizes the socket buffers and turns on receive offload,
// reporting whether it is on. The buffers are asked for up to the sysctl
// maximum first, then beyond it, which only CAP_NET_ADMIN may do: failing
// that costs throughput on fast links, nothing else, so errors are ignored.
func setSocketOptions(fd uintptr) (rxOffload bool, err error) {
	s := int(fd)
	_ = unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_RCVBUF, socketBufferSize)
	_ = unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_SNDBUF, socketBufferSize)
	_ = unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, socketBufferSize)
	_ = unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, socketBufferSize)
	// What counts is whether the kernel took the option: once it has, it
	// coalesces, whether or not it can report the option back (kernels
	// before 5.12 cannot).
	return unix.SetsockoptInt(s, unix.IPPROTO_UDP, unix.UDP_GRO, 1) == nil, nil
}

// supportsSegmentation reports whether the kernel knows UDP_SEGMENT.
func supportsSegmentation(pc *net.UDPConn) bool {
	rc, err := pc.SyscallConn()
	if err != nil {
		return false
	}
	ok := false
	rc.Control(func(fd uintptr) {
		_, err := unix.GetsockoptInt(int(fd), unix.IPPROTO_UDP, unix.UDP_SEGMENT)
		ok = err == nil
	})
	return ok
}

// segmentSize returns the segment size of a coalesced receive, 0 if the
// datagram came alone.
func segmentSize(oob []byte) (int, error) {
	for len(oob) >= unix.CmsgLen(0) {
		h, data, rest, err := unix.ParseOneSocketControlMessage(oob)
		if err != nil {
			return 0, fmt.Errorf("parse control message: %w", err)
		}
		if h.Level == unix.SOL_UDP && h.Type == unix.UDP_GRO && len(data) >= 2 {
			// The kernel writes an int; its low 16 bits hold the size.
			return int(binary.NativeEndian.Uint16(data)), nil
		}
		oob = rest
	}
	return 0, nil
}

// appendSegmentSize appends a UDP_SEGMENT control message: the kernel cuts
// the datagram into pieces of size bytes.
func appendSegmentSize(oob []byte, size uint16) []byte {
	start := len(oob)
	oob = append(oob, make([]byte, unix.CmsgSpace(2))...)
	h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[start]))
	h.Level = unix.SOL_UDP
	h.Type = unix.UDP_SEGMENT
	h.SetLen(unix.CmsgLen(2))
	binary.NativeEndian.PutUint16(oob[start+unix.CmsgLen(0):], size)
	return oob
}

// refusesOne tells an error that concerns one datagram of a batch, not
// the socket: nftables or iptables dropped it (EPERM), no route to its
// destination, too big, or a full queue for it.
func refusesOne(err error) bool {
	var se *os.SyscallError
	if !errors.As(err, &se) {
		return false
	}
	switch se.Err {
	case unix.EPERM, unix.EACCES, unix.ENETUNREACH, unix.EHOSTUNREACH, unix.EMSGSIZE, unix.ENOBUFS, unix.ECONNREFUSED:
		return true
	}
	return false
}

// disablesSegmentation tells an error of a segmented send that sending
// the datagrams one by one would avoid: EIO from udp_send_skb on a device
// without the checksum offload UDP_SEGMENT needs, and EINVAL where a
// segment with its headers exceeds the path's MTU (a 1460-byte cloud
// network under 1480-byte WireGuard datagrams), which the kernel
// fragments when they go singly.
func disablesSegmentation(err error) bool {
	var se *os.SyscallError
	return errors.As(err, &se) && (se.Err == unix.EIO || se.Err == unix.EINVAL)
}
