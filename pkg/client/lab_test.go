package client_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/sluice-vpn/sluice/nat"
	"github.com/sluice-vpn/sluice/pkg/gateway"
	"github.com/sluice-vpn/sluice/tunnel/wireguard"
)

// The lab: a sluice gateway listening for WireGuard on loopback, whose
// tunnel addresses answer DNS by asking a DNS server of the test's own,
// also on loopback. Clients reach servers on the host's loopback through
// it, which the gateway's policy opens for the tests.
var (
	gatewayV4 = netip.MustParseAddr("100.96.0.1")
	gatewayV6 = netip.MustParseAddr("fd5c:1ce::1")
	labPorts  = nat.PortRange{Lo: 42000, Hi: 42999}
	loopback  = []nat.Rule{
		{Prefix: netip.MustParsePrefix("127.0.0.0/8")},
		{Prefix: netip.MustParsePrefix("::1/128")},
	}
)

type lab struct {
	gw    *gateway.Server
	key   wireguard.Key
	dns   *dnsServer
	peers atomic.Int32
}

type labOptions struct {
	key  wireguard.Key  // the gateway's key; zero: a new one
	bind netip.AddrPort // where WireGuard listens; zero: 127.0.0.1, any port
	dns  *dnsServer     // the upstream; nil: a new one
}

func newLab(o labOptions) (*lab, error) {
	l := &lab{key: o.key, dns: o.dns}
	var err error
	if l.key.IsZero() {
		if l.key, err = wireguard.GeneratePrivateKey(); err != nil {
			return nil, err
		}
	}
	if l.dns == nil {
		if l.dns, err = newDNSServer(); err != nil {
			return nil, err
		}
	}
	bind := o.bind
	if !bind.IsValid() {
		bind = netip.MustParseAddrPort("127.0.0.1:0")
	}
	l.gw, err = gateway.New(gateway.Options{
		WireGuard:    &gateway.WireGuardOptions{PrivateKey: l.key, ListenPort: int(bind.Port()), Bind: wireguard.NewAddrBind(bind.Addr())},
		Addrs:        []netip.Addr{gatewayV4, gatewayV6},
		DNSUpstreams: []netip.AddrPort{l.dns.addr},
		Egress:       nat.EgressOptions{Ports: labPorts, DialTimeout: 2 * time.Second},
		Policy:       nat.PolicyOptions{Allow: loopback},
	})
	if err != nil {
		if o.dns == nil {
			l.dns.close()
		}
		return nil, err
	}
	if err := l.gw.Start(context.Background()); err != nil {
		l.gw.Close()
		return nil, err
	}
	return l, nil
}

// startLab starts a lab that the test closes at its end.
func startLab(t testing.TB) *lab {
	t.Helper()
	l, err := newLab(labOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.gw.Close(); l.dns.close() })
	return l
}

// endpoint is where clients send WireGuard packets.
func (l *lab) endpoint() netip.AddrPort {
	return netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(l.gw.ListenPort()))
}

// addClient lets a new client in and returns its configuration, as
// `sluice peer add` would print it.
func (l *lab) addClient() (*wireguard.Config, error) {
	key, err := wireguard.GeneratePrivateKey()
	if err != nil {
		return nil, err
	}
	n := l.peers.Add(1) + 1
	v4 := netip.AddrFrom4([4]byte{100, 96, 0, byte(n)})
	v6 := netip.MustParseAddr(fmt.Sprintf("fd5c:1ce::%x", n))
	if err := l.gw.AddPeer(gateway.Peer{Name: fmt.Sprintf("client%d", n), PublicKey: key.PublicKey(), Addrs: []netip.Addr{v4, v6}}); err != nil {
		return nil, err
	}
	return &wireguard.Config{
		Interface: wireguard.Interface{
			PrivateKey: key,
			Addresses:  []netip.Prefix{netip.PrefixFrom(v4, 32), netip.PrefixFrom(v6, 128)},
			DNS:        []netip.Addr{gatewayV4},
		},
		Peers: []wireguard.ConfigPeer{{
			PublicKey:  l.gw.PublicKey(),
			Endpoint:   l.endpoint().String(),
			AllowedIPs: []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")},
		}},
	}, nil
}

func (l *lab) mustAddClient(t testing.TB) *wireguard.Config {
	t.Helper()
	conf, err := l.addClient()
	if err != nil {
		t.Fatal(err)
	}
	return conf
}

// gatewayPeer is the gateway's side of a client configuration.
func gatewayPeer(conf *wireguard.Config) gateway.Peer {
	p := gateway.Peer{Name: "moved", PublicKey: conf.Interface.PrivateKey.PublicKey()}
	for _, a := range conf.Interface.Addresses {
		p.Addrs = append(p.Addrs, a.Addr())
	}
	return p
}

