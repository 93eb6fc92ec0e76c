package proxy

import (
	"bufio"
	"bytes"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"
)

// FuzzHTTPProxyRequest hands the HTTP proxy arbitrary requests, as
// net/http parses them off the wire, with and without required
// credentials. It never panics; a client without the right credentials
// gets 407 and reaches nothing; CONNECT dials exactly the host:port it
// names, a forwarded request only an http:// URI's host, and anything else
// is answered 400 without a dial. The dialer refuses everything, so every
// dial must be answered 403.
func FuzzHTTPProxyRequest(f *testing.F) {
	for _, s := range []string{
		"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
		"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
		"CONNECT [2001:db8::1]:22 HTTP/1.1\r\nHost: [2001:db8::1]:22\r\nProxy-Authorization: Basic dTpw\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
		"GET https://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
		"POST http://192.0.2.1:8080/x HTTP/1.0\r\nContent-Length: 3\r\nProxy-Authorization: Basic dTpw\r\n\r\nabc",
		"CONNECT example.com HTTP/1.1\r\nHost: example.com\r\n\r\n",
	} {
		f.Add([]byte(s), false)
		f.Add([]byte(s), true)
	}
	d := &refusingDialer{}
	open, err := NewHTTP(HTTPOptions{Dialer: d})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { open.Close() })
	locked, err := NewHTTP(HTTPOptions{Dialer: d, Credentials: &Credentials{Username: "u", Password: "p"}})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { locked.Close() })

	f.Fuzz(func(t *testing.T, raw []byte, auth bool) {
		r, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(raw)))
		if err != nil {
			return // net/http's parser, not the proxy's
		}
		r.RemoteAddr = "127.0.0.1:40000"
		s := open
		if auth {
			s = locked
		}
		authorized := !auth || s.authorized(r)
		w := httptest.NewRecorder()
		s.ServeHTTP(w, r)
		dials := d.take()

		if !authorized {
			if w.Code != http.StatusProxyAuthRequired || len(dials) != 0 {
				t.Fatalf("unauthenticated %q: %d, dialled %q", raw, w.Code, dials)
			}
			return
		}
		var want string
		switch {
		case r.Method == http.MethodConnect:
			if _, port, err := net.SplitHostPort(r.Host); err == nil && port != "" {
				want = r.Host
			}
		case r.URL.IsAbs() && r.URL.Host != "" && r.URL.Scheme == "http":
			want = "*" // whatever the transport makes of the URL's host
		}
		switch {
		case want == "":
			if len(dials) != 0 || w.Code != http.StatusBadRequest {
				t.Fatalf("%q: %d, dialled %q; want 400 and no dial", raw, w.Code, dials)
			}
		case len(dials) > 1 || (want != "*" && (len(dials) != 1 || dials[0] != want)):
			t.Fatalf("%q: dialled %q, want %q", raw, dials, want)
		case len(dials) == 1 && w.Code != http.StatusForbidden:
			t.Fatalf("%q: a refused dial answered %d, want 403", raw, w.Code)
		case len(dials) == 0 && w.Code < 400:
			t.Fatalf("%q: nothing dialled, yet answered %d", raw, w.Code)
		}
	})
}
