// Package wireguard is sluice's WireGuard front door: a user-space
// wireguard-go device whose TUN side is a tun.Device of the caller's choosing
// (normally the netstack), configured from typed peers; keys in the form
// wg(8) uses; and the wg-quick configuration format, rendered and parsed in
// one place.
//
// The device speaks to wireguard-go only through its UAPI text protocol
// (IpcSet, IpcGet), so that what sluice configures is exactly what wg(8)
// would configure and what it reads is what wg(8) would show.
package wireguard

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/ipc"
	"golang.zx2c4.com/wireguard/tun"
)

// MaxPersistentKeepalive is the longest keepalive interval WireGuard can
// express: the UAPI field is 16 bits of seconds.
const MaxPersistentKeepalive = 65535 * time.Second

// ErrClosed is returned by the methods of a Device after Close.
var ErrClosed = errors.New("wireguard: device closed")

// Peer is the configuration of one WireGuard peer.
type Peer struct {
	// PublicKey identifies the peer. Required.
	PublicKey Key
	// PresharedKey is mixed into the handshake when set; the zero Key means
	// none. Both sides must agree on it.
	PresharedKey Key
	// AllowedIPs are the addresses the peer may use as source and that are
	// routed to it. On a gateway these are the peer's tunnel addresses
	// (/32, /128): the device drops packets from the peer with any other
	// source. On a client they are what to send through the peer, such as
	// 0.0.0.0/0 and ::/0. No two peers of a device may list the same
	// prefix.
	AllowedIPs []netip.Prefix
	// Endpoint is where to send the peer's packets until it is heard from.
	// Optional: a server usually learns it from the peer's handshake, a
	// client sets it. Leaving it unset when replacing a peer keeps the
	// endpoint the device already has.
	Endpoint netip.AddrPort
	// PersistentKeepalive, when non-zero, sends a keepalive this often to
	// keep NAT mappings open. It must be a whole number of seconds up to
	// MaxPersistentKeepalive.
	PersistentKeepalive time.Duration
}

// PeerStats is the run-time state of a peer as the device reports it.
type PeerStats struct {
	// PublicKey identifies the peer.
	PublicKey Key
	// Endpoint is the peer's current address: the configured one, or the
	// one it was last heard from. Zero when unknown.
	Endpoint netip.AddrPort
	// LastHandshake is when the last handshake completed; zero if never.
	LastHandshake time.Time
	// RxBytes and TxBytes count the WireGuard traffic received from and sent
	// to the peer, handshakes and keepalives included.
	RxBytes, TxBytes uint64
	// AllowedIPs are the prefixes routed to the peer.
	AllowedIPs []netip.Prefix
}

// Options configures New.
type Options struct {
	// PrivateKey is the device's private key. Required.
	PrivateKey Key
	// ListenPort is the UDP port to listen on; 0 picks any free port (see
	// Device.ListenPort).
	ListenPort int
	// Bind carries the encrypted packets; nil means conn.NewDefaultBind(),
	// UDP sockets on all addresses (IPv4 and IPv6) at ListenPort.
	Bind conn.Bind
	// Peers are configured before the device comes up.
	Peers []Peer
	// Logger receives wireguard-go's log: its verbose messages at Debug,
	// its errors at Warn, and messages that can repeat per packet at most
	// once every ten seconds. Nil means no logs.
	Logger *zap.Logger
}

// Device is a running WireGuard device. Its methods are safe for concurrent
// use.
type Device struct {
	wg   *device.Device
	pub  Key
	port int

	malformed atomic.Uint64 // see Malformed

	mu     sync.Mutex // serialises configuration changes and Close
	closed bool
	peers  map[Key]Peer
	owners map[netip.Prefix]Key // masked allowed IP → the peer that holds it
}

// New starts a WireGuard device that decrypts packets from its peers into
// dev and encrypts what it reads from dev to the peer whose AllowedIPs hold
// the destination. New takes ownership of dev: Close closes it, and so does
// New when it fails.
func New(dev tun.Device, opts Options) (*Device, error) {
	if dev == nil {
		return nil, errors.New("wireguard: tun device is nil")
	}
	d, err := newDevice(dev, opts)
	if err != nil {
		dev.Close()
		return nil, err
	}
	return d, nil
}

