package wireguard

import (
	"encoding/binary"
	"sync/atomic"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
)

// countingBind counts the datagrams that cannot be WireGuard messages and
// that wireguard-go drops without a word: too short, or a handshake
// message of the wrong size. (A message of an unknown type it logs, and
// the logger counts those.)
type countingBind struct {
	conn.Bind
	malformed *atomic.Uint64
}

// countMalformed wraps bind to count malformed datagrams, unless it is
// wireguard-go's own: the device runs its sticky-socket route listener
// only for a *conn.StdNetBind, and a wrapper would turn that off. On the
// default bind, only what the logger sees is counted.
func countMalformed(bind conn.Bind, malformed *atomic.Uint64) conn.Bind {
	if _, std := bind.(*conn.StdNetBind); std {
		return bind
	}
	return &countingBind{Bind: bind, malformed: malformed}
}

func (b *countingBind) Open(port uint16) ([]conn.ReceiveFunc, uint16, error) {
	fns, actual, err := b.Bind.Open(port)
	if err != nil {
		return nil, 0, err
	}
	for i, fn := range fns {
		fns[i] = func(bufs [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
			n, err := fn(bufs, sizes, eps)
			for j := range n {
				if !wellFormed(bufs[j][:sizes[j]]) {
					b.malformed.Add(1)
				}
			}
			return n, err
		}
	}
	return fns, actual, nil
}

// wellFormed reports whether a datagram passes wireguard-go's silent
// checks: long enough, and of the size its type has. An unknown type
// passes here: wireguard-go logs it.
func wellFormed(p []byte) bool {
	if len(p) < device.MinMessageSize {
		return false
	}
	switch binary.LittleEndian.Uint32(p[:4]) {
	case device.MessageInitiationType:
		return len(p) == device.MessageInitiationSize
	case device.MessageResponseType:
		return len(p) == device.MessageResponseSize
	case device.MessageCookieReplyType:
		return len(p) == device.MessageCookieReplySize
	}
	return true
}

// rejectedFormats are the wireguard-go log messages of a datagram of an
// unknown type, or one that failed authentication: a bad MAC, a handshake
// no peer's key opens. Each is counted as malformed whether or not it is
// logged.
// (Transport messages that fail decryption or name no session are dropped
// without a message, and are not counted.)
var rejectedFormats = map[string]bool{
	"Received message with unknown type":          true,
	"Received packet with invalid mac1":           true,
	"Received invalid initiation message from %s": true,
	"Received invalid response message from %s":   true,
	"Failed to decode initiation message":         true,
	"Failed to decode response message":           true,
	"Failed to decode cookie reply":               true,
	"Could not decrypt invalid cookie response":   true,
}
