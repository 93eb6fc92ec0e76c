package service

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
)

// GuessEndpoint guesses the HOST:PORT clients reach the gateway at: the
// host's first global unicast address, public ones first, else its name.
// Only an operator knows the real answer (NAT, DNS names), so callers mark
// the result as a guess.
func GuessEndpoint(port int) string {
	var private, public []netip.Addr
	if addrs, err := net.InterfaceAddrs(); err == nil {
		for _, a := range addrs {
			pfx, err := netip.ParsePrefix(a.String())
			if err != nil {
				continue
			}
			ip := pfx.Addr()
			if !ip.IsGlobalUnicast() {
				continue
			}
			if ip.IsPrivate() || (ip.Is4() && netip.MustParsePrefix("100.64.0.0/10").Contains(ip)) {
				private = append(private, ip)
			} else {
				public = append(public, ip)
			}
		}
	}
	// IPv4 first: clients on IPv4-only networks are the common case.
	for _, list := range [][]netip.Addr{public, private} {
		for _, want4 := range []bool{true, false} {
			for _, ip := range list {
				if ip.Is4() == want4 {
					return netip.AddrPortFrom(ip, uint16(port)).String()
				}
			}
		}
	}
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "localhost"
	}
	return net.JoinHostPort(host, strconv.Itoa(port))
}

// ResolvConfUpstreams reads the nameservers of a resolv.conf file.
func ResolvConfUpstreams(path string) ([]netip.AddrPort, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []netip.AddrPort
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 || fields[0] != "nameserver" {
			continue
		}
		// A zone (fe80::1%eth0) is kept: the egress socket needs it.
		ip, err := netip.ParseAddr(fields[1])
		if err != nil {
			continue
		}
		out = append(out, netip.AddrPortFrom(ip, 53))
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(out) == 0 {
		return nil, errors.New(path + ": no nameserver")
	}
	return out, nil
}
