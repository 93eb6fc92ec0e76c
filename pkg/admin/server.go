package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"go.uber.org/zap"
)

// NewHandler serves b as the control API:
//
//	GET    /v1/server        ServerInfo
//	GET    /v1/peers         []PeerInfo
//	POST   /v1/peers         AddPeerRequest -> AddPeerResponse
//	DELETE /v1/peers/{name}
//	GET    /healthz
func NewHandler(b Backend) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("GET /v1/server", func(w http.ResponseWriter, r *http.Request) {
		info, err := b.Server(r.Context())
		reply(w, info, err)
	})
	mux.HandleFunc("GET /v1/peers", func(w http.ResponseWriter, r *http.Request) {
		peers, err := b.Peers(r.Context())
		reply(w, peers, err)
	})
	mux.HandleFunc("POST /v1/peers", func(w http.ResponseWriter, r *http.Request) {
		var req AddPeerRequest
		dec := json.NewDecoder(io.LimitReader(r.Body, 1<<16))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			reply(w, nil, fmt.Errorf("%w: %v", ErrInvalid, err))
			return
		}
		resp, err := b.AddPeer(r.Context(), req)
		reply(w, resp, err)
	})
	mux.HandleFunc("DELETE /v1/peers/{name}", func(w http.ResponseWriter, r *http.Request) {
		reply(w, struct{}{}, b.RemovePeer(r.Context(), r.PathValue("name")))
	})
	return mux
}

type errorBody struct {
	Error string `json:"error"`
}

func reply(w http.ResponseWriter, v any, err error) {
	w.Header().Set("Content-Type", "application/json")
	if err != nil {
		code := http.StatusInternalServerError
		switch {
		case errors.Is(err, ErrNotFound):
			code = http.StatusNotFound
		case errors.Is(err, ErrConflict):
			code = http.StatusConflict
		case errors.Is(err, ErrInvalid):
			code = http.StatusBadRequest
		}
		w.WriteHeader(code)
		json.NewEncoder(w).Encode(errorBody{err.Error()})
		return
	}
	json.NewEncoder(w).Encode(v)
}

// ListenUnix listens on a unix socket at path that only the owner may use
// (mode 0600). A socket left behind by a process that died is replaced;
// one that a live process answers on is not.
func ListenUnix(path string) (net.Listener, error) {
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("admin: %s: another process is serving there", path)
	}
	os.Remove(path)
	// The socket is created with the umask's mode; create it in a private
	// umask-independent way by tightening before anyone can connect:
	// the directory is 0700 and the mode is set right after bind.
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("admin: listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("admin: %s: %w", path, err)
	}
	return ln, nil
}

// Serve serves h on ln until ctx is done, then shuts down gracefully.
func Serve(ctx context.Context, ln net.Listener, h http.Handler, log *zap.Logger) error {
	if log == nil {
		log = zap.NewNop()
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, ErrorLog: zap.NewStdLog(log)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	err := srv.Serve(ln)
	<-done
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	if ln.Addr().Network() == "unix" {
		os.Remove(filepath.Clean(ln.Addr().String()))
	}
	return err
}
