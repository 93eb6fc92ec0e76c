package admin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
)

// Client talks to a running gateway's control API.
type Client struct {
	http  *http.Client
	base  string
	token string
}

// NewUnixClient returns a client for the control socket at path.
func NewUnixClient(path string) *Client {
	return newClient("unix", path, "http://"+UnixHost, "")
}

// NewTCPClient returns a client for the API at a TCP address (HOST:PORT),
// which needs the gateway's bearer token (LoadOrCreateToken).
func NewTCPClient(addr, token string) *Client {
	return newClient("tcp", addr, "http://"+addr, token)
}

func newClient(network, addr, base, token string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, addr)
		},
	}
	// No overall timeout: the event stream lasts as long as the caller
	// wants; every call has its context.
	return &Client{http: &http.Client{Transport: tr}, base: base, token: token}
}

// newRequest is a request to the API with what Guard asks for: the
// token, and a JSON content type on whatever changes state, body or not.
func (c *Client) newRequest(ctx context.Context, method, path string, body io.Reader) (*http.Request, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return nil, err
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	if changesState(method) {
		req.Header.Set("Content-Type", "application/json")
	}
	return req, nil
}

// ErrNotRunning means nothing answers on the control socket.
var ErrNotRunning = errors.New("admin: no gateway is running there")

// ErrUnauthorized means the gateway wants its token (TCP only).
var ErrUnauthorized = errors.New("admin: unauthorized")

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := c.newRequest(ctx, method, path, body)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		var op *net.OpError
		if errors.As(err, &op) && op.Op == "dial" {
			return fmt.Errorf("%w (%v)", ErrNotRunning, op.Err)
		}
		return fmt.Errorf("admin: %s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var e errorBody
		json.NewDecoder(io.LimitReader(resp.Body, 1<<16)).Decode(&e)
		cls := errors.New(resp.Status)
		switch resp.StatusCode {
		case http.StatusNotFound:
			cls = ErrNotFound
		case http.StatusConflict:
			cls = ErrConflict
		case http.StatusBadRequest:
			cls = ErrInvalid
		case http.StatusUnauthorized:
			cls = ErrUnauthorized
		}
		// The server's message already starts with its class.
		return fmt.Errorf("%w: %s", cls, strings.TrimPrefix(e.Error, cls.Error()+": "))
	}
	if out == nil {
		return nil
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

// Server returns what a client configuration needs of the gateway.
func (c *Client) Server(ctx context.Context) (ServerInfo, error) {
	var info ServerInfo
	err := c.do(ctx, http.MethodGet, "/v1/server", nil, &info)
	return info, err
}

// Peers lists the peers.
func (c *Client) Peers(ctx context.Context) ([]PeerInfo, error) {
	var peers []PeerInfo
	err := c.do(ctx, http.MethodGet, "/v1/peers", nil, &peers)
	return peers, err
}

// AddPeer adds a peer.
func (c *Client) AddPeer(ctx context.Context, req AddPeerRequest) (AddPeerResponse, error) {
	var resp AddPeerResponse
	err := c.do(ctx, http.MethodPost, "/v1/peers", req, &resp)
	return resp, err
}

// RemovePeer removes a peer.
func (c *Client) RemovePeer(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/peers/"+url.PathEscape(name), nil, nil)
}

// Services lists the published hostnames and their replicas.
func (c *Client) Services(ctx context.Context) ([]ServiceInfo, error) {
	var svcs []ServiceInfo
	err := c.do(ctx, http.MethodGet, "/v1/services", nil, &svcs)
	return svcs, err
}

// Status returns the gateway at a glance.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var st Status
	err := c.do(ctx, http.MethodGet, "/v1/status", nil, &st)
	return st, err
}

// Flows lists the flows that pass f.
func (c *Client) Flows(ctx context.Context, f FlowFilter) ([]FlowInfo, error) {
	var flows []FlowInfo
	err := c.do(ctx, http.MethodGet, "/v1/flows?"+f.Values().Encode(), nil, &flows)
	return flows, err
}

// CountFlows counts the flows that pass f.
func (c *Client) CountFlows(ctx context.Context, f FlowFilter) (int, error) {
	v := f.Values()
	v.Set("count", "true")
	var n struct{ Count int }
	err := c.do(ctx, http.MethodGet, "/v1/flows?"+v.Encode(), nil, &n)
	return n.Count, err
}

// Flow returns one flow.
func (c *Client) Flow(ctx context.Context, id uint64) (FlowInfo, error) {
	var f FlowInfo
	err := c.do(ctx, http.MethodGet, fmt.Sprintf("/v1/flows/%d", id), nil, &f)
	return f, err
}

// DeleteFlow ends one flow, closing both sides.
func (c *Client) DeleteFlow(ctx context.Context, id uint64) error {
	return c.do(ctx, http.MethodDelete, fmt.Sprintf("/v1/flows/%d", id), nil, nil)
}

// DeleteFlows ends every flow that passes f; a zero filter needs all.
func (c *Client) DeleteFlows(ctx context.Context, f FlowFilter, all bool) (int, error) {
	v := f.Values()
	if all {
		v.Set("all", "true")
	}
	var n struct{ Deleted int }
	err := c.do(ctx, http.MethodDelete, "/v1/flows?"+v.Encode(), nil, &n)
	return n.Deleted, err
}

// Events streams the flow events that pass f until ctx is done or the
// gateway goes away; the channel is closed then.
func (c *Client) Events(ctx context.Context, f FlowFilter) (<-chan FlowEvent, error) {
	req, err := c.newRequest(ctx, http.MethodGet, "/v1/events?"+f.Values().Encode(), nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		var op *net.OpError
		if errors.As(err, &op) && op.Op == "dial" {
			return nil, fmt.Errorf("%w (%v)", ErrNotRunning, op.Err)
		}
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		defer resp.Body.Close()
		var e errorBody
		json.NewDecoder(io.LimitReader(resp.Body, 1<<16)).Decode(&e)
		return nil, fmt.Errorf("admin: events: %s: %s", resp.Status, e.Error)
	}
	ch := make(chan FlowEvent)
	go func() {
		defer close(ch)
		defer resp.Body.Close()
		dec := json.NewDecoder(resp.Body)
		for {
			var ev FlowEvent
			if dec.Decode(&ev) != nil {
				return
			}
			select {
			case ch <- ev:
			case <-ctx.Done():
				return
			}
		}
	}()
	return ch, nil
}

// Config returns the running configuration, as YAML.
func (c *Client) Config(ctx context.Context) ([]byte, error) {
	req, err := c.newRequest(ctx, http.MethodGet, "/v1/config", nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var e errorBody
		json.NewDecoder(io.LimitReader(resp.Body, 1<<16)).Decode(&e)
		return nil, fmt.Errorf("admin: config: %s: %s", resp.Status, e.Error)
	}
	return io.ReadAll(io.LimitReader(resp.Body, 1<<20))
}

// Reload makes the gateway re-read its configuration.
func (c *Client) Reload(ctx context.Context) error {
	return c.do(ctx, http.MethodPost, "/v1/reload", nil, nil)
}
