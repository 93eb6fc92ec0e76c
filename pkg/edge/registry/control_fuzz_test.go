package registry

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"testing"

	"github.com/sluice-vpn/sluice/pkg/expose"
)

// FuzzRegistration sends arbitrary bodies to the agents' control API as
// alice's registrations. The answer is always JSON with a status the API
// documents, never a 500; a body that is not a valid registration changes
// nothing; an accepted one is registered under the ID the lease names, as
// the JSON said, and the matching DELETE removes it again.
func FuzzRegistration(f *testing.F) {
	for _, s := range []string{
		`{"hostname":"app.example.com","port":80,"protocol":"http"}`,
		`{"hostname":"app.example.com","port":2222,"protocol":"tcp","labels":{"release":"canary"},"origin_down":true}`,
		`{"hostname":"APP.example.com.","port":0,"protocol":"http"}`,
		`{"hostname":"a","port":65536,"protocol":"udp"}`,
		`{"hostname":"x.example","port":80,"protocol":"http","labels":{"":"v","k":"` + strings.Repeat("v", 300) + `"}}`,
		`{"hostname":"x.example","port":80,"protocol":"http"} trailing`,
		`[]`, `null`, `{"port":"80"}`,
	} {
		f.Add([]byte(s))
	}
	owner := netip.MustParseAddr("10.99.0.1")
	peerOf := func(a netip.Addr) (Peer, bool) { return alice, a == owner }
	f.Fuzz(func(t *testing.T, body []byte) {
		r, err := New(Options{})
		if err != nil {
			t.Fatal(err)
		}
		h := r.Handler(peerOf)
		req := httptest.NewRequest(http.MethodPut, expose.RegistrationsPath, strings.NewReader(string(body)))
		req.RemoteAddr = "10.99.0.1:40000"
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		if ct := w.Header().Get("Content-Type"); ct != "application/json" {
			t.Fatalf("answer %d of type %q", w.Code, ct)
		}
		hosts, replicas, _ := r.Counts()
		// A registration is a JSON object naming a hostname (JSON keys
		// match in any case, Unicode's folding included, and may be
		// escaped).
		trimmed := strings.TrimLeft(string(body), " \t\r\n")
		plain := !strings.Contains(trimmed, `\u`) && strings.IndexFunc(trimmed, func(r rune) bool { return r > 0x7f }) < 0
		if w.Code == http.StatusOK && (!strings.HasPrefix(trimmed, "{") || plain && !strings.Contains(strings.ToLower(trimmed), "hostname")) {
			t.Fatalf("accepted %q, which is no registration", body)
		}
		switch w.Code {
		case http.StatusOK:
		case http.StatusBadRequest, http.StatusForbidden, http.StatusConflict, http.StatusRequestEntityTooLarge,
			http.StatusTooManyRequests, http.StatusServiceUnavailable:
			var e expose.ErrorBody
			if err := json.Unmarshal(w.Body.Bytes(), &e); err != nil || e.Error == "" {
				t.Fatalf("%d with body %q", w.Code, w.Body.String())
			}
			if hosts != 0 || replicas != 0 {
				t.Fatalf("refused with %d, yet %d hostnames and %d replicas registered", w.Code, hosts, replicas)
			}
			return
		default:
			t.Fatalf("status %d for %q: %s", w.Code, body, w.Body.String())
		}
		var lease expose.Lease
		if err := json.Unmarshal(w.Body.Bytes(), &lease); err != nil {
			t.Fatalf("lease %q: %v", w.Body.String(), err)
		}
		// The registry decoded the first JSON value of the body; so
		// does this.
		var reg expose.Registration
		if err := json.NewDecoder(strings.NewReader(string(body))).Decode(&reg); err != nil {
			t.Fatalf("accepted %q, which does not decode: %v", body, err)
		}
		if err := reg.Check(); err != nil {
			t.Fatalf("accepted %+v, which Check refuses: %v", reg, err)
		}
		if want := ReplicaID(alice, reg.Hostname, reg.Port); lease.ID != want || hosts != 1 || replicas != 1 || !r.Known(reg.Hostname) {
			t.Fatalf("lease %+v for %+v: want ID %s; %d hostnames, %d replicas", lease, reg, want, hosts, replicas)
		}
		q := url.Values{"hostname": {reg.Hostname}, "port": {strconv.Itoa(int(reg.Port))}}
		del := httptest.NewRequest(http.MethodDelete, expose.RegistrationsPath+"?"+q.Encode(), nil)
		del.RemoteAddr = req.RemoteAddr
		w = httptest.NewRecorder()
		h.ServeHTTP(w, del)
		if hosts, replicas, _ = r.Counts(); w.Code != http.StatusNoContent || replicas != 0 {
			t.Fatalf("DELETE %s: %d %s; %d hostnames and %d replicas left", q.Encode(), w.Code, w.Body.String(), hosts, replicas)
		}
	})
}
