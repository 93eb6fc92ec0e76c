package wireguard

import (
	"encoding/hex"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// This file renders and parses the UAPI configuration protocol
// (https://www.wireguard.com/xplatform/#configuration-protocol): newline-
// separated key=value lines, keys in hex, and a public_key line opening each
// peer's section.

// writePeerUAPI writes the set-operation lines that make the device's peer
// p.PublicKey match p, whether it exists already or not. Every setting is
// written, zero values included, so that replacing a peer clears what the
// new configuration leaves out; only the endpoint cannot be unset.
func writePeerUAPI(b *strings.Builder, p Peer) {
	fmt.Fprintf(b, "public_key=%s\n", p.PublicKey.hex())
	fmt.Fprintf(b, "preshared_key=%s\n", p.PresharedKey.hex())
	if p.Endpoint.IsValid() {
		fmt.Fprintf(b, "endpoint=%s\n", p.Endpoint)
	}
	fmt.Fprintf(b, "persistent_keepalive_interval=%d\n", int(p.PersistentKeepalive/time.Second))
	b.WriteString("replace_allowed_ips=true\n")
	for _, pfx := range p.AllowedIPs {
		fmt.Fprintf(b, "allowed_ip=%s\n", pfx.Masked())
	}
}

// parseListenPort finds listen_port in the answer to a get operation. A
// device whose bind is closed reports none, which is an error here.
func parseListenPort(uapi string) (int, error) {
	for line := range strings.Lines(uapi) {
		key, value, _ := strings.Cut(strings.TrimSuffix(line, "\n"), "=")
		if key == "public_key" {
			break // device settings come before the first peer
		}
		if key == "listen_port" {
			port, err := strconv.ParseUint(value, 10, 16)
			if err != nil {
				return 0, fmt.Errorf("uapi: listen_port %q: %w", value, err)
			}
			return int(port), nil
		}
	}
	return 0, fmt.Errorf("uapi: no listen_port: the device has no open bind")
}

// parsePeerStats reads the peers out of the answer to a get operation.
func parsePeerStats(uapi string) ([]PeerStats, error) {
	var (
		stats []PeerStats
		cur   *PeerStats
		sec   int64
	)
	n := 0
	for line := range strings.Lines(uapi) {
		n++
		line = strings.TrimSuffix(line, "\n")
		if line == "" {
			continue
		}
		key, value, ok := strings.Cut(line, "=")
		if !ok {
			return nil, fmt.Errorf("uapi: line %d: no '='", n)
		}
		if key == "public_key" {
			k, err := keyFromHex(value)
			if err != nil {
				return nil, fmt.Errorf("uapi: line %d: public_key: %w", n, err)
			}
			stats = append(stats, PeerStats{PublicKey: k})
			cur = &stats[len(stats)-1]
			continue
		}
		if cur == nil {
			continue // a device setting
		}
		var err error
		switch key {
		case "endpoint":
			cur.Endpoint, err = netip.ParseAddrPort(value)
		case "last_handshake_time_sec":
			sec, err = strconv.ParseInt(value, 10, 64)
		case "last_handshake_time_nsec":
			// wireguard-go writes seconds first, so both halves are known
			// here.
			var nsec int64
			nsec, err = strconv.ParseInt(value, 10, 64)
			if err == nil && (sec != 0 || nsec != 0) {
				cur.LastHandshake = time.Unix(sec, nsec)
			}
			sec = 0
		case "rx_bytes":
			cur.RxBytes, err = strconv.ParseUint(value, 10, 64)
		case "tx_bytes":
			cur.TxBytes, err = strconv.ParseUint(value, 10, 64)
		case "allowed_ip":
			var pfx netip.Prefix
			pfx, err = netip.ParsePrefix(value)
			cur.AllowedIPs = append(cur.AllowedIPs, pfx)
		}
		if err != nil {
			return nil, fmt.Errorf("uapi: line %d: %s: %w", n, key, err)
		}
	}
	return stats, nil
}

func keyFromHex(s string) (Key, error) {
	if len(s) != 2*KeyLen {
		return Key{}, fmt.Errorf("key is %d hex digits, want %d", len(s), 2*KeyLen)
	}
	var k Key
	if _, err := hex.Decode(k[:], []byte(s)); err != nil {
		return Key{}, fmt.Errorf("key is not hex: %w", err)
	}
	return k, nil
}
