package expose

import (
	"context"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestNewNamesTheBadField(t *testing.T) {
	good := Options{
		Tunnel:   &loopTunnel{},
		Control:  netip.MustParseAddrPort("100.64.0.1:7460"),
		Hostname: "app.example.com",
		To:       "http://localhost:4000",
	}
	if _, err := New(good); err != nil {
		t.Fatalf("good options: %v", err)
	}
	for _, tc := range []struct {
		name  string
		edit  func(*Options)
		field string
	}{
		{"no tunnel", func(o *Options) { o.Tunnel = nil }, "Options.Tunnel"},
		{"no control", func(o *Options) { o.Control = netip.AddrPort{} }, "Options.Control"},
		{"control port 0", func(o *Options) { o.Control = netip.MustParseAddrPort("100.64.0.1:0") }, "Options.Control"},
		{"control unspecified", func(o *Options) { o.Control = netip.MustParseAddrPort("0.0.0.0:7460") }, "Options.Control"},
		{"no hostname", func(o *Options) { o.Hostname = "" }, "Options.Hostname"},
		{"upper-case hostname", func(o *Options) { o.Hostname = "App.example.com" }, "Options.Hostname"},
		{"bad label", func(o *Options) { o.Labels = map[string]string{"Release": "x"} }, "Options.Labels"},
		{"no to", func(o *Options) { o.To = "" }, "Options.To"},
		{"to without scheme", func(o *Options) { o.To = "localhost:4000" }, "Options.To"},
		{"to ftp", func(o *Options) { o.To = "ftp://localhost:21" }, "Options.To"},
		{"to with path", func(o *Options) { o.To = "http://localhost:4000/api" }, "Options.To"},
		{"to with query", func(o *Options) { o.To = "http://localhost:4000?x=1" }, "Options.To"},
		{"to with user", func(o *Options) { o.To = "http://u:p@localhost:4000" }, "Options.To"},
		{"tcp without port", func(o *Options) { o.To = "tcp://localhost" }, "Options.To"},
		{"port out of range", func(o *Options) { o.To = "tcp://localhost:70000" }, "Options.To"},
		{"no host", func(o *Options) { o.To = "http://:4000" }, "Options.To"},
		{"negative max conns", func(o *Options) { o.MaxConns = -1 }, "Options.MaxConns"},
		{"negative dial timeout", func(o *Options) { o.DialTimeout = -time.Second }, "Options.DialTimeout"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := good
			tc.edit(&o)
			_, err := New(o)
			if err == nil {
				t.Fatal("New accepted the options")
			}
			if !strings.Contains(err.Error(), tc.field) {
				t.Errorf("error %q does not name %s", err, tc.field)
			}
		})
	}
}

func TestNewOrigins(t *testing.T) {
	for _, tc := range []struct {
		to, addr, protocol string
		tls                bool
	}{
		{"http://localhost:4000", "localhost:4000", ProtocolHTTP, false},
		{"http://localhost:4000/", "localhost:4000", ProtocolHTTP, false},
		{"http://localhost", "localhost:80", ProtocolHTTP, false},
		{"https://origin.internal", "origin.internal:443", ProtocolHTTP, true},
		{"https://[::1]:8443", "[::1]:8443", ProtocolHTTP, true},
		{"tcp://127.0.0.1:5432", "127.0.0.1:5432", ProtocolTCP, false},
	} {
		a, err := New(Options{Tunnel: &loopTunnel{}, Control: netip.MustParseAddrPort("100.64.0.1:7460"),
			Hostname: "app.example.com", To: tc.to})
		if err != nil {
			t.Errorf("%s: %v", tc.to, err)
			continue
		}
		if a.origin.addr != tc.addr || a.origin.protocol != tc.protocol || (a.origin.tls != nil) != tc.tls {
			t.Errorf("%s: dials %s, registers %s, TLS %v; want %s, %s, %v",
				tc.to, a.origin.addr, a.origin.protocol, a.origin.tls != nil, tc.addr, tc.protocol, tc.tls)
		}
	}
}

func TestControlAddr(t *testing.T) {
	for _, tc := range []struct {
		dns  []string
		want string
	}{
		{[]string{"100.64.0.1"}, "100.64.0.1:7460"},
		{[]string{"fd00::1", "100.64.0.1"}, "100.64.0.1:7460"},
		{[]string{"fd00::1", "fd00::2"}, "[fd00::1]:7460"},
		{[]string{"::ffff:100.64.0.1"}, "100.64.0.1:7460"},
	} {
		var dns []netip.Addr
		for _, s := range tc.dns {
			dns = append(dns, netip.MustParseAddr(s))
		}
		got, err := ControlAddr(dns)
		if err != nil || got.String() != tc.want {
			t.Errorf("ControlAddr(%v) = %v, %v; want %s", tc.dns, got, err, tc.want)
		}
	}
	_, err := ControlAddr(nil)
	if err == nil || !strings.Contains(err.Error(), "no DNS line") || !strings.Contains(err.Error(), "--control") {
		t.Errorf("ControlAddr(nil) = %v; want an error about the missing DNS line and --control", err)
	}
}

