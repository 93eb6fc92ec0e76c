//go:build !unix

package relay

import "net"

// Elsewhere the relay reads with a buffer in hand: these are unix's ways
// around that.
func (e *end) useSocketWait(net.Conn) {}

func (e *end) useSocketTry() {}
