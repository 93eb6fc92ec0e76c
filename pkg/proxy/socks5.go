package proxy

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"syscall"
	"time"

	"go.uber.org/zap"
)

// SOCKS5 protocol numbers, RFC 1928 and RFC 1929.
const (
	socksVersion = 5

	methodNone     = 0x00
	methodPassword = 0x02
	methodNoneOK   = 0xff

	passwordVersion = 1

	cmdConnect   = 1
	cmdBind      = 2
	cmdAssociate = 3

	atypIPv4   = 1
	atypDomain = 3
	atypIPv6   = 4
)

// SOCKS5 replies (RFC 1928 section 6).
const (
	replySucceeded           = 0
	replyGeneralFailure      = 1
	replyNotAllowed          = 2
	replyNetworkUnreachable  = 3
	replyHostUnreachable     = 4
	replyConnectionRefused   = 5
	replyTTLExpired          = 6
	replyCommandNotSupported = 7
	replyAddressNotSupported = 8
)

// SOCKS5Options configures NewSOCKS5. Only Dialer is required.
type SOCKS5Options struct {
	// Dialer opens the connections CONNECT asks for. If it is also a
	// PacketDialer, UDP ASSOCIATE works too. Required.
	Dialer Dialer
	// Credentials, when set, are required of every client (RFC 1929);
	// nil means no authentication.
	Credentials *Credentials
	// MaxConns bounds the client connections served at once, a UDP
	// association's control connection included [DefaultMaxConns].
	MaxConns int
	// DialTimeout bounds opening a proxied connection [DefaultDialTimeout].
	DialTimeout time.Duration
	// HandshakeTimeout bounds the time a client has to authenticate and
	// send its request [DefaultHandshakeTimeout].
	HandshakeTimeout time.Duration
	// UDPIdleTimeout ends a UDP association, and closes its control
	// connection, once no datagram went either way for this long
	// [DefaultUDPIdleTimeout].
	UDPIdleTimeout time.Duration
	// Logger receives the server's logs; nil means none. Nothing is
	// logged per datagram; failed requests are logged at Debug.
	Logger *zap.Logger
}

// SOCKS5Server is a SOCKS5 proxy: CONNECT, and UDP ASSOCIATE if its
// Dialer is a PacketDialer. Names in requests are resolved by the Dialer,
// never by the host.
type SOCKS5Server struct {
	common
	dialer  Dialer
	packets PacketDialer // nil: no UDP
	creds   *Credentials
	udpIdle time.Duration
	log     *zap.Logger
	srv     *server
}

// NewSOCKS5 returns a server; it serves nothing until Serve.
func NewSOCKS5(opts SOCKS5Options) (*SOCKS5Server, error) {
	if opts.Dialer == nil {
		return nil, errors.New("proxy: SOCKS5Options.Dialer is required")
	}
	if err := opts.Credentials.check("SOCKS5Options.Credentials"); err != nil {
		return nil, err
	}
	cm, err := newCommon("SOCKS5Options", opts.MaxConns, opts.DialTimeout, opts.HandshakeTimeout)
	if err != nil {
		return nil, err
	}
	if opts.UDPIdleTimeout < 0 {
		return nil, fmt.Errorf("proxy: SOCKS5Options.UDPIdleTimeout %s is negative", opts.UDPIdleTimeout)
	}
	if opts.UDPIdleTimeout == 0 {
		opts.UDPIdleTimeout = DefaultUDPIdleTimeout
	}
	log := opts.Logger
	if log == nil {
		log = zap.NewNop()
	}
	log = log.Named("socks5")
	s := &SOCKS5Server{
		common:  cm,
		dialer:  opts.Dialer,
		creds:   opts.Credentials,
		udpIdle: opts.UDPIdleTimeout,
		log:     log,
		srv:     newServer(log, cm.maxConns),
	}
	if opts.Credentials != nil {
		c := *opts.Credentials
		s.creds = &c
	}
	s.packets, _ = opts.Dialer.(PacketDialer)
	return s, nil
}