func newDevice(dev tun.Device, opts Options) (*Device, error) {
	if opts.PrivateKey.IsZero() {
		return nil, errors.New("wireguard: Options.PrivateKey is required")
	}
	if opts.ListenPort < 0 || opts.ListenPort > 65535 {
		return nil, fmt.Errorf("wireguard: Options.ListenPort %d out of range [0, 65535]", opts.ListenPort)
	}
	d := &Device{
		pub:    opts.PrivateKey.PublicKey(),
		peers:  make(map[Key]Peer, len(opts.Peers)),
		owners: make(map[netip.Prefix]Key),
	}
	var uapi strings.Builder
	// The port comes before the peers. wireguard-go brings the device up
	// by itself when dev reports tun.EventUp, and a peer with an endpoint
	// sends its handshake initiation as soon as it starts on an up
	// device: had the port been set after the peers, the bind would be
	// reopened under that initiation, its response would go to a socket
	// that is closed, and the handshake would wait REKEY_TIMEOUT (5 s)
	// to be tried again.
	fmt.Fprintf(&uapi, "private_key=%s\nlisten_port=%d\n", opts.PrivateKey.hex(), opts.ListenPort)
	for i, p := range opts.Peers {
		field := fmt.Sprintf("Options.Peers[%d]", i)
		if err := d.checkPeer(p, field); err != nil {
			return nil, err
		}
		if _, dup := d.peers[p.PublicKey]; dup {
			return nil, fmt.Errorf("wireguard: %s.PublicKey: peer %s is listed twice", field, p.PublicKey.short())
		}
		d.remember(p)
		writePeerUAPI(&uapi, p)
	}

	log := opts.Logger
	if log == nil {
		log = zap.NewNop()
	}
	bind := opts.Bind
	if bind == nil {
		bind = conn.NewDefaultBind()
	}
	bind = countMalformed(bind, &d.malformed)
	d.wg = device.NewDevice(dev, bind, newDeviceLogger(log.Named("wireguard"), &d.malformed))
	if err := d.wg.IpcSet(uapi.String()); err != nil {
		d.wg.Close()
		// When the device is up already, setting the port opens the
		// bind, which can find the port taken.
		var ipcErr *device.IPCError
		if errors.As(err, &ipcErr) && ipcErr.ErrorCode() == ipc.IpcErrorPortInUse {
			return nil, fmt.Errorf("wireguard: listen on UDP port %d: %w", opts.ListenPort, err)
		}
		return nil, fmt.Errorf("wireguard: configure device: %w", err)
	}
	// Otherwise Up opens it, and is where the port is found taken.
	if err := d.wg.Up(); err != nil {
		d.wg.Close()
		return nil, fmt.Errorf("wireguard: listen on UDP port %d: %w", opts.ListenPort, err)
	}
	port, err := d.readListenPort()
	if err != nil {
		d.wg.Close()
		return nil, err
	}
	d.port = port
	return d, nil
}

// AddPeer adds a peer, or replaces the configuration of the peer with the
// same public key: its preshared key, keepalive and allowed IPs, and its
// endpoint if p sets one. Sessions with other peers are not disturbed.
func (d *Device) AddPeer(p Peer) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return ErrClosed
	}
	if err := d.checkPeer(p, "peer "+p.PublicKey.short()); err != nil {
		return err
	}
	var uapi strings.Builder
	writePeerUAPI(&uapi, p)
	if err := d.wg.IpcSet(uapi.String()); err != nil {
		if _, existed := d.peers[p.PublicKey]; !existed {
			// The set operation creates the peer on its first line; do not
			// leave a half-configured peer behind that Peers would list
			// and RemovePeer would not know.
			d.wg.IpcSet("public_key=" + p.PublicKey.hex() + "\nremove=true\n")
		}
		return fmt.Errorf("wireguard: add peer %s: %w", p.PublicKey.short(), err)
	}
	d.forget(p.PublicKey)
	d.remember(p)
	return nil
}

// RemovePeer removes the peer with public key pub and drops its sessions.
// It is an error if there is no such peer.
func (d *Device) RemovePeer(pub Key) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return ErrClosed
	}
	if _, ok := d.peers[pub]; !ok {
		return fmt.Errorf("wireguard: remove peer %s: no such peer", pub.short())
	}
	if err := d.wg.IpcSet("public_key=" + pub.hex() + "\nremove=true\n"); err != nil {
		return fmt.Errorf("wireguard: remove peer %s: %w", pub.short(), err)
	}
	d.forget(pub)
	return nil
}

// Malformed counts the datagrams the device dropped because they were not
// WireGuard messages (an unknown type; with a Bind other than the default,
// also too short or of the wrong size) or failed authentication (a bad MAC,
// a handshake that no peer's key opens): what garbage and scans send to
// the port. Transport messages that fail decryption are not counted:
// wireguard-go drops them silently.
func (d *Device) Malformed() uint64 { return d.malformed.Load() }

