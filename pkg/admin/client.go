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
	"time"
)

// Client talks to a running gateway's control API.
type Client struct {
	http *http.Client
	base string
}

// NewUnixClient returns a client for the control socket at path.
func NewUnixClient(path string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
	}
	return &Client{http: &http.Client{Transport: tr, Timeout: 30 * time.Second}, base: "http://sluice"}
}

// ErrNotRunning means nothing answers on the control socket.
var ErrNotRunning = errors.New("admin: no gateway is running there")

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
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
