// Package netstacktest provides a client for tests: a gVisor stack with
// tunnel addresses whose tun.Device face plugs into anything that carries
// IP packets, and net-like Dial and Ping methods on top.
//
// Unlike wireguard-go's tun/netstack, it accepts packets from loopback
// sources, so tests can reach servers on the host's loopback through a
// gateway.
package netstacktest

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// Client is a test client's network stack.
type Client struct {
	stack  *stack.Stack
	ep     *channel.Endpoint
	mtu    int
	addrs  []netip.Addr
	events chan tun.Event

	// virtio: packets carry a virtio_net_hdr each way (NewVirtioClient).
	virtio        bool
	gsoIn, gsoOut atomic.Uint64
	ctx           context.Context
	cancel        context.CancelFunc
	closeOnce     sync.Once
}

var _ tun.Device = (*Client)(nil)

// NewVirtioClient builds a client like NewClient whose packets carry a
// 10-byte virtio_net_hdr each way, as a Linux TUN device with IFF_VNET_HDR
// and TCP segmentation offload does: its TCP sends segments of up to 32 KiB
// whole (GSO, the checksum left for the receiver to finish), and it takes
// such segments. GSOCounts tells how many crossed.
func NewVirtioClient(addrs []netip.Addr, mtu int) (*Client, error) {
	c, err := NewClient(addrs, mtu)
	if err != nil {
		return nil, err
	}
	c.virtio = true
	c.ep.SupportedGSOKind = stack.HostGSOSupported
	c.ep.LinkEPCapabilities = stack.CapabilityRXChecksumOffload
	return c, nil
}

// GSOCounts returns how many GSO segments (larger than one packet) the
// client has sent and received; zero unless it is a NewVirtioClient.
func (c *Client) GSOCounts() (sent, received uint64) { return c.gsoOut.Load(), c.gsoIn.Load() }

// NewClient builds a client stack with the given addresses and a default
// route for each family through its tun.Device face. mtu 0 means 1420.
func NewClient(addrs []netip.Addr, mtu int) (*Client, error) {
	if mtu == 0 {
		mtu = 1420
	}
	c := &Client{
		// A queue deep enough for a TCP window's worth of packets: a
		// shallow one drops bursts and the test measures loss recovery.
		ep:     channel.New(16384, uint32(mtu), ""),
		mtu:    mtu,
		addrs:  addrs,
		events: make(chan tun.Event, 1),
	}
	c.events <- tun.EventUp
	c.ctx, c.cancel = context.WithCancel(context.Background())
	c.stack = stack.New(stack.Options{
		NetworkProtocols: []stack.NetworkProtocolFactory{
			ipv4.NewProtocolWithOptions(ipv4.Options{AllowExternalLoopbackTraffic: true}),
			ipv6.NewProtocolWithOptions(ipv6.Options{AllowExternalLoopbackTraffic: true}),
		},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol, icmp.NewProtocol4, icmp.NewProtocol6},
		HandleLocal:        true,
	})
	if err := c.stack.CreateNIC(1, c.ep); err != nil {
		return nil, fmt.Errorf("netstacktest: create NIC: %s", err)
	}
	sack := tcpip.TCPSACKEnabled(true)
	c.stack.SetTransportProtocolOption(tcp.ProtocolNumber, &sack)
	for _, a := range addrs {
		proto := ipv4.ProtocolNumber
		if a.Is6() {
			proto = ipv6.ProtocolNumber
		}
		pa := tcpip.ProtocolAddress{Protocol: proto, AddressWithPrefix: tcpip.AddrFromSlice(a.AsSlice()).WithPrefix()}
		if err := c.stack.AddProtocolAddress(1, pa, stack.AddressProperties{}); err != nil {
			return nil, fmt.Errorf("netstacktest: add address %s: %s", a, err)
		}
	}
	c.stack.SetRouteTable([]tcpip.Route{
		{Destination: header.IPv4EmptySubnet, NIC: 1},
		{Destination: header.IPv6EmptySubnet, NIC: 1},
	})
	return c, nil
}