// Peers returns the state of every peer, ordered by public key.
func (d *Device) Peers() ([]PeerStats, error) {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil, ErrClosed
	}
	uapi, err := d.wg.IpcGet()
	d.mu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("wireguard: read peers: %w", err)
	}
	stats, err := parsePeerStats(uapi)
	if err != nil {
		return nil, fmt.Errorf("wireguard: read peers: %w", err)
	}
	slices.SortFunc(stats, func(a, b PeerStats) int { return bytes.Compare(a.PublicKey[:], b.PublicKey[:]) })
	return stats, nil
}

// ListenPort returns the UDP port the device listens on.
func (d *Device) ListenPort() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.port
}

// SetListenPort moves the device to another UDP port (0: any free one).
// Its peers see its packets come from a new endpoint and follow it: this
// is how a client roams.
func (d *Device) SetListenPort(port int) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return ErrClosed
	}
	if err := d.wg.IpcSet(fmt.Sprintf("listen_port=%d\n", port)); err != nil {
		return fmt.Errorf("wireguard: listen on UDP port %d: %w", port, err)
	}
	p, err := d.readListenPort()
	if err != nil {
		return err
	}
	d.port = p
	return nil
}

// PublicKey returns the device's public key, the one its peers configure.
func (d *Device) PublicKey() Key { return d.pub }

// Close stops the device, closes its sockets and the tun.Device it was given,
// and waits for wireguard-go's packet goroutines to finish. It is
// idempotent.
func (d *Device) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	d.wg.Close()
	return nil
}

// checkPeer validates p for this device; field names p in errors. The
// caller holds d.mu, or d is not shared yet.
func (d *Device) checkPeer(p Peer, field string) error {
	if p.PublicKey.IsZero() {
		return fmt.Errorf("wireguard: %s.PublicKey is required", field)
	}
	if p.PublicKey == d.pub {
		return fmt.Errorf("wireguard: %s.PublicKey is the device's own public key", field)
	}
	seen := make(map[netip.Prefix]bool, len(p.AllowedIPs))
	for i, pfx := range p.AllowedIPs {
		if !pfx.IsValid() {
			return fmt.Errorf("wireguard: %s.AllowedIPs[%d] is not a valid prefix", field, i)
		}
		m := pfx.Masked()
		if seen[m] {
			return fmt.Errorf("wireguard: %s.AllowedIPs[%d]: %s is listed twice", field, i, m)
		}
		seen[m] = true
		// wireguard-go would silently move the prefix to the new peer,
		// cutting the old one off; two clients with one address is a
		// configuration mistake that must surface here.
		if owner, ok := d.owners[m]; ok && owner != p.PublicKey {
			return fmt.Errorf("wireguard: %s.AllowedIPs[%d]: %s already belongs to peer %s", field, i, m, owner.short())
		}
	}
	if p.Endpoint != (netip.AddrPort{}) {
		if !p.Endpoint.Addr().IsValid() || p.Endpoint.Addr().IsUnspecified() || p.Endpoint.Port() == 0 {
			return fmt.Errorf("wireguard: %s.Endpoint %s is not a usable address and port", field, p.Endpoint)
		}
	}
	ka := p.PersistentKeepalive
	if ka < 0 || ka > MaxPersistentKeepalive {
		return fmt.Errorf("wireguard: %s.PersistentKeepalive %s out of range [0, %s]", field, ka, MaxPersistentKeepalive)
	}
	if ka%time.Second != 0 {
		return fmt.Errorf("wireguard: %s.PersistentKeepalive %s is not a whole number of seconds", field, ka)
	}
	return nil
}

// remember records p as configured. The caller holds d.mu or owns d.
func (d *Device) remember(p Peer) {
	p.AllowedIPs = slices.Clone(p.AllowedIPs)
	d.peers[p.PublicKey] = p
	for _, pfx := range p.AllowedIPs {
		d.owners[pfx.Masked()] = p.PublicKey
	}
}

// forget drops what remember recorded for pub. The caller holds d.mu.
func (d *Device) forget(pub Key) {
	p, ok := d.peers[pub]
	if !ok {
		return
	}
	for _, pfx := range p.AllowedIPs {
		if d.owners[pfx.Masked()] == pub {
			delete(d.owners, pfx.Masked())
		}
	}
	delete(d.peers, pub)
}

// readListenPort asks the device which port its bind opened, which differs
// from the configured one when that was 0.
func (d *Device) readListenPort() (int, error) {
	uapi, err := d.wg.IpcGet()
	if err != nil {
		return 0, fmt.Errorf("wireguard: read listen port: %w", err)
	}
	port, err := parseListenPort(uapi)
	if err != nil {
		return 0, fmt.Errorf("wireguard: read listen port: %w", err)
	}
	return port, nil
}