// dnsServer answers A and AAAA queries from its table over UDP and TCP on
// a loopback port; other names do not exist. Names in tcpOnly get an empty,
// truncated answer over UDP, so that resolvers must ask again over TCP.
type dnsServer struct {
	addr netip.AddrPort
	pc   net.PacketConn
	ln   net.Listener
	wg   sync.WaitGroup

	mu      sync.Mutex
	records map[string][]netip.Addr
	tcpOnly map[string]bool
	queries atomic.Int64
}

func newDNSServer() (*dnsServer, error) {
	// UDP and TCP on one port: the UDP port the kernel picks may be taken
	// for TCP, so try a few.
	var pc net.PacketConn
	var ln net.Listener
	var addr netip.AddrPort
	var err error
	for range 10 {
		if pc, err = net.ListenPacket("udp4", "127.0.0.1:0"); err != nil {
			return nil, err
		}
		addr = netip.MustParseAddrPort(pc.LocalAddr().String())
		if ln, err = net.Listen("tcp4", addr.String()); err == nil {
			break
		}
		pc.Close()
	}
	if err != nil {
		return nil, err
	}
	d := &dnsServer{addr: addr, pc: pc, ln: ln, records: map[string][]netip.Addr{}, tcpOnly: map[string]bool{}}
	d.wg.Add(2)
	go d.serveUDP()
	go d.serveTCP()
	return d, nil
}

func (d *dnsServer) close() {
	d.pc.Close()
	d.ln.Close()
	d.wg.Wait()
}

// set makes name resolve to addrs; no addrs removes it.
func (d *dnsServer) set(name string, addrs ...netip.Addr) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.records[strings.ToLower(strings.TrimSuffix(name, "."))+"."] = addrs
}

func (d *dnsServer) setTCPOnly(name string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.tcpOnly[strings.ToLower(strings.TrimSuffix(name, "."))+"."] = true
}

func (d *dnsServer) answer(q []byte, udp bool) []byte {
	d.queries.Add(1)
	var m dnsmessage.Message
	if err := m.Unpack(q); err != nil || len(m.Questions) != 1 {
		return nil
	}
	m.Response, m.RecursionAvailable, m.Additionals = true, true, nil
	qn := m.Questions[0]
	name := strings.ToLower(qn.Name.String())
	d.mu.Lock()
	addrs, ok := d.records[name]
	truncate := udp && d.tcpOnly[name]
	d.mu.Unlock()
	switch {
	case !ok:
		m.RCode = dnsmessage.RCodeNameError
	case truncate:
		m.Truncated = true
	default:
		for _, a := range addrs {
			h := dnsmessage.ResourceHeader{Name: qn.Name, Class: dnsmessage.ClassINET, TTL: 60}
			switch {
			case a.Is4() && qn.Type == dnsmessage.TypeA:
				h.Type = dnsmessage.TypeA
				m.Answers = append(m.Answers, dnsmessage.Resource{Header: h, Body: &dnsmessage.AResource{A: a.As4()}})
			case a.Is6() && qn.Type == dnsmessage.TypeAAAA:
				h.Type = dnsmessage.TypeAAAA
				m.Answers = append(m.Answers, dnsmessage.Resource{Header: h, Body: &dnsmessage.AAAAResource{AAAA: a.As16()}})
			}
		}
	}
	b, err := m.Pack()
	if err != nil {
		return nil
	}
	return b
}

func (d *dnsServer) serveUDP() {
	defer d.wg.Done()
	buf := make([]byte, 1500)
	for {
		n, from, err := d.pc.ReadFrom(buf)
		if err != nil {
			return
		}
		if a := d.answer(buf[:n], true); a != nil {
			d.pc.WriteTo(a, from)
		}
	}
}

func (d *dnsServer) serveTCP() {
	defer d.wg.Done()
	var conns sync.WaitGroup
	defer conns.Wait()
	for {
		c, err := d.ln.Accept()
		if err != nil {
			return
		}
		conns.Add(1)
		go func() {
			defer conns.Done()
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			var n [2]byte
			if _, err := io.ReadFull(c, n[:]); err != nil {
				return
			}
			q := make([]byte, binary.BigEndian.Uint16(n[:]))
			if _, err := io.ReadFull(c, q); err != nil {
				return
			}
			a := d.answer(q, false)
			c.Write(append(binary.BigEndian.AppendUint16(nil, uint16(len(a))), a...))
		}()
	}
}

// resolver is a host resolver that asks d, for endpoint names.
func (d *dnsServer) resolver() *net.Resolver {
	return &net.Resolver{
		PreferGo: true,
		Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var dialer net.Dialer
			return dialer.DialContext(ctx, network, d.addr.String())
		},
	}
}

var errUnexpected = errors.New("unexpected answer")
