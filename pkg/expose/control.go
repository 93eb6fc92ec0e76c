package expose

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Timeouts of the control API's requests.
const (
	// requestTimeout bounds one registration request. The gateway is an
	// in-process hop away through the tunnel: anything slower is a
	// tunnel that is down.
	requestTimeout = 5 * time.Second
	// deregisterTimeout bounds the DELETE on the way out, which must not
	// hold up a stopping agent for long.
	deregisterTimeout = 2 * time.Second
	// maxAnswer bounds what the agent reads of an answer.
	maxAnswer = 64 << 10
)

// ControlAddr returns the address of the gateway's control API, given the
// DNS servers of a peer configuration (client.Client.DNSServers, or the
// DNS line of a wg-quick file): `sluice peer add` names the gateway's own
// tunnel address there. The first IPv4 server is preferred, else the
// first.
func ControlAddr(dns []netip.Addr) (netip.AddrPort, error) {
	if len(dns) == 0 {
		return netip.AddrPort{}, errors.New("expose: the peer configuration has no DNS line, which names the gateway; pass --control")
	}
	for _, a := range dns {
		if a.Unmap().Is4() {
			return netip.AddrPortFrom(a.Unmap(), ControlPort), nil
		}
	}
	a := dns[0]
	if !a.IsValid() || a.IsUnspecified() {
		return netip.AddrPort{}, fmt.Errorf("expose: DNS server %q cannot be the gateway; pass --control", a)
	}
	return netip.AddrPortFrom(a.WithZone(""), ControlPort), nil
}

// ControlError is an error answer of the control API.
type ControlError struct {
	// StatusCode is the HTTP status.
	StatusCode int
	// Message is the gateway's explanation (ErrorBody.Error), or what
	// the body held if it was not one.
	Message string
}

// Error implements error.
func (e *ControlError) Error() string {
	return fmt.Sprintf("the gateway answered %d %s: %s", e.StatusCode, http.StatusText(e.StatusCode), e.Message)
}

// Refusal reports whether the answer refuses the request as such (a 4xx
// other than 408 and 429), so that repeating it will not help until
// someone changes the gateway's configuration or the agent's.
func (e *ControlError) Refusal() bool {
	return e.StatusCode >= 400 && e.StatusCode < 500 &&
		e.StatusCode != http.StatusRequestTimeout && e.StatusCode != http.StatusTooManyRequests
}

// controlClient speaks the control API through the tunnel.
type controlClient struct {
	url       string // of the registrations collection
	transport *http.Transport
	http      *http.Client
}

func newControlClient(t Tunnel, control netip.AddrPort) *controlClient {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return t.DialContext(ctx, network, addr)
		},
		// A refresh every few seconds costs one connection inside the
		// process; a kept-alive one that a restarted gateway has
		// forgotten would fail a PUT, which net/http does not retry,
		// and look like a lost registration.
		DisableKeepAlives:      true,
		ResponseHeaderTimeout:  requestTimeout,
		MaxResponseHeaderBytes: maxAnswer,
		DisableCompression:     true,
	}
	return &controlClient{
		url:       "http://" + control.String() + RegistrationsPath,
		transport: tr,
		http: &http.Client{
			Transport: tr,
			CheckRedirect: func(*http.Request, []*http.Request) error {
				return http.ErrUseLastResponse
			},
		},
	}
}

// register sends reg and returns the gateway's lease, giving up after
// timeout.
func (c *controlClient) register(ctx context.Context, reg Registration, timeout time.Duration) (Lease, error) {
	body, err := json.Marshal(reg)
	if err != nil {
		return Lease{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, c.url, bytes.NewReader(body))
	if err != nil {
		return Lease{}, err
	}
	req.Header.Set("Content-Type", "application/json")
	answer, err := c.do(req)
	if err != nil {
		return Lease{}, err
	}
	var l Lease
	if err := json.Unmarshal(answer, &l); err != nil {
		return Lease{}, fmt.Errorf("the gateway's answer is not a lease: %w", err)
	}
	return l, nil
}

// deregister asks the gateway to drop the registration of hostname at
// port.
func (c *controlClient) deregister(ctx context.Context, hostname string, port uint16) error {
	q := url.Values{"hostname": {hostname}, "port": {strconv.Itoa(int(port))}}
	req, err := http.NewRequestWithContext(ctx, http.MethodDelete, c.url+"?"+q.Encode(), nil)
	if err != nil {
		return err
	}
	_, err = c.do(req)
	return err
}

// do sends req and returns the body of a 2xx answer, or a *ControlError.
func (c *controlClient) do(req *http.Request) ([]byte, error) {
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxAnswer))
	if err != nil {
		return nil, fmt.Errorf("%s %s: reading the answer: %w", req.Method, req.URL, err)
	}
	if resp.StatusCode/100 == 2 {
		return body, nil
	}
	e := &ControlError{StatusCode: resp.StatusCode}
	var eb ErrorBody
	if json.Unmarshal(body, &eb) == nil && eb.Error != "" {
		e.Message = eb.Error
	} else {
		e.Message = strings.TrimSpace(string(body))
		if len(e.Message) > 200 {
			e.Message = e.Message[:200] + "…"
		}
		if e.Message == "" {
			e.Message = "(no explanation)"
		}
	}
	return nil, e
}

func (c *controlClient) close() { c.transport.CloseIdleConnections() }
