package wireguard

import (
	"encoding/binary"
	"sync/atomic"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
)

// countingBind counts the datagrams that cannot be WireGuard messages
// (too short, an unknown type, a handshake message of the wrong size),
// which wireguard-go drops without a word.
type countingBind struct {
	conn.Bind
	malformed *atomic.Uint64
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

// wellFormed reports whether a datagram has the type and size of a
// WireGuard message, as wireguard-go checks before anything else.
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
	case device.MessageTransportType:
		return len(p) >= device.MessageTransportSize
	}
	return false
}

// rejectedFormats are the wireguard-go log messages of a well-formed
// datagram that failed authentication: a bad MAC, a handshake no peer's
// key opens. Each is counted as malformed whether or not it is logged.
// (Transport messages that fail decryption or name no session are dropped
// without a message, and are not counted.)
var rejectedFormats = map[string]bool{
	"Received packet with invalid mac1":           true,
	"Received invalid initiation message from %s": true,
	"Received invalid response message from %s":   true,
	"Failed to decode initiation message":         true,
	"Failed to decode response message":           true,
	"Failed to decode cookie reply":               true,
	"Could not decrypt invalid cookie response":   true,
}
