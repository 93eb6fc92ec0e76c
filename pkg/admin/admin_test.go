package admin

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

type fakeBackend struct {
	mu    sync.Mutex
	peers map[string]PeerInfo
}

func (b *fakeBackend) Peers(context.Context) ([]PeerInfo, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []PeerInfo
	for _, p := range b.peers {
		out = append(out, p)
	}
	return out, nil
}

func (b *fakeBackend) AddPeer(_ context.Context, req AddPeerRequest) (AddPeerResponse, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if req.Name == "" {
		return AddPeerResponse{}, fmt.Errorf("%w: name is empty", ErrInvalid)
	}
	if _, ok := b.peers[req.Name]; ok {
		return AddPeerResponse{}, fmt.Errorf("%w: peer %q exists", ErrConflict, req.Name)
	}
	p := PeerInfo{Name: req.Name, PublicKey: req.PublicKey, Addrs: []netip.Addr{netip.MustParseAddr("100.96.0.2")}}
	b.peers[req.Name] = p
	return AddPeerResponse{Peer: p, Server: ServerInfo{PublicKey: "server", ListenPort: 51820}}, nil
}

func (b *fakeBackend) RemovePeer(_ context.Context, name string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.peers[name]; !ok {
		return fmt.Errorf("%w: no peer %q", ErrNotFound, name)
	}
	delete(b.peers, name)
	return nil
}

func (b *fakeBackend) Server(context.Context) (ServerInfo, error) {
	return ServerInfo{PublicKey: "server", ListenPort: 51820}, nil
}

func TestControlSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sluice.sock")
	c := NewUnixClient(path)
	ctx := context.Background()
	if _, err := c.Peers(ctx); !errors.Is(err, ErrNotRunning) {
		t.Fatalf("no server: got %v, want ErrNotRunning", err)
	}

	ln, err := ListenUnix(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode: %v %v", fi.Mode(), err)
	}
	if _, err := ListenUnix(path); err == nil {
		t.Fatal("a second server took over a live socket")
	}
	sctx, cancel := context.WithCancel(ctx)
	done := make(chan error)
	go func() {
		done <- Serve(sctx, ln, NewHandler(Options{Peers: &fakeBackend{peers: map[string]PeerInfo{}}}), nil)
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
		if _, err := os.Stat(path); !os.IsNotExist(err) {
			t.Error("socket left behind")
		}
	}()

	resp, err := c.AddPeer(ctx, AddPeerRequest{Name: "laptop", PublicKey: "pub"})
	if err != nil || resp.Peer.Name != "laptop" || resp.Server.ListenPort != 51820 {
		t.Fatalf("add: %+v %v", resp, err)
	}
	if _, err := c.AddPeer(ctx, AddPeerRequest{Name: "laptop", PublicKey: "pub2"}); !errors.Is(err, ErrConflict) {
		t.Fatalf("duplicate add: %v", err)
	}
	if _, err := c.AddPeer(ctx, AddPeerRequest{}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("invalid add: %v", err)
	}
	peers, err := c.Peers(ctx)
	if err != nil || len(peers) != 1 || peers[0].Addrs[0].String() != "100.96.0.2" {
		t.Fatalf("list: %+v %v", peers, err)
	}
	if err := c.RemovePeer(ctx, "laptop"); err != nil {
		t.Fatal(err)
	}
	if err := c.RemovePeer(ctx, "laptop"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second remove: %v", err)
	}
}

// TestPprof serves Go's profiles, which is how a slow gateway is looked
// into; a goroutine dump must name the running test.
func TestPprof(t *testing.T) {
	srv := httptest.NewServer(NewHandler(Options{}))
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/debug/pprof/goroutine?debug=1")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "TestPprof") {
		t.Fatalf("status %d, body %.200q", resp.StatusCode, body)
	}
}