func TestRegistersAndRefreshes(t *testing.T) {
	cs := newControlServer(t, fastLease)
	tun := &loopTunnel{}
	labels := map[string]string{"release": "canary", "zone": "eu-1"}
	a := startAgent(t, cs, Options{Tunnel: tun, To: "http://127.0.0.1:4000", Labels: labels})
	waitRegistered(t, a.Agent)
	labels["release"] = "changed after New" // the agent keeps its own copy

	eventually(t, "5 registrations", func() bool { p, _ := cs.reg.received(); return len(p) >= 5 })
	puts, _ := cs.reg.received()
	port, err := portOf(a.Addr())
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range puts {
		if p.reg.Hostname != "app.example.com" || p.reg.Port != port || p.reg.Protocol != ProtocolHTTP ||
			len(p.reg.Labels) != 2 || p.reg.Labels["release"] != "canary" || p.reg.Labels["zone"] != "eu-1" {
			t.Fatalf("registration %+v; want app.example.com, port %d, http, release=canary zone=eu-1", p.reg, port)
		}
		if err := p.reg.Check(); err != nil {
			t.Fatalf("registration %+v fails the gateway's check: %v", p.reg, err)
		}
	}
	// Refreshes follow the lease's 100ms: not a busy loop, and not the
	// default of seconds.
	for i := 1; i < len(puts); i++ {
		if gap := puts[i].at.Sub(puts[i-1].at); gap < 80*time.Millisecond {
			t.Errorf("refresh %d came %v after the one before; the lease asks for 100ms", i, gap)
		}
	}
	if avg := puts[len(puts)-1].at.Sub(puts[0].at) / time.Duration(len(puts)-1); avg > 250*time.Millisecond {
		t.Errorf("refreshes came every %v on average; the lease asks for 100ms", avg)
	}
	var viaTunnel bool
	for _, d := range tun.dialed() {
		viaTunnel = viaTunnel || d == cs.addr.String()
	}
	if !viaTunnel {
		t.Errorf("the control API was not dialled through the tunnel (dials: %v)", tun.dialed())
	}
	// The server counts a PUT before the agent has read the answer, so the
	// agent's own count can trail by one for a moment.
	var st Stats
	eventually(t, "the agent to count 5 registrations", func() bool { st = a.Stats(); return st.Registrations >= 5 })
	if !st.Registered || st.Lease != fastLease || st.LastRegistered.IsZero() {
		t.Errorf("stats %+v; want registered with lease %+v", st, fastLease)
	}
}

func TestRegistersTCPProtocol(t *testing.T) {
	cs := newControlServer(t, fastLease)
	a := startAgent(t, cs, Options{To: "tcp://127.0.0.1:5432", Port: freePort(t)})
	waitRegistered(t, a.Agent)
	puts, _ := cs.reg.received()
	if puts[0].reg.Protocol != ProtocolTCP {
		t.Errorf("protocol %q; want %q", puts[0].reg.Protocol, ProtocolTCP)
	}
	if want := a.opts.Port; puts[0].reg.Port != want {
		t.Errorf("registered port %d; want Options.Port %d", puts[0].reg.Port, want)
	}
}

