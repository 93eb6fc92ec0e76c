package nat

import (
	"fmt"
	"strconv"
	"strings"
)

// PortRange is an inclusive range of ports. The zero value means every port.
type PortRange struct {
	Lo, Hi uint16
}

// ParsePortRange parses "N" or "LO-HI".
func ParsePortRange(s string) (PortRange, error) {
	lo, hi, isRange := strings.Cut(s, "-")
	l, err := parsePort(lo)
	if err != nil {
		return PortRange{}, err
	}
	if !isRange {
		return PortRange{l, l}, nil
	}
	h, err := parsePort(hi)
	if err != nil {
		return PortRange{}, err
	}
	if h < l {
		return PortRange{}, fmt.Errorf("port range %q: %d is below %d", s, h, l)
	}
	return PortRange{l, h}, nil
}

func parsePort(s string) (uint16, error) {
	n, err := strconv.ParseUint(strings.TrimSpace(s), 10, 32)
	if err != nil {
		return 0, fmt.Errorf("port %q is not a number", s)
	}
	if n < 1 || n > 65535 {
		return 0, fmt.Errorf("port %d is outside 1-65535", n)
	}
	return uint16(n), nil
}

// IsZero reports whether r is the zero value, which means every port.
func (r PortRange) IsZero() bool { return r == PortRange{} }

// Contains reports whether port p is in r. The zero range contains every port.
func (r PortRange) Contains(p uint16) bool {
	return r.IsZero() || (p >= r.Lo && p <= r.Hi)
}

// Len is the number of ports in r.
func (r PortRange) Len() int {
	if r.IsZero() {
		return 65536
	}
	return int(r.Hi) - int(r.Lo) + 1
}

func (r PortRange) String() string {
	switch {
	case r.IsZero():
		return "any"
	case r.Lo == r.Hi:
		return strconv.Itoa(int(r.Lo))
	}
	return fmt.Sprintf("%d-%d", r.Lo, r.Hi)
}