// Read implements tun.Device: packets the client sends.
func (c *Client) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	pkt := c.ep.ReadContext(c.ctx)
	if pkt == nil {
		return 0, os.ErrClosed
	}
	n := 0
	for pkt != nil {
		dst := bufs[n][offset:]
		hdr := 0
		if c.virtio {
			hdr = virtioHdrLen
			c.putVirtioHdr(dst, pkt)
		}
		view := pkt.ToView()
		pkt.DecRef()
		sizes[n] = hdr + copy(dst[hdr:], view.AsSlice())
		view.Release()
		n++
		if n == len(bufs) {
			break
		}
		pkt = c.ep.Read()
	}
	return n, nil
}

// Write implements tun.Device: packets for the client.
func (c *Client) Write(bufs [][]byte, offset int) (int, error) {
	select {
	case <-c.ctx.Done():
		return 0, os.ErrClosed
	default:
	}
	for _, b := range bufs {
		b = b[offset:]
		if c.virtio {
			if len(b) < virtioHdrLen {
				continue
			}
			if b[1] != 0 { // gso_type
				c.gsoIn.Add(1)
			}
			b = b[virtioHdrLen:]
		}
		if len(b) == 0 {
			continue
		}
		proto := ipv4.ProtocolNumber
		if b[0]>>4 == 6 {
			proto = ipv6.ProtocolNumber
		}
		pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(b)})
		c.ep.InjectInbound(proto, pkt)
		pkt.DecRef()
	}
	return len(bufs), nil
}

// MTU implements tun.Device.
func (c *Client) MTU() (int, error) { return c.mtu, nil }

// Name implements tun.Device.
func (c *Client) Name() (string, error) { return "testclient", nil }

// File implements tun.Device.
func (c *Client) File() *os.File { return nil }

// Events implements tun.Device.
func (c *Client) Events() <-chan tun.Event { return c.events }

// BatchSize implements tun.Device.
func (c *Client) BatchSize() int { return 64 }

// Close implements tun.Device.
func (c *Client) Close() error {
	c.closeOnce.Do(func() {
		c.cancel()
		c.stack.Close()
		c.ep.Close()
		c.stack.Wait()
		close(c.events)
	})
	return nil
}

func fullAddr(ap netip.AddrPort) (tcpip.FullAddress, tcpip.NetworkProtocolNumber) {
	proto := ipv4.ProtocolNumber
	if ap.Addr().Is6() {
		proto = ipv6.ProtocolNumber
	}
	return tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFromSlice(ap.Addr().Unmap().AsSlice()), Port: ap.Port()}, proto
}

// DialContext connects to address ("host:port" with a literal IP) over
// "tcp", "tcp4", "tcp6", "udp", "udp4" or "udp6".
func (c *Client) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		host, port, serr := net.SplitHostPort(address)
		if serr != nil {
			return nil, err
		}
		a, aerr := netip.ParseAddr(host)
		p, perr := strconv.Atoi(port)
		if aerr != nil || perr != nil {
			return nil, fmt.Errorf("netstacktest: dial %s: literal addresses only", address)
		}
		ap = netip.AddrPortFrom(a, uint16(p))
	}
	fa, proto := fullAddr(ap)
	switch network {
	case "tcp", "tcp4", "tcp6":
		return gonet.DialContextTCP(ctx, c.stack, fa, proto)
	case "udp", "udp4", "udp6":
		return gonet.DialUDP(c.stack, nil, &fa, proto)
	}
	return nil, fmt.Errorf("netstacktest: dial: unknown network %q", network)
}

// DialTCPFrom connects from a chosen local address and port, as a client
// that reuses its port does.
func (c *Client) DialTCPFrom(ctx context.Context, local, remote netip.AddrPort) (net.Conn, error) {
	la, _ := fullAddr(local)
	ra, proto := fullAddr(remote)
	return gonet.DialTCPWithBind(ctx, c.stack, la, ra, proto)
}

// ListenTCP listens on the client's address and port addr.
func (c *Client) ListenTCP(addr netip.AddrPort) (net.Listener, error) {
	fa, proto := fullAddr(addr)
	return gonet.ListenTCP(c.stack, fa, proto)
}