// Serve accepts SOCKS5 clients on ln until Close, which closes ln, or
// until ln fails. It returns ErrServerClosed after Close. Serve may be
// called for several listeners at once.
func (s *SOCKS5Server) Serve(ln net.Listener) error {
	lln, err := s.srv.limit(ln, s.refuse)
	if err != nil {
		ln.Close()
		return err
	}
	defer lln.Close()
	return s.srv.acceptLoop(lln, s.handle)
}

// Close stops the server: it closes its listeners and every connection,
// client and proxied, and waits for its goroutines. It is idempotent.
func (s *SOCKS5Server) Close() error {
	s.srv.close()
	return nil
}

// socksRequest is a client's request.
type socksRequest struct {
	cmd  byte
	host string // an IP address or a name
	port uint16
}

func (r socksRequest) address() string { return net.JoinHostPort(r.host, strconv.Itoa(int(r.port))) }

// replyError is a request that cannot be served, with the reply that
// says so.
type replyError struct {
	code byte
	err  error
}

func (e *replyError) Error() string { return e.err.Error() }

func (s *SOCKS5Server) handle(c net.Conn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(s.handshakeTimeout))
	if err := s.negotiate(c); err != nil {
		s.log.Debug("handshake failed", zap.Stringer("client", c.RemoteAddr()), zap.Error(err))
		return
	}
	req, err := readRequest(c)
	if err != nil {
		var re *replyError
		if errors.As(err, &re) {
			writeReply(c, re.code, nil)
		}
		s.log.Debug("bad request", zap.Stringer("client", c.RemoteAddr()), zap.Error(err))
		return
	}
	switch req.cmd {
	case cmdConnect:
		s.connect(c, req)
	case cmdAssociate:
		if s.packets == nil {
			writeReply(c, replyCommandNotSupported, nil)
			return
		}
		s.associate(c, req)
	default:
		writeReply(c, replyCommandNotSupported, nil)
	}
}

// refuse answers a client over MaxConns: it lets the client through the
// method negotiation so that it can read a reply, and replies 1.
func (s *SOCKS5Server) refuse(c net.Conn) {
	if s.negotiate(c) != nil {
		return
	}
	if _, err := readRequest(c); err != nil {
		return
	}
	writeReply(c, replyGeneralFailure, nil)
}

// negotiate reads the client's greeting, picks the method, and checks the
// credentials if there are any.
func (s *SOCKS5Server) negotiate(c net.Conn) error {
	var hdr [2]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return err
	}
	if hdr[0] != socksVersion {
		return fmt.Errorf("not SOCKS5 (version %d)", hdr[0])
	}
	methods := make([]byte, hdr[1])
	if _, err := io.ReadFull(c, methods); err != nil {
		return err
	}
	want := byte(methodNone)
	if s.creds != nil {
		want = methodPassword
	}
	offered := false
	for _, m := range methods {
		offered = offered || m == want
	}
	if !offered {
		c.Write([]byte{socksVersion, methodNoneOK})
		return fmt.Errorf("the client does not offer method %d", want)
	}
	if _, err := c.Write([]byte{socksVersion, want}); err != nil {
		return err
	}
	if s.creds == nil {
		return nil
	}
	// RFC 1929: VER ULEN UNAME PLEN PASSWD.
	var b [1]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		return err
	}
	if b[0] != passwordVersion {
		return fmt.Errorf("username/password version %d", b[0])
	}
	user, err := readString(c)
	if err != nil {
		return err
	}
	pass, err := readString(c)
	if err != nil {
		return err
	}
	if !s.creds.match(user, pass) {
		c.Write([]byte{passwordVersion, 1})
		return errors.New("wrong username or password")
	}
	_, err = c.Write([]byte{passwordVersion, 0})
	return err
}

// readString reads a string prefixed by its length in one byte.
func readString(r io.Reader) (string, error) {
	var n [1]byte
	if _, err := io.ReadFull(r, n[:]); err != nil {
		return "", err
	}
	b := make([]byte, n[0])
	if _, err := io.ReadFull(r, b); err != nil {
		return "", err
	}
	return string(b), nil
}

