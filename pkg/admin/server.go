package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"
)

// Options are what the API serves; a nil backend leaves its routes out.
type Options struct {
	Peers    PeerBackend
	Flows    FlowBackend
	Status   StatusBackend
	Config   ConfigBackend
	Services ServiceBackend
	Metrics  prometheus.Gatherer
	// Ready reports whether the gateway serves traffic; nil means always.
	Ready func() bool
}

// NewHandler serves the control API:
//
//	GET    /healthz, /readyz
//	GET    /metrics                Prometheus exposition format
//	GET    /v1/status              Status
//	GET    /v1/server              ServerInfo
//	GET    /v1/peers               []PeerInfo
//	POST   /v1/peers               AddPeerRequest -> AddPeerResponse
//	DELETE /v1/peers/{name}
//	GET    /v1/flows?FILTER        []FlowInfo (count=true: {"count": N})
//	GET    /v1/flows/{id}          FlowInfo
//	DELETE /v1/flows/{id}
//	DELETE /v1/flows?FILTER        {"deleted": N}; a filter, or all=true, is required
//	GET    /v1/events?FILTER       newline-delimited FlowEvents, until the client leaves
//	GET    /v1/services            []ServiceInfo: published hostnames and their replicas
//	GET    /v1/config              the running configuration, YAML
//	POST   /v1/reload
//	GET    /debug/pprof/...        Go's profiles (net/http/pprof)
//
// FILTER is peer=NAME, proto=tcp|udp|icmp, dest=CIDR, port=N, state=STATE.
func NewHandler(o Options) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if o.Ready != nil && !o.Ready() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, "ready\n")
	})
	// Profiles are for whoever may already steer the gateway: the admin
	// API is on a 0600 socket, or behind a token on TCP (see Guard).
	mux.HandleFunc("GET /debug/pprof/", pprof.Index)
	mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	if o.Metrics != nil {
		mux.Handle("GET /metrics", promhttp.HandlerFor(o.Metrics, promhttp.HandlerOpts{}))
	}
	if b := o.Status; b != nil {
		mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
			st, err := b.Status(r.Context())
			reply(w, st, err)
		})
	}
	if b := o.Peers; b != nil {
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
	}
	if b := o.Flows; b != nil {
		flowRoutes(mux, b)
	}
	if b := o.Services; b != nil {
		mux.HandleFunc("GET /v1/services", func(w http.ResponseWriter, r *http.Request) {
			svcs, err := b.Services(r.Context())
			reply(w, svcs, err)
		})
	}
	if b := o.Config; b != nil {
		mux.HandleFunc("GET /v1/config", func(w http.ResponseWriter, r *http.Request) {
			conf, err := b.Config(r.Context())
			if err != nil {
				reply(w, nil, err)
				return
			}
			w.Header().Set("Content-Type", "application/yaml")
			w.Write(conf)
		})
		mux.HandleFunc("POST /v1/reload", func(w http.ResponseWriter, r *http.Request) {
			reply(w, struct{}{}, b.Reload(r.Context()))
		})
	}
	return mux
}

