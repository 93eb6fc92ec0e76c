package wireguard

import (
	"fmt"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.zx2c4.com/wireguard/device"
)

// perPacketInterval is how often at most a message that wireguard-go emits
// per packet is passed on. Those messages are driven by what remote hosts
// send, so without a limit a spoofing client or a port scan would decide how
// much we log.
const perPacketInterval = 10 * time.Second

// perPacketFormats are the wireguard-go log formats that can fire once per
// received or sent packet. The list follows wireguard-go's device package;
// a format missing here is merely logged unlimited at its level.
var perPacketFormats = []string{
	"IPv4 packet with disallowed source address from %v",
	"IPv6 packet with disallowed source address from %v",
	"Packet with invalid IP version from %v",
	"Received packet with unknown IP version",
	"Received message with unknown type",
	"Received packet with invalid mac1",
	"Received invalid initiation message from %s",
	"Received invalid response message from %s",
	"Failed to decode cookie reply",
	"Could not decrypt invalid cookie response",
	"Sending cookie response for denied handshake message for %v",
	"Failed to receive %s packet: %v",
	"Dropped some packets from multi-segment read: %v",
	"Failed to read packet from TUN device: %v",
	"Failed to write packets to TUN device: %v",
	"%v - Failed to send data packets: %v",
}

// limiter lets one message through per perPacketInterval and counts the rest.
type limiter struct {
	next       atomic.Int64 // unix nanoseconds before which messages are suppressed
	suppressed atomic.Uint64
}

// allow reports whether a message may be logged now and, if so, how many
// were suppressed since the last one.
func (l *limiter) allow(now time.Time) (bool, uint64) {
	next := l.next.Load()
	if now.UnixNano() < next || !l.next.CompareAndSwap(next, now.Add(perPacketInterval).UnixNano()) {
		l.suppressed.Add(1)
		return false, 0
	}
	return true, l.suppressed.Swap(0)
}

// newDeviceLogger maps wireguard-go's printf-style logger onto zap:
// Verbosef at Debug, Errorf at Warn. Errorf is Warn rather than Error because
// wireguard-go reports through it what remote peers and the network do to it
// (failed sends, undecodable handshakes), which needs attention only when it
// persists; our own failures reach the caller as returned errors.
//
// Messages in rejectedFormats are counted in rejected, logged or not.
func newDeviceLogger(log *zap.Logger, rejected *atomic.Uint64) *device.Logger {
	limits := make(map[string]*limiter, len(perPacketFormats))
	for _, f := range perPacketFormats {
		limits[f] = new(limiter)
	}
	logf := func(level zapcore.Level) func(string, ...any) {
		if !log.Core().Enabled(level) {
			// Formatting costs even when zap would drop the entry, and some
			// of these calls sit on the packet path.
			return func(format string, _ ...any) {
				if rejectedFormats[format] {
					rejected.Add(1)
				}
			}
		}
		return func(format string, args ...any) {
			if rejectedFormats[format] {
				rejected.Add(1)
			}
			var fields []zap.Field
			if l := limits[format]; l != nil {
				ok, suppressed := l.allow(time.Now())
				if !ok {
					return
				}
				if suppressed > 0 {
					fields = append(fields, zap.Uint64("suppressed", suppressed))
				}
			}
			if ce := log.Check(level, fmt.Sprintf(format, args...)); ce != nil {
				ce.Write(fields...)
			}
		}
	}
	return &device.Logger{
		Verbosef: logf(zapcore.DebugLevel),
		Errorf:   logf(zapcore.WarnLevel),
	}
}