// ListenUDP opens an unconnected UDP socket on the client's address of
// addr's family and addr's port (0: any), for talking to several peers
// from one port.
func (c *Client) ListenUDP(addr netip.AddrPort) (net.PacketConn, error) {
	fa, proto := fullAddr(addr)
	return gonet.DialUDP(c.stack, &fa, nil, proto)
}

// ErrNoReply is returned by Ping when no echo reply arrived in time.
var ErrNoReply = errors.New("netstacktest: no echo reply")

// Ping sends one echo request with payload from the client's address of
// dst's family and waits for the reply until ctx is done. It returns the
// reply's payload.
func (c *Client) Ping(ctx context.Context, dst netip.Addr, seq uint16, payload []byte) ([]byte, error) {
	var wq waiter.Queue
	tp, np := icmp.ProtocolNumber4, ipv4.ProtocolNumber
	if dst.Is6() {
		tp, np = icmp.ProtocolNumber6, ipv6.ProtocolNumber
	}
	ep, terr := c.stack.NewEndpoint(tp, np, &wq)
	if terr != nil {
		return nil, fmt.Errorf("netstacktest: ping endpoint: %s", terr)
	}
	defer ep.Close()
	fa, _ := fullAddr(netip.AddrPortFrom(dst, 0))
	if terr := ep.Connect(fa); terr != nil {
		return nil, fmt.Errorf("netstacktest: ping connect: %s", terr)
	}

	msg := make([]byte, 8+len(payload))
	if dst.Is4() {
		msg[0] = byte(header.ICMPv4Echo)
	} else {
		msg[0] = byte(header.ICMPv6EchoRequest)
	}
	msg[6], msg[7] = byte(seq>>8), byte(seq)
	copy(msg[8:], payload)
	if _, terr := ep.Write(bytes.NewReader(msg), tcpip.WriteOptions{}); terr != nil {
		return nil, fmt.Errorf("netstacktest: ping write: %s", terr)
	}

	we, ch := waiter.NewChannelEntry(waiter.EventIn)
	wq.EventRegister(&we)
	defer wq.EventUnregister(&we)
	for {
		var w bytes.Buffer
		_, terr := ep.Read(&w, tcpip.ReadOptions{})
		if terr == nil {
			reply := w.Bytes()
			if len(reply) >= 8 && uint16(reply[6])<<8|uint16(reply[7]) == seq {
				return reply[8:], nil
			}
			continue
		}
		if _, ok := terr.(*tcpip.ErrWouldBlock); !ok {
			return nil, fmt.Errorf("netstacktest: ping read: %s", terr)
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, ErrNoReply
		case <-time.After(10 * time.Second):
			return nil, ErrNoReply
		}
	}
}

const virtioHdrLen = 10

// putVirtioHdr writes the virtio_net_hdr (little-endian, as on x86 and
// arm64 Linux) for a packet the client sends. It is written from
// linux/virtio_net.h, apart from the gateway's own encoder, so that each
// checks the other.
func (c *Client) putVirtioHdr(b []byte, pkt *stack.PacketBuffer) {
	clear(b[:virtioHdrLen])
	g := pkt.GSOOptions
	if g.Type == stack.GSONone {
		return
	}
	if g.NeedsCsum {
		b[0] = 1 // VIRTIO_NET_HDR_F_NEEDS_CSUM
		binary.LittleEndian.PutUint16(b[6:], g.L3HdrLen)
		binary.LittleEndian.PutUint16(b[8:], g.CsumOffset)
	}
	if pkt.Data().Size() <= int(g.MSS) {
		return
	}
	c.gsoOut.Add(1)
	b[1] = 1 // VIRTIO_NET_HDR_GSO_TCPV4
	if g.Type == stack.GSOTCPv6 {
		b[1] = 4
	}
	binary.LittleEndian.PutUint16(b[2:], uint16(pkt.HeaderSize()))
	binary.LittleEndian.PutUint16(b[4:], g.MSS)
}