// freePort finds a port nothing listens on at 127.0.0.1 now.
func freePort(t *testing.T) uint16 {
	t.Helper()
	ln, err := (&loopTunnel{}).Listen("tcp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	p, _ := portOf(ln.Addr())
	return p
}

func TestFirstRefusalEndsRun(t *testing.T) {
	cs := newControlServer(t, fastLease)
	const msg = "peer alice may not serve app.example.com"
	cs.reg.answer(http.StatusForbidden, msg)
	a, err := New(Options{Tunnel: &loopTunnel{}, Control: cs.addr, Hostname: "app.example.com", To: "http://127.0.0.1:4000"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	err = a.Run(ctx)
	if err == nil || !strings.Contains(err.Error(), msg) || !strings.Contains(err.Error(), "403") {
		t.Fatalf("Run = %v; want an error with 403 and the gateway's message %q", err, msg)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Run took %v to give up", d)
	}
	if _, dels := cs.reg.received(); len(dels) != 0 {
		t.Errorf("deregistered %v, though never registered", dels)
	}
}

func TestReregistersAfterTheGatewayComesBack(t *testing.T) {
	cs := newControlServer(t, fastLease)
	a := startAgent(t, cs, Options{To: "http://127.0.0.1:4000"})
	waitRegistered(t, a.Agent)

	// Gone: connections refused.
	cs.stop()
	eventually(t, "registration lost", func() bool { return !a.Stats().Registered })
	errs := a.Stats().RegistrationErrors
	eventually(t, "retries while the gateway is away", func() bool { return a.Stats().RegistrationErrors >= errs+2 })

	// Back, but failing (5xx), then refusing (4xx): the agent keeps
	// trying either way once it has been registered.
	cs.reg.answer(http.StatusServiceUnavailable, "registry starting")
	cs.start()
	n, _ := cs.reg.received()
	eventually(t, "retries against a 503", func() bool { p, _ := cs.reg.received(); return len(p) >= len(n)+2 })
	cs.reg.answer(http.StatusForbidden, "not now")
	n, _ = cs.reg.received()
	eventually(t, "retries against a 403", func() bool { p, _ := cs.reg.received(); return len(p) >= len(n)+2 })
	if st := a.Stats(); st.Registered || !strings.Contains(st.LastError, "not now") {
		t.Errorf("stats %+v; want not registered, last error from the 403", st)
	}
	select {
	case err := <-a.errc:
		t.Fatalf("Run returned %v on a refusal after the first registration", err)
	default:
	}

	// And good again: back in rotation within the backoff's cap.
	regs := a.Stats().Registrations
	cs.reg.answer(http.StatusOK, "")
	eventually(t, "registered again", func() bool {
		st := a.Stats()
		return st.Registered && st.Registrations > regs
	})
}

func TestDeregistersOnCancel(t *testing.T) {
	cs := newControlServer(t, fastLease)
	origin := newEchoOrigin(t)
	a := startAgent(t, cs, Options{To: "tcp://" + origin})
	waitRegistered(t, a.Agent)
	c := dialAgent(t, a.Agent)
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Read(buf); err != nil || string(buf) != "ping" {
		t.Fatalf("echo %q, %v", buf, err)
	}
	addr := a.Addr().String()

	if err := a.stop(t); err != nil {
		t.Fatalf("Run = %v after cancel; want nil", err)
	}
	_, dels := cs.reg.received()
	port, _ := portOf(a.Addr())
	if len(dels) != 1 || dels[0].Get("hostname") != "app.example.com" || dels[0].Get("port") != strconv.Itoa(int(port)) {
		t.Errorf("deletes %v; want one of app.example.com port %d", dels, port)
	}
	if st := a.Stats(); st.Registered || st.Active != 0 {
		t.Errorf("stats after Run %+v; want not registered, no active connection", st)
	}
	// The relayed connection was closed with the agent, and nothing
	// listens any more.
	if err := readClosed(c); err != nil {
		t.Errorf("the open connection after Run returned: %v", err)
	}
	if c2, err := (&loopTunnel{}).DialContext(context.Background(), "tcp4", addr); err == nil {
		c2.Close()
		t.Errorf("%s still accepts connections after Run returned", addr)
	}
}

func TestRunTwice(t *testing.T) {
	cs := newControlServer(t, fastLease)
	a := startAgent(t, cs, Options{To: "http://127.0.0.1:4000"})
	if err := a.Run(context.Background()); err == nil || !strings.Contains(err.Error(), "twice") {
		t.Errorf("second Run = %v; want an error", err)
	}
}

func TestListenFailure(t *testing.T) {
	cs := newControlServer(t, fastLease)
	ln, err := (&loopTunnel{}).Listen("tcp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port, _ := portOf(ln.Addr())
	a, err := New(Options{Tunnel: &loopTunnel{}, Control: cs.addr, Hostname: "app.example.com", To: "http://127.0.0.1:4000", Port: port})
	if err != nil {
		t.Fatal(err)
	}
	err = a.Run(context.Background())
	if err == nil || !strings.Contains(err.Error(), "listen") {
		t.Fatalf("Run on a taken port = %v; want a listen error", err)
	}
	select {
	case <-a.Ready():
	default:
		t.Error("Ready not closed after Run returned")
	}
	if a.Addr() != nil {
		t.Errorf("Addr = %v after a failed listen", a.Addr())
	}
	if puts, _ := cs.reg.received(); len(puts) != 0 {
		t.Errorf("registered %v without a listener", puts)
	}
}
