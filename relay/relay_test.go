package relay

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"math/big"
	"net"
	"runtime"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// prompt bounds what must happen at once; generous for a loaded machine
// running the race detector, far below any timeout that would otherwise
// end a connection.
const prompt = 5 * time.Second

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t *testing.T) (*net.TCPConn, *net.TCPConn) {
	t.Helper()
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type accepted struct {
		c   *net.TCPConn
		err error
	}
	ch := make(chan accepted, 1)
	go func() {
		c, err := ln.AcceptTCP()
		ch <- accepted{c, err}
	}()
	c, err := net.DialTCP("tcp4", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	acc := <-ch
	if acc.err != nil {
		t.Fatal(acc.err)
	}
	t.Cleanup(func() { c.Close(); acc.c.Close() })
	return c, acc.c
}

// started is a relay running between a and b on a goroutine of its own.
type started struct {
	done chan struct{}
	res  Result
	err  error
}

func start(ctx context.Context, a, b net.Conn, opts Options) *started {
	s := &started{done: make(chan struct{})}
	go func() {
		defer close(s.done)
		s.res, s.err = Run(ctx, a, b, opts)
	}()
	return s
}

func (s *started) wait(t *testing.T) error {
	t.Helper()
	select {
	case <-s.done:
		return s.err
	case <-time.After(prompt):
		t.Fatal("the relay did not return")
		return nil
	}
}

// relayed is a relay between two loopback TCP connections: the test
// speaks as peerA and peerB, the relay copies between their other ends.
func relayed(t *testing.T, opts Options) (peerA, peerB *net.TCPConn, r *started) {
	t.Helper()
	peerA, a := tcpPair(t)
	b, peerB := tcpPair(t)
	return peerA, peerB, start(context.Background(), a, b, opts)
}

func readExactly(t *testing.T, c net.Conn, want string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(prompt))
	got := make([]byte, len(want))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != want {
		t.Fatalf("read %q, %v; want %q", got, err, want)
	}
}

func readEOF(t *testing.T, c net.Conn) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(prompt))
	var b [16]byte
	if n, err := c.Read(b[:]); n != 0 || err != io.EOF {
		t.Fatalf("read %q, %v; want EOF", b[:n], err)
	}
}

// readReset asserts that c's peer reset it: its read fails with
// ECONNRESET, promptly.
func readReset(t *testing.T, c net.Conn) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(prompt))
	var b [16]byte
	n, err := c.Read(b[:])
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("read %q, %v; want ECONNRESET", b[:n], err)
	}
}

func write(t *testing.T, c net.Conn, s string) {
	t.Helper()
	if _, err := c.Write([]byte(s)); err != nil {
		t.Fatal(err)
	}
}

func TestHalfClose(t *testing.T) {
	for _, first := range []string{"a", "b"} {
		t.Run("from-"+first, func(t *testing.T) {
			peerA, peerB, r := relayed(t, Options{})
			closer, other := peerA, peerB
			if first == "b" {
				closer, other = peerB, peerA
			}
			write(t, closer, "request")
			if err := closer.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			readExactly(t, other, "request")
			readEOF(t, other)
			// The other way still flows, after the half-close.
			write(t, other, "answer")
			readExactly(t, closer, "answer")
			write(t, other, "more")
			readExactly(t, closer, "more")
			other.CloseWrite()
			readEOF(t, closer)
			if err := r.wait(t); err != nil {
				t.Fatalf("relay: %v; want nil after two half-closes", err)
			}
			if r.res.AToB+r.res.BToA != int64(len("request")+len("answer")+len("more")) {
				t.Errorf("result %+v", r.res)
			}
		})
	}
}

// TestResetAborts is the defect of issue 14: a reset from one side, while
// the relay waits for the other to speak, must reset that other side and
// end the relay at once.
func TestResetAborts(t *testing.T) {
	for _, resetter := range []string{"a", "b"} {
		t.Run("from-"+resetter, func(t *testing.T) {
			peerA, peerB, r := relayed(t, Options{})
			rst, other := peerA, peerB
			if resetter == "b" {
				rst, other = peerB, peerA
			}
			write(t, rst, "line\n")
			readExactly(t, other, "line\n")
			rst.SetLinger(0)
			rst.Close()
			readReset(t, other)
			err := r.wait(t)
			var re *Error
			if !errors.As(err, &re) || !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("relay: %v; want an *Error with ECONNRESET", err)
			}
			if re.Op != "read" {
				t.Errorf("failed op %q; want read", re.Op)
			}
		})
	}
}

