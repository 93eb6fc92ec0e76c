package config

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap/zapcore"

	"github.com/sluice-vpn/sluice/nat"
)

// This file holds the text forms of the typed values: a parse function
// whose error is the message after "FIELD: ", and a format function whose
// output the parse function reads back to the same value.

func parseListen(s string) (ListenAddr, error) {
	if !strings.Contains(s, ":") {
		// A bare port, as a YAML number gives it.
		p, err := parsePort(s)
		return ListenAddr{Port: p}, err
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return ListenAddr{}, fmt.Errorf("%q is not [ADDR]:PORT", s)
	}
	var l ListenAddr
	if host != "" {
		if l.Addr, err = netip.ParseAddr(host); err != nil {
			return ListenAddr{}, fmt.Errorf("%q: %q is not an IP address", s, host)
		}
	}
	if l.Port, err = parsePort(port); err != nil {
		return ListenAddr{}, fmt.Errorf("%q: %w", s, err)
	}
	return l, nil
}

// parsePort reads a port, 1-65535.
func parsePort(s string) (uint16, error) {
	n, err := strconv.ParseInt(s, 10, 64)
	switch {
	case err != nil && errors.Is(err, strconv.ErrRange):
		return 0, fmt.Errorf("%s is above 65535", s)
	case err != nil:
		return 0, fmt.Errorf("port %q is not a number", s)
	case n < 1:
		return 0, fmt.Errorf("port %d is below 1", n)
	case n > 65535:
		return 0, fmt.Errorf("%d is above 65535", n)
	}
	return uint16(n), nil
}

// parsePorts reads "LO-HI" or a single port.
func parsePorts(s string) (nat.PortRange, error) {
	los, his, isRange := strings.Cut(s, "-")
	lo, err := parsePort(strings.TrimSpace(los))
	if err != nil {
		return nat.PortRange{}, err
	}
	if !isRange {
		return nat.PortRange{Lo: lo, Hi: lo}, nil
	}
	hi, err := parsePort(strings.TrimSpace(his))
	if err != nil {
		return nat.PortRange{}, err
	}
	if lo > hi {
		return nat.PortRange{}, fmt.Errorf("%s: %d is above %d", s, lo, hi)
	}
	return nat.PortRange{Lo: lo, Hi: hi}, nil
}

func formatPorts(r nat.PortRange) string {
	if r.Lo == r.Hi {
		return strconv.Itoa(int(r.Lo))
	}
	return fmt.Sprintf("%d-%d", r.Lo, r.Hi)
}

// shard is "I/N"; its range is checked by Validate so that a Config built
// in code gets the same messages.
type shard struct{ i, n int }

func parseShard(s string) (shard, error) {
	is, ns, ok := strings.Cut(s, "/")
	if !ok {
		return shard{}, fmt.Errorf("%q is not I/N, for example 0/4", s)
	}
	i, err := strconv.Atoi(strings.TrimSpace(is))
	if err != nil {
		return shard{}, fmt.Errorf("%q: index %q is not a number", s, is)
	}
	n, err := strconv.Atoi(strings.TrimSpace(ns))
	if err != nil {
		return shard{}, fmt.Errorf("%q: count %q is not a number", s, ns)
	}
	return shard{i, n}, nil
}

var filterings = map[string]nat.Filtering{
	nat.FilterAddressPortDependent.String(): nat.FilterAddressPortDependent,
	nat.FilterEndpointIndependent.String():  nat.FilterEndpointIndependent,
}

func parseFiltering(s string) (nat.Filtering, error) {
	f, ok := filterings[s]
	if !ok {
		return 0, fmt.Errorf("%q is neither %s nor %s", s, nat.FilterAddressPortDependent, nat.FilterEndpointIndependent)
	}
	return f, nil
}

// levels are the log levels a gateway has use for; zap's panic and fatal
// levels are for programs that crash on purpose.
var levels = []zapcore.Level{zapcore.DebugLevel, zapcore.InfoLevel, zapcore.WarnLevel, zapcore.ErrorLevel}

func parseLevel(s string) (zapcore.Level, error) {
	for _, l := range levels {
		if strings.EqualFold(s, l.String()) {
			return l, nil
		}
	}
	return 0, fmt.Errorf("%q is not debug, info, warn or error", s)
}

func parseDuration(s string) (time.Duration, error) {
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, fmt.Errorf("%q is not a duration such as 30s, 2m or 120h", s)
	}
	return d, nil
}

// formatDuration writes whole hours, minutes or seconds as "120h", "2m",
// "30s" rather than time.Duration's "120h0m0s".
func formatDuration(d time.Duration) string {
	switch {
	case d == 0:
		return "0s"
	case d%time.Hour == 0:
		return fmt.Sprintf("%dh", d/time.Hour)
	case d%time.Minute == 0:
		return fmt.Sprintf("%dm", d/time.Minute)
	case d%time.Second == 0:
		return fmt.Sprintf("%ds", d/time.Second)
	}
	return d.String()
}

func parseAddr(s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("%q is not an IP address", s)
	}
	return a, nil
}

// parsePool reads a pool prefix; "" disables the family.
func parsePool(s string) (netip.Prefix, error) {
	if s == "" {
		return netip.Prefix{}, nil
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%q is not a prefix such as 100.96.0.0/12", s)
	}
	return p, nil
}

func formatPool(p netip.Prefix) string {
	if !p.IsValid() {
		return ""
	}
	return p.String()
}

// parseUpstream reads ADDR or ADDR:PORT ([ADDR]:PORT for IPv6); the port
// is 53 when omitted.
func parseUpstream(s string) (netip.AddrPort, error) {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap, nil
	}
	if a, err := netip.ParseAddr(s); err == nil {
		return netip.AddrPortFrom(a, 53), nil
	}
	if host, port, err := net.SplitHostPort(s); err == nil {
		if _, err := netip.ParseAddr(host); err == nil {
			if _, err := parsePort(port); err != nil {
				return netip.AddrPort{}, fmt.Errorf("%q: %w", s, err)
			}
		}
	}
	return netip.AddrPort{}, fmt.Errorf("%q is not an address (ADDR or ADDR:PORT)", s)
}

func parseRule(s string) (nat.Rule, error) {
	r, err := nat.ParseRule(s)
	if err != nil {
		// nat names itself in its errors; here the field says where the
		// rule is, and the package prefix is noise to an operator.
		return nat.Rule{}, errors.New(strings.TrimPrefix(err.Error(), "nat: "))
	}
	return r, nil
}

// parseAdminListen reads the admin API's ADDR:PORT; "" is the unix socket
// and localhost is 127.0.0.1. Whether the address may be used is
// Validate's business.
func parseAdminListen(s string) (netip.AddrPort, error) {
	if s == "" {
		return netip.AddrPort{}, nil
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("%q is not ADDR:PORT", s)
	}
	if host == "" {
		return netip.AddrPort{}, fmt.Errorf("%q has no address; give one, for example 127.0.0.1%s", s, s)
	}
	var a netip.Addr
	if strings.EqualFold(host, "localhost") {
		a = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	} else if a, err = netip.ParseAddr(host); err != nil {
		return netip.AddrPort{}, fmt.Errorf("%q: %q is not an IP address", s, host)
	}
	p, err := parsePort(port)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("%q: %w", s, err)
	}
	return netip.AddrPortFrom(a, p), nil
}

func formatAdminListen(ap netip.AddrPort) string {
	if ap == (netip.AddrPort{}) {
		return ""
	}
	return ap.String()
}
