package expose

import (
	"errors"
	"fmt"
	"strings"
)

// The control protocol between an agent and the gateway. The agent speaks
// HTTP/1.1 with JSON bodies, through its tunnel, to ControlPort on the
// gateway's own tunnel address (the DNS server of a peer configuration
// that `sluice peer add` writes). The gateway knows which peer is calling
// from the source address, which WireGuard has authenticated: the peer's
// key is its identity, and the agent's tunnel address is where the edge
// connects back to it.
//
//	PUT    /v1/registrations                          Registration -> Lease
//	DELETE /v1/registrations?hostname=H&port=P        -> 204
//
// A registration is a lease: the agent repeats the PUT every Lease.Refresh,
// and the gateway takes the replica out of rotation once Lease.TTL passes
// without one. Errors come back as a non-2xx status with an ErrorBody.

// ControlPort is the TCP port of the control API on the gateway's tunnel
// addresses.
const ControlPort = 7460

// Paths of the control API.
const RegistrationsPath = "/v1/registrations"

// Protocols an agent serves.
const (
	ProtocolHTTP = "http" // HTTP/1.1 requests, routed by Host
	ProtocolTCP  = "tcp"  // a byte stream, routed by the edge's TCP port
)

// Registration asks the gateway to send a hostname's traffic to the
// calling peer's tunnel address, at Port.
type Registration struct {
	Hostname string            `json:"hostname"`
	Port     uint16            `json:"port"`
	Protocol string            `json:"protocol"`
	Labels   map[string]string `json:"labels,omitempty"`
	// OriginDown says that the agent cannot reach its origin: the edge
	// would only learn it from connections that end at once, and for
	// TCP not even then, since the edge's connection to the agent
	// succeeds. The edge sends such a replica traffic only when no
	// other can serve. The agent repeats the registration as soon as
	// this changes, without waiting for the next refresh.
	OriginDown bool `json:"origin_down,omitempty"`
}

// Lease is the gateway's answer to a Registration.
type Lease struct {
	// ID names the replica: the same for every refresh of one
	// registration.
	ID string `json:"id"`
	// TTLSeconds is how long the registration stands without a refresh.
	TTLSeconds float64 `json:"ttl_seconds"`
	// RefreshSeconds is how often the agent should refresh it.
	RefreshSeconds float64 `json:"refresh_seconds"`
	// Weight is the replica's share of its hostname's traffic, from the
	// gateway's weight rules; informative.
	Weight int `json:"weight"`
}

// ErrorBody is the body of every error answer.
type ErrorBody struct {
	Error string `json:"error"`
}

// Limits of what a registration may carry.
const (
	MaxHostnameLen = 253
	MaxLabels      = 16
	MaxLabelLen    = 63 // keys and values alike
)

// CheckHostname reports whether h is a hostname the edge can route: a
// lower-case DNS name of letters, digits and hyphens, with at least two
// labels, no trailing dot and no port.
func CheckHostname(h string) error {
	if h == "" {
		return errors.New("hostname is empty")
	}
	if len(h) > MaxHostnameLen {
		return fmt.Errorf("hostname %.20q…: longer than %d bytes", h, MaxHostnameLen)
	}
	labels := strings.Split(h, ".")
	if len(labels) < 2 {
		return fmt.Errorf("hostname %q: needs a dot (app.example.com)", h)
	}
	for _, l := range labels {
		if l == "" || len(l) > 63 {
			return fmt.Errorf("hostname %q: empty or over-long label", h)
		}
		if l[0] == '-' || l[len(l)-1] == '-' {
			return fmt.Errorf("hostname %q: a label starts or ends with '-'", h)
		}
		for i := 0; i < len(l); i++ {
			c := l[i]
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
				return fmt.Errorf("hostname %q: %q is not allowed (lower-case letters, digits, '-' and '.')", h, c)
			}
		}
	}
	return nil
}

// CheckLabels reports whether labels fit the limits: at most MaxLabels,
// keys of [a-z0-9_.-/] and values of printable ASCII without spaces, each
// 1-63 bytes (values may be empty).
func CheckLabels(labels map[string]string) error {
	if len(labels) > MaxLabels {
		return fmt.Errorf("%d labels: at most %d", len(labels), MaxLabels)
	}
	for k, v := range labels {
		if k == "" || len(k) > MaxLabelLen {
			return fmt.Errorf("label key %q: 1-%d bytes", k, MaxLabelLen)
		}
		for i := 0; i < len(k); i++ {
			c := k[i]
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || strings.IndexByte("_.-/", c) >= 0) {
				return fmt.Errorf("label key %q: %q is not allowed (a-z, 0-9, '_', '.', '-', '/')", k, c)
			}
		}
		if len(v) > MaxLabelLen {
			return fmt.Errorf("label %s: value longer than %d bytes", k, MaxLabelLen)
		}
		for i := 0; i < len(v); i++ {
			if v[i] <= ' ' || v[i] > '~' {
				return fmt.Errorf("label %s: value has %q (printable ASCII, no spaces)", k, v[i])
			}
		}
	}
	return nil
}

// Check validates a registration as the gateway will.
func (r Registration) Check() error {
	if err := CheckHostname(r.Hostname); err != nil {
		return err
	}
	if r.Port == 0 {
		return errors.New("port is 0")
	}
	if r.Protocol != ProtocolHTTP && r.Protocol != ProtocolTCP {
		return fmt.Errorf("protocol %q: want %q or %q", r.Protocol, ProtocolHTTP, ProtocolTCP)
	}
	return CheckLabels(r.Labels)
}