// TestWriteFailureAborts: a side that is gone when the relay writes to it
// resets the other side too.
func TestWriteFailureAborts(t *testing.T) {
	peerA, peerB, r := relayed(t, Options{})
	write(t, peerA, "x")
	readExactly(t, peerB, "x")
	peerB.SetLinger(0)
	peerB.Close()
	// peerA keeps sending: the relay's writes to b fail (or its read of
	// b sees the RST first); either way peerA is reset.
	deadline := time.Now().Add(prompt)
	for {
		if _, err := peerA.Write([]byte("more")); err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("peerA was never reset")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := r.wait(t); err == nil {
		t.Fatal("relay: nil error after a reset")
	}
}

func TestContextAborts(t *testing.T) {
	peerA, a := tcpPair(t)
	b, peerB := tcpPair(t)
	ctx, cancel := context.WithCancel(context.Background())
	r := start(ctx, a, b, Options{})
	write(t, peerA, "x")
	readExactly(t, peerB, "x")
	cancel()
	readReset(t, peerA)
	readReset(t, peerB)
	if err := r.wait(t); !errors.Is(err, context.Canceled) {
		t.Fatalf("relay: %v; want context.Canceled", err)
	}
}

func TestIdleTimeout(t *testing.T) {
	peerA, peerB, r := relayed(t, Options{IdleTimeout: 300 * time.Millisecond})
	write(t, peerA, "x")
	readExactly(t, peerB, "x")
	if err := r.wait(t); !errors.Is(err, ErrIdle) {
		t.Fatalf("relay: %v; want ErrIdle", err)
	}
	readReset(t, peerA)
	readReset(t, peerB)
}

// TestTLSCloseNotify: the end of a plain client's request reaches a TLS
// server as close_notify, which is what crypto/tls reports as io.EOF (a
// bare FIN is io.ErrUnexpectedEOF), and the answer still comes back.
func TestTLSCloseNotify(t *testing.T) {
	cert, pool := selfSigned(t)
	peerA, a := tcpPair(t)
	b, peerB := tcpPair(t)
	srv := tls.Server(peerB, &tls.Config{Certificates: []tls.Certificate{cert}})
	cli := tls.Client(b, &tls.Config{RootCAs: pool, ServerName: "origin.test"})
	hs := make(chan error, 1)
	go func() { hs <- srv.Handshake() }()
	if err := cli.Handshake(); err != nil {
		t.Fatal(err)
	}
	if err := <-hs; err != nil {
		t.Fatal(err)
	}
	r := start(context.Background(), a, cli, Options{})

	write(t, peerA, "GET")
	peerA.CloseWrite()
	readExactly(t, srv, "GET")
	srv.SetReadDeadline(time.Now().Add(prompt))
	var buf [8]byte
	if n, err := srv.Read(buf[:]); n != 0 || err != io.EOF {
		t.Fatalf("TLS server read %q, %v; want io.EOF (close_notify)", buf[:n], err)
	}
	write(t, srv, "200")
	srv.CloseWrite()
	peerB.CloseWrite()
	readExactly(t, peerA, "200")
	readEOF(t, peerA)
	if err := r.wait(t); err != nil {
		t.Fatalf("relay: %v", err)
	}
}

// TestPipe: connections that cannot half-close are closed instead, and
// the relay still ends cleanly.
func TestPipe(t *testing.T) {
	peerA, a := net.Pipe()
	b, peerB := net.Pipe()
	defer peerA.Close()
	defer peerB.Close()
	r := start(context.Background(), a, b, Options{})
	go peerA.Write([]byte("hello"))
	readExactly(t, peerB, "hello")
	go peerB.Write([]byte("back"))
	readExactly(t, peerA, "back")
	peerA.Close()
	readEOF(t, peerB)
	if err := r.wait(t); err != nil {
		t.Fatalf("relay: %v", err)
	}
}

// countingPool is a BufferPool that counts the buffers lent out.
type countingPool struct {
	BufferPool
	out atomic.Int64
}

func (p *countingPool) Get() *[]byte  { p.out.Add(1); return p.BufferPool.Get() }
func (p *countingPool) Put(b *[]byte) { p.out.Add(-1); p.BufferPool.Put(b) }

// TestIdleHoldsNoBuffer: between bursts, a relay of two sockets holds no
// buffer, and every buffer is back when it ends.
func TestIdleHoldsNoBuffer(t *testing.T) {
	pool := &countingPool{BufferPool: NewBufferPool(1024)}
	peerA, peerB, r := relayed(t, Options{Buffers: pool})
	big := bytes.Repeat([]byte("z"), 64<<10) // many full buffers: the try path
	go peerA.Write(big)
	readExactly(t, peerB, string(big))
	write(t, peerB, "small")
	readExactly(t, peerA, "small")
	deadline := time.Now().Add(prompt)
	for pool.out.Load() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d buffers held by an idle relay", pool.out.Load())
		}
		time.Sleep(time.Millisecond)
	}
	peerA.CloseWrite()
	peerB.CloseWrite()
	if err := r.wait(t); err != nil {
		t.Fatal(err)
	}
	if n := pool.out.Load(); n != 0 {
		t.Fatalf("%d buffers not given back", n)
	}
}

// TestNoGoroutineLeft runs relays that end every way and checks that
// none of their goroutines stays.
func TestNoGoroutineLeft(t *testing.T) {
	before := runtime.NumGoroutine()
	for range 10 {
		peerA, peerB, r := relayed(t, Options{})
		peerA.CloseWrite()
		peerB.CloseWrite()
		r.wait(t)

		peerA, _, r = relayed(t, Options{})
		peerA.SetLinger(0)
		peerA.Close()
		r.wait(t)

		_, peerB, r = relayed(t, Options{IdleTimeout: time.Millisecond})
		r.wait(t)
		peerB.Close()
	}
	deadline := time.Now().Add(prompt)
	for {
		after := runtime.NumGoroutine()
		if after <= before {
			break
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines before, %d after:\n%s", before, after, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// selfSigned makes a certificate for origin.test and a pool that trusts
// it.
func selfSigned(t *testing.T) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "origin.test"},
		DNSNames:              []string{"origin.test"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, pool
}