func flowRoutes(mux *http.ServeMux, b FlowBackend) {
	mux.HandleFunc("GET /v1/flows", func(w http.ResponseWriter, r *http.Request) {
		f, err := ParseFlowFilter(r.URL.Query())
		if err != nil {
			reply(w, nil, err)
			return
		}
		flows, err := b.Flows(r.Context(), f)
		if r.URL.Query().Get("count") == "true" {
			reply(w, map[string]int{"count": len(flows)}, err)
			return
		}
		if flows == nil {
			flows = []FlowInfo{}
		}
		reply(w, flows, err)
	})
	mux.HandleFunc("GET /v1/flows/{id}", func(w http.ResponseWriter, r *http.Request) {
		id, err := strconv.ParseUint(r.PathValue("id"), 10, 64)
		if err != nil {
			reply(w, nil, fmt.Errorf("%w: flow id %q", ErrInvalid, r.PathValue("id")))
			return
		}
		flows, err := b.Flows(r.Context(), FlowFilter{})
		for _, f := range flows {
			if f.ID == id {
				reply(w, f, nil)
				return
			}
		}
		if err == nil {
			err = fmt.Errorf("%w: no flow %d", ErrNotFound, id)
		}
		reply(w, nil, err)
	})
	mux.HandleFunc("DELETE /v1/flows/{id}", func(w http.ResponseWriter, r *http.Request) {
		id, err := strconv.ParseUint(r.PathValue("id"), 10, 64)
		if err != nil {
			reply(w, nil, fmt.Errorf("%w: flow id %q", ErrInvalid, r.PathValue("id")))
			return
		}
		reply(w, struct{}{}, b.DeleteFlow(r.Context(), id))
	})
	mux.HandleFunc("DELETE /v1/flows", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		f, err := ParseFlowFilter(q)
		if err == nil && f.IsZero() && q.Get("all") != "true" {
			err = fmt.Errorf("%w: give a filter, or all=true to delete every flow", ErrInvalid)
		}
		if err != nil {
			reply(w, nil, err)
			return
		}
		flows, err := b.Flows(r.Context(), f)
		n := 0
		for _, fl := range flows {
			if b.DeleteFlow(r.Context(), fl.ID) == nil {
				n++
			}
		}
		reply(w, map[string]int{"deleted": n}, err)
	})
	mux.HandleFunc("GET /v1/events", func(w http.ResponseWriter, r *http.Request) {
		f, err := ParseFlowFilter(r.URL.Query())
		if err != nil {
			reply(w, nil, err)
			return
		}
		events, err := b.Events(r.Context())
		if err != nil {
			reply(w, nil, err)
			return
		}
		w.Header().Set("Content-Type", "application/x-ndjson")
		w.WriteHeader(http.StatusOK)
		flusher, _ := w.(http.Flusher)
		if flusher != nil {
			flusher.Flush()
		}
		enc := json.NewEncoder(w)
		for ev := range events {
			if !f.Match(ev.Flow) {
				continue
			}
			if enc.Encode(ev) != nil {
				return
			}
			if flusher != nil {
				flusher.Flush()
			}
		}
	})
}

type errorBody struct {
	Error string `json:"error"`
}

func reply(w http.ResponseWriter, v any, err error) {
	w.Header().Set("Content-Type", "application/json")
	if err != nil {
		code := http.StatusInternalServerError
		var se *statusError
		switch {
		case errors.As(err, &se):
			code = se.code
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
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("admin: listen on %s: %w", path, err)
	}
	// The state directory is 0700, so nobody else can reach the socket
	// between bind and chmod.
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("admin: %s: %w", path, err)
	}
	return ln, nil
}

// ListenTCP listens on a TCP address for the API. Only loopback
// addresses are accepted unless insecure is set: the API's only
// credential there is a bearer token (see Guard), sent in the clear.
func ListenTCP(addr string, insecure bool) (net.Listener, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("admin: %q: %w", addr, err)
	}
	ip, err := netipParse(host)
	if err != nil {
		return nil, fmt.Errorf("admin: %q: the host must be an IP address", addr)
	}
	if !ip.IsLoopback() && !insecure {
		return nil, fmt.Errorf("admin: %s is not a loopback address; the API would be reachable, in plain text, by others (allow it explicitly to listen there anyway)", addr)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("admin: listen on %s: %w", addr, err)
	}
	return ln, nil
}

// Serve serves h on ln until ctx is done, then shuts down gracefully.
func Serve(ctx context.Context, ln net.Listener, h http.Handler, log *zap.Logger) error {
	if log == nil {
		log = zap.NewNop()
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, ErrorLog: zap.NewStdLog(log),
		BaseContext: func(net.Listener) context.Context { return ctx }}
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
		os.Remove(ln.Addr().String())
	}
	return err
}
