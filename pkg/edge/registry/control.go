package registry

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"strconv"

	"go.uber.org/zap"

	"github.com/sluice-vpn/sluice/pkg/expose"
)

// maxControlBody bounds a control request's body: a registration is a few
// hundred bytes even with every label at its longest.
const maxControlBody = 64 << 10

// Handler serves the control API to agents. peerOf names the peer that
// owns a tunnel address (the source of the control connection).
//
// The caller is the address in r.RemoteAddr, as the gateway's listener on
// its tunnel addresses gives it: WireGuard has authenticated it, so it is
// the agent's whole identity. An address that no peer owns is refused
// with 403.
func (r *Registry) Handler(peerOf func(netip.Addr) (Peer, bool)) http.Handler {
	return &controlHandler{r: r, peerOf: peerOf}
}

type controlHandler struct {
	r      *Registry
	peerOf func(netip.Addr) (Peer, bool)
}

func (h *controlHandler) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	if req.URL.Path != expose.RegistrationsPath {
		writeError(w, http.StatusNotFound, fmt.Sprintf("no such path %s: the control API is at %s", req.URL.Path, expose.RegistrationsPath))
		return
	}
	if req.Method != http.MethodPut && req.Method != http.MethodDelete {
		w.Header().Set("Allow", "PUT, DELETE")
		writeError(w, http.StatusMethodNotAllowed, fmt.Sprintf("method %s: want PUT or DELETE", req.Method))
		return
	}
	ap, err := netip.ParseAddrPort(req.RemoteAddr)
	if err != nil {
		writeError(w, http.StatusForbidden, fmt.Sprintf("caller address %q: %v", req.RemoteAddr, err))
		return
	}
	addr := ap.Addr().Unmap()
	peer, ok := h.peerOf(addr)
	if !ok {
		h.r.log.Info("control request from an address no peer owns", zap.Stringer("addr", addr))
		writeError(w, http.StatusForbidden, fmt.Sprintf("%s is not a peer's tunnel address", addr))
		return
	}
	switch req.Method {
	case http.MethodPut:
		h.register(w, req, peer, addr)
	case http.MethodDelete:
		h.deregister(w, req, peer)
	}
}

func (h *controlHandler) register(w http.ResponseWriter, req *http.Request, peer Peer, addr netip.Addr) {
	var reg expose.Registration
	dec := json.NewDecoder(http.MaxBytesReader(w, req.Body, maxControlBody))
	if err := dec.Decode(&reg); err != nil {
		if _, ok := errors.AsType[*http.MaxBytesError](err); ok {
			writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("registration: body over %d bytes", maxControlBody))
			return
		}
		writeError(w, http.StatusBadRequest, fmt.Sprintf("registration: bad JSON: %v", err))
		return
	}
	if req.Context().Err() != nil {
		// The agent has given up on this request: it is stopping,
		// and its DELETE may have come in already, or it timed out
		// and will try again. Registering now could revive a replica
		// whose listener is gone, for a whole lease.
		return
	}
	// Who calls is checked again, now that the body is in, together
	// with the registration, so that ForgetPeer comes before or after
	// both.
	h.r.identity.RLock()
	now, ok := h.peerOf(addr)
	if !ok || now != peer {
		h.r.identity.RUnlock()
		writeError(w, http.StatusForbidden, fmt.Sprintf("%s is no longer peer %s's tunnel address", addr, peer.Name))
		return
	}
	lease, err := h.r.Register(peer, addr, reg)
	h.r.identity.RUnlock()
	if err != nil {
		writeError(w, statusOf(err), err.Error())
		return
	}
	writeJSON(w, http.StatusOK, lease)
}

func (h *controlHandler) deregister(w http.ResponseWriter, req *http.Request, peer Peer) {
	q := req.URL.Query()
	hostname := q.Get("hostname")
	port, err := strconv.ParseUint(q.Get("port"), 10, 16)
	if err != nil {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("port %q: want 1-65535", q.Get("port")))
		return
	}
	if err := h.r.Deregister(peer, hostname, uint16(port)); err != nil {
		writeError(w, statusOf(err), err.Error())
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// statusOf maps the registry's errors to HTTP statuses.
func statusOf(err error) int {
	switch {
	case errors.Is(err, ErrInvalid):
		return http.StatusBadRequest
	case errors.Is(err, ErrNotAllowed):
		return http.StatusForbidden
	case errors.Is(err, ErrConflict):
		return http.StatusConflict
	case errors.Is(err, ErrLimit):
		return http.StatusTooManyRequests
	case errors.Is(err, ErrClaimed):
		// For a while only: the agent keeps trying, and takes the
		// name over if its holder does not come back.
		return http.StatusServiceUnavailable
	}
	return http.StatusInternalServerError
}

func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, expose.ErrorBody{Error: msg})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		status, b = http.StatusInternalServerError, []byte(`{"error":"registry: encoding the answer failed"}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	w.Write(append(b, '\n'))
}