// readRequest reads VER CMD RSV ATYP DST.ADDR DST.PORT.
func readRequest(r io.Reader) (socksRequest, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return socksRequest{}, err
	}
	if hdr[0] != socksVersion {
		return socksRequest{}, &replyError{replyGeneralFailure, fmt.Errorf("request of version %d", hdr[0])}
	}
	host, port, err := readAddr(r, hdr[3])
	if err != nil {
		return socksRequest{}, err
	}
	return socksRequest{cmd: hdr[1], host: host, port: port}, nil
}

// readAddr reads an address of type atyp and a port.
func readAddr(r io.Reader, atyp byte) (string, uint16, error) {
	var host string
	switch atyp {
	case atypIPv4:
		var a [4]byte
		if _, err := io.ReadFull(r, a[:]); err != nil {
			return "", 0, err
		}
		host = netip.AddrFrom4(a).String()
	case atypIPv6:
		var a [16]byte
		if _, err := io.ReadFull(r, a[:]); err != nil {
			return "", 0, err
		}
		host = netip.AddrFrom16(a).Unmap().String()
	case atypDomain:
		name, err := readString(r)
		if err != nil {
			return "", 0, err
		}
		if name == "" {
			return "", 0, &replyError{replyHostUnreachable, errors.New("empty domain name")}
		}
		host = name
	default:
		return "", 0, &replyError{replyAddressNotSupported, fmt.Errorf("address type %d", atyp)}
	}
	var p [2]byte
	if _, err := io.ReadFull(r, p[:]); err != nil {
		return "", 0, err
	}
	return host, binary.BigEndian.Uint16(p[:]), nil
}

// appendAddr appends ATYP, the address and the port of ap; IPv4 in IPv6
// form goes as IPv4.
func appendAddr(b []byte, ap netip.AddrPort) []byte {
	a := ap.Addr().Unmap()
	if a.Is4() {
		a4 := a.As4()
		b = append(append(b, atypIPv4), a4[:]...)
	} else if a.Is6() {
		a16 := a.As16()
		b = append(append(b, atypIPv6), a16[:]...)
	} else {
		b = append(b, atypIPv4, 0, 0, 0, 0)
	}
	return binary.BigEndian.AppendUint16(b, ap.Port())
}

// writeReply sends a reply; bound is BND.ADDR and BND.PORT, zeros if nil.
func writeReply(w io.Writer, code byte, bound net.Addr) error {
	var ap netip.AddrPort
	switch a := bound.(type) {
	case *net.TCPAddr:
		ap = a.AddrPort()
	case *net.UDPAddr:
		ap = a.AddrPort()
	}
	_, err := w.Write(appendAddr([]byte{socksVersion, code, 0}, ap))
	return err
}

func (s *SOCKS5Server) connect(c net.Conn, req socksRequest) {
	ctx, cancel := context.WithTimeout(s.srv.ctx, s.dialTimeout)
	remote, err := s.dialer.DialContext(ctx, "tcp", req.address())
	cancel()
	if err != nil {
		code := replyCode(err)
		s.log.Debug("CONNECT failed", zap.String("to", req.address()), zap.Uint8("reply", code), zap.Error(err))
		writeReply(c, code, nil)
		return
	}
	if !s.srv.track(remote) {
		remote.Close()
		return
	}
	defer s.srv.untrack(remote)
	if err := writeReply(c, replySucceeded, remote.LocalAddr()); err != nil {
		remote.Close()
		return
	}
	c.SetDeadline(time.Time{})
	relay(c, remote)
}

// replyCode maps a Dialer's error to the SOCKS5 reply that describes it.
func replyCode(err error) byte {
	var dnsErr *net.DNSError
	switch {
	case errors.Is(err, ErrNotAllowed), errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		return replyNotAllowed
	case errors.As(err, &dnsErr):
		if dnsErr.IsTimeout {
			return replyTTLExpired
		}
		return replyHostUnreachable
	case errors.Is(err, syscall.ENETUNREACH):
		return replyNetworkUnreachable
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.EHOSTDOWN):
		return replyHostUnreachable
	case errors.Is(err, syscall.ECONNREFUSED):
		return replyConnectionRefused
	case errors.Is(err, syscall.ETIMEDOUT), errors.Is(err, context.DeadlineExceeded), isTimeout(err):
		return replyTTLExpired
	}
	return replyGeneralFailure
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
