//go:build unix

package relay

import (
	"io"
	"net"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// useSocketWait lets the relay wait for a socket's data without a buffer,
// by peeking at it.
func (e *end) useSocketWait(c net.Conn) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return
	}
	if rc, err := sc.SyscallConn(); err == nil {
		e.rc = rc
		e.peekFn = e.peek
		e.wait = e.waitSocket
	}
}

// useSocketTry lets the relay read a socket without waiting.
func (e *end) useSocketTry() {
	if e.rc != nil {
		e.readFn = e.read
		e.try = e.trySocket
	}
}

// waitSocket waits until the socket has data, an EOF or an error to read,
// by peeking at it.
func (e *end) waitSocket() error {
	if err := e.rc.Read(e.peekFn); err != nil {
		return err
	}
	// The kernel hands a socket's error (a RST) to one receive only, even
	// a peek: the read after would see a plain EOF.
	err := e.peekErr
	e.peekErr = nil
	if err != nil {
		return os.NewSyscallError("recvfrom", err)
	}
	return nil
}

func (e *end) peek(fd uintptr) bool {
	_, _, err := unix.Recvfrom(int(fd), e.peekBuf[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
	if err == unix.EAGAIN || err == unix.EINTR {
		return false
	}
	e.peekErr = err
	return true
}

// trySocket is one non-blocking read of the socket.
func (e *end) trySocket(p []byte) (int, bool, error) {
	e.tryBuf = p
	err := e.rc.Read(e.readFn)
	e.tryBuf = nil
	n, rerr := e.tryN, e.tryErr
	e.tryErr = nil
	switch {
	case err != nil:
		return 0, true, err
	case rerr == unix.EAGAIN || rerr == unix.EINTR:
		return 0, false, nil
	case rerr != nil:
		return 0, true, os.NewSyscallError("read", rerr)
	case n == 0 && len(p) > 0:
		return 0, true, io.EOF
	}
	return n, true, nil
}

func (e *end) read(fd uintptr) bool {
	e.tryN, e.tryErr = unix.Read(int(fd), e.tryBuf)
	return true // never wait: the relay waits without a buffer
}
