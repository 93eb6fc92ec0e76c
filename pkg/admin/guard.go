package admin

import (
	"crypto/subtle"
	"mime"
	"net"
	"net/http"
	"net/netip"
	"strings"
)

// UnixHost is the Host that clients of the control socket send: the
// socket has no host name of its own.
const UnixHost = "sluice"

// GuardOptions say who may use the API on one listener.
type GuardOptions struct {
	// Token, if set, must come with every request as "Authorization:
	// Bearer TOKEN", but for the health checks. Empty means the listener
	// is its own credential: a 0600 unix socket only its owner can open.
	Token string
	// Hosts are the Host names or addresses accepted besides loopback
	// ones: UnixHost on the control socket, the listener's own address
	// when it is not a loopback one.
	Hosts []string
}

// Guard refuses what a program steering the gateway never sends, and so
// keeps out two attackers that reach loopback without being the operator:
//
//   - a web page in the operator's browser (a "simple" cross-origin POST
//     needs no preflight, and DNS rebinding makes a page's own origin
//     resolve to 127.0.0.1). Browsers mark their requests with Origin
//     or Sec-Fetch-Site and send the page's host name as Host, and
//     cannot send a JSON Content-Type cross-origin without a preflight
//     that nothing here answers. Any of those three refuses the request.
//   - another local user, on the TCP listener, which any local process
//     can connect to: the token, which only the gateway's owner can
//     read, is the credential there.
//
// The health checks need no token, so that a supervisor's probe needs no
// secret; they say only whether the gateway is up.
func Guard(h http.Handler, o GuardOptions) http.Handler {
	hosts := map[string]bool{"localhost": true}
	for _, name := range o.Hosts {
		hosts[canonicalHost(name)] = true
	}
	want := []byte("Bearer " + o.Token)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Origin") != "" {
			refuse(w, http.StatusForbidden, "requests from web pages are refused (Origin header)")
			return
		}
		if site := r.Header.Get("Sec-Fetch-Site"); site != "" && site != "none" {
			refuse(w, http.StatusForbidden, "requests from web pages are refused (Sec-Fetch-Site: "+site+")")
			return
		}
		if !hostAllowed(hosts, r.Host) {
			refuse(w, http.StatusForbidden, "the Host must be a loopback name or address")
			return
		}
		if o.Token != "" && !health(r) {
			got := []byte(r.Header.Get("Authorization"))
			if subtle.ConstantTimeCompare(got, want) != 1 {
				w.Header().Set("WWW-Authenticate", `Bearer realm="sluice admin"`)
				refuse(w, http.StatusUnauthorized, "a bearer token is required (the gateway's state directory holds it in "+TokenName+")")
				return
			}
		}
		if changesState(r.Method) {
			mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
			if err != nil || mt != "application/json" {
				refuse(w, http.StatusUnsupportedMediaType, r.Method+" needs Content-Type: application/json")
				return
			}
		}
		h.ServeHTTP(w, r)
	})
}

// TokenName is the token file's name in the gateway's state directory.
const TokenName = "admin.token"

func health(r *http.Request) bool {
	return (r.Method == http.MethodGet || r.Method == http.MethodHead) && (r.URL.Path == "/healthz" || r.URL.Path == "/readyz")
}

func changesState(method string) bool {
	switch method {
	case http.MethodGet, http.MethodHead, http.MethodOptions:
		return false
	}
	return true
}

func hostAllowed(hosts map[string]bool, host string) bool {
	h := canonicalHost(host)
	if h == "" {
		return false
	}
	if hosts[h] {
		return true
	}
	ip, err := netip.ParseAddr(h)
	return err == nil && ip.Unmap().IsLoopback()
}

// canonicalHost is a Host header's name or address, without port or
// brackets, lower case, with an address in its canonical form.
func canonicalHost(h string) string {
	if host, _, err := net.SplitHostPort(h); err == nil {
		h = host
	}
	h = strings.TrimSuffix(strings.ToLower(strings.Trim(h, "[]")), ".")
	if ip, err := netip.ParseAddr(h); err == nil {
		return ip.Unmap().String()
	}
	return h
}

func refuse(w http.ResponseWriter, code int, msg string) {
	reply(w, nil, &statusError{code: code, msg: msg})
}

// statusError is an error that answers with its own status code.
type statusError struct {
	code int
	msg  string
}

func (e *statusError) Error() string { return e.msg }
