//go:build linux

package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/device"
)

// lossBlastStats is what the hostile sender did.
type lossBlastStats struct {
	from     netip.AddrPort // its own socket's address
	captured int            // the client's datagrams it copied off the wire
	sent     int
	// by kind
	garbage, forged, truncated, corrupted, replayed int
	// shapeMalformed were not WireGuard messages by type and size, which
	// the gateway counts; forgedHandshakes were handshake messages of the
	// right size that no key opens, which it counts too.
	shapeMalformed, forgedHandshakes int
	ended                            time.Time
}

func (s lossBlastStats) String() string {
	return fmt.Sprintf("%d datagrams from %s (%d garbage, %d forged WireGuard messages, %d truncated, %d corrupted and %d replayed copies of %d of the client's datagrams)",
		s.sent, s.from, s.garbage, s.forged, s.truncated, s.corrupted, s.replayed, s.captured)
}

// blast sends at most max hostile datagrams to the gateway's WireGuard
// port from C for about d, at up to ~10000 a second. It first copies up
// to 64 of the client's own datagrams off C's veth (the transfer must be
// running), then cycles through: random bytes; WireGuard messages of the
// right type and size with random contents; the client's datagrams cut
// short, or with one byte flipped, sent from its own socket; and exact
// replays of the client's datagrams, from the client's address and port
// (a raw socket), which only WireGuard's replay protection can tell from
// the real thing.
func (l *lossLab) blast(d time.Duration, max int) (lossBlastStats, error) {
	var st lossBlastStats
	gw := netip.MustParseAddr(lossGateway)
	var udp *net.UDPConn
	var capFD, rawFD int = -1, -1
	defer func() {
		if udp != nil {
			udp.Close()
		}
		if capFD >= 0 {
			unix.Close(capFD)
		}
		if rawFD >= 0 {
			unix.Close(rawFD)
		}
	}()
	err := lossInNetns(l.c, func() (err error) {
		if udp, err = net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(gw, lossWGPort))); err != nil {
			return err
		}
		ifc, err := net.InterfaceByName("c-g")
		if err != nil {
			return err
		}
		// ETH_P_ALL: a socket for one protocol sees only what arrives.
		if capFD, err = unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, int(lossHtons(unix.ETH_P_ALL))); err != nil {
			return fmt.Errorf("packet socket: %w", err)
		}
		if err := unix.Bind(capFD, &unix.SockaddrLinklayer{Protocol: lossHtons(unix.ETH_P_ALL), Ifindex: ifc.Index}); err != nil {
			return fmt.Errorf("bind packet socket to c-g: %w", err)
		}
		if err := unix.SetsockoptTimeval(capFD, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 200_000}); err != nil {
			return err
		}
		if rawFD, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW); err != nil {
			return fmt.Errorf("raw socket: %w", err)
		}
		return nil
	})
	if err != nil {
		return st, err
	}
	st.from = netip.MustParseAddrPort(udp.LocalAddr().String())

	// The client's datagrams to the gateway, whole IPv4 packets.
	var captured [][]byte
	buf := make([]byte, 65536)
	for deadline := time.Now().Add(2 * time.Second); len(captured) < 64 && time.Now().Before(deadline); {
		n, from, err := unix.Recvfrom(capFD, buf, 0)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return st, fmt.Errorf("capture: %w", err)
		}
		ll, ok := from.(*unix.SockaddrLinklayer)
		if !ok || ll.Pkttype != unix.PACKET_OUTGOING || ll.Protocol != lossHtons(unix.ETH_P_IP) {
			continue
		}
		p := buf[:n]
		if ihl := lossUDPToGateway(p, gw); ihl > 0 && binary.BigEndian.Uint16(p[ihl:]) != st.from.Port() {
			captured = append(captured, append([]byte(nil), p...))
		}
	}
	unix.Close(capFD)
	capFD = -1
	st.captured = len(captured)
	if len(captured) == 0 {
		return st, errors.New("captured none of the client's datagrams in 2s")
	}

	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 14))
	send := func(p []byte) {
		if _, err := udp.Write(p); err == nil {
			st.sent++
			if !lossWellFormed(p) {
				st.shapeMalformed++
			} else if t := binary.LittleEndian.Uint32(p); t == device.MessageInitiationType || t == device.MessageResponseType {
				st.forgedHandshakes++
			}
		}
	}
	dst := &unix.SockaddrInet4{Addr: gw.As4()}
	end := time.Now().Add(d)
	for i := 0; i < max && time.Now().Before(end); i++ {
		if i%32 == 31 {
			time.Sleep(3 * time.Millisecond)
		}
		real := captured[rng.IntN(len(captured))]
		ihl := int(real[0]&0x0f) * 4
		payload := real[ihl+8:]
		switch i % 6 {
		case 0:
			p := make([]byte, rng.IntN(1400)+1)
			lossFill(rng, p)
			send(p)
			st.garbage++
		case 1:
			sizes := map[uint32]int{
				device.MessageInitiationType:  device.MessageInitiationSize,
				device.MessageResponseType:    device.MessageResponseSize,
				device.MessageCookieReplyType: device.MessageCookieReplySize,
				device.MessageTransportType:   device.MessageTransportSize + rng.IntN(1400),
			}
			typ := uint32(rng.IntN(4) + 1)
			p := make([]byte, sizes[typ])
			lossFill(rng, p)
			binary.LittleEndian.PutUint32(p, typ)
			send(p)
			st.forged++
		case 2:
			send(payload[:rng.IntN(len(payload))])
			st.truncated++
		case 3:
			p := append([]byte(nil), payload...)
			p[rng.IntN(len(p))] ^= byte(rng.IntN(255) + 1)
			send(p)
			st.corrupted++
		default:
			// The UDP checksum of a packet taken on its way out may be
			// left for the NIC to fill in; none is valid for IPv4.
			p := append([]byte(nil), real...)
			binary.BigEndian.PutUint16(p[ihl+6:], 0)
			if err := unix.Sendto(rawFD, p, 0, dst); err == nil {
				st.sent++
				st.replayed++
			}
		}
	}
	st.ended = time.Now()
	return st, nil
}

// lossUDPToGateway returns the IP header length of an IPv4 UDP packet to
// the gateway's WireGuard port with a payload, or 0 for anything else.
func lossUDPToGateway(p []byte, gw netip.Addr) int {
	if len(p) < 20 || p[0]>>4 != 4 || p[9] != unix.IPPROTO_UDP {
		return 0
	}
	ihl := int(p[0]&0x0f) * 4
	if len(p) < ihl+8+device.MinMessageSize || netip.AddrFrom4([4]byte(p[16:20])) != gw || binary.BigEndian.Uint16(p[ihl+2:]) != lossWGPort {
		return 0
	}
	return ihl
}

// lossWellFormed reports whether a datagram has the type and size of a
// WireGuard message, which is all that wireguard-go checks before it
// drops one without a word (and sluice counts it).
func lossWellFormed(p []byte) bool {
	if len(p) < device.MinMessageSize {
		return false
	}
	switch binary.LittleEndian.Uint32(p) {
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

func lossFill(rng *rand.Rand, p []byte) {
	for i := range p {
		p[i] = byte(rng.Uint32())
	}
}

func lossHtons(v uint16) uint16 { return v<<8 | v>>8 }
