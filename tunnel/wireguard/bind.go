package wireguard

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"

	"golang.zx2c4.com/wireguard/conn"
)

// AddrBind is a conn.Bind on one local address, for a gateway that must
// listen on one interface only rather than on every address as
// conn.NewDefaultBind does. It reads and writes one datagram per call.
type AddrBind struct {
	addr netip.Addr

	mu sync.Mutex
	pc *net.UDPConn
}

var _ conn.Bind = (*AddrBind)(nil)

// NewAddrBind returns a bind that listens on addr only.
func NewAddrBind(addr netip.Addr) *AddrBind { return &AddrBind{addr: addr} }

// Open implements conn.Bind.
func (b *AddrBind) Open(port uint16) ([]conn.ReceiveFunc, uint16, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.pc != nil {
		return nil, 0, conn.ErrBindAlreadyOpen
	}
	pc, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(b.addr, port)))
	if err != nil {
		return nil, 0, fmt.Errorf("wireguard: listen on %s: %w", netip.AddrPortFrom(b.addr, port), err)
	}
	b.pc = pc
	recv := func(packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
		n, from, err := pc.ReadFromUDPAddrPort(packets[0])
		if err != nil {
			return 0, err
		}
		sizes[0] = n
		eps[0] = &conn.StdNetEndpoint{AddrPort: netip.AddrPortFrom(from.Addr().Unmap(), from.Port())}
		return 1, nil
	}
	return []conn.ReceiveFunc{recv}, uint16(pc.LocalAddr().(*net.UDPAddr).Port), nil
}

// Close implements conn.Bind.
func (b *AddrBind) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.pc == nil {
		return nil
	}
	err := b.pc.Close()
	b.pc = nil
	return err
}

// SetMark implements conn.Bind; marks are not used.
func (b *AddrBind) SetMark(uint32) error { return nil }

// Send implements conn.Bind.
func (b *AddrBind) Send(bufs [][]byte, ep conn.Endpoint) error {
	b.mu.Lock()
	pc := b.pc
	b.mu.Unlock()
	if pc == nil {
		return net.ErrClosed
	}
	se, ok := ep.(*conn.StdNetEndpoint)
	if !ok {
		return conn.ErrWrongEndpointType
	}
	dst := se.AddrPort
	if b.addr.Is6() && dst.Addr().Is4() {
		dst = netip.AddrPortFrom(netip.AddrFrom16(dst.Addr().As16()), dst.Port())
	}
	var errs []error
	for _, buf := range bufs {
		if _, err := pc.WriteToUDPAddrPort(buf, dst); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// ParseEndpoint implements conn.Bind.
func (b *AddrBind) ParseEndpoint(s string) (conn.Endpoint, error) {
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return nil, err
	}
	return &conn.StdNetEndpoint{AddrPort: ap}, nil
}

// BatchSize implements conn.Bind.
func (b *AddrBind) BatchSize() int { return 1 }
