// Command idleflows holds many idle TCP connections open through a gateway
// and then checks that every one of them still works.
//
//	idleflows serve -addr 10.99.2.2 -port 9000 -ports 16
//	idleflows open  -addr 10.99.2.2 -port 9000 -ports 16 -n 15000
//
// serve listens on -ports consecutive ports and echoes whatever arrives.
// open makes -n connections spread round-robin over those ports, prints one
// JSON line ({"phase":"open",...}), waits for a line (or EOF) on standard
// input so that the caller can measure the gateway with every flow open and
// idle, then sends one byte on each connection, expects it back, prints a
// second JSON line ({"phase":"echo",...}) and exits. Spreading the flows over
// several destination ports is what lets a gateway with a small egress port
// slice reuse each port once per destination.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(os.Args[2:])
	case "open":
		err = open(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "idleflows:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: idleflows serve|open [flags]; idleflows open -h for the flags")
	os.Exit(2)
}

// target is the set of destinations both modes agree on.
type target struct {
	addr  string
	port  int
	ports int
}

func (t *target) flags(fs *flag.FlagSet) {
	fs.StringVar(&t.addr, "addr", "10.99.2.2", "server `ADDR`")
	fs.IntVar(&t.port, "port", 9000, "first server `PORT`")
	fs.IntVar(&t.ports, "ports", 16, "`N` consecutive server ports")
}

func (t *target) check() error {
	if _, err := netip.ParseAddr(t.addr); err != nil {
		return fmt.Errorf("-addr: %w", err)
	}
	if t.ports < 1 || t.port < 1 || t.port+t.ports-1 > 65535 {
		return fmt.Errorf("-port %d -ports %d: not a port range", t.port, t.ports)
	}
	return nil
}

// dest is the address of connection i.
func (t *target) dest(i int) string {
	return net.JoinHostPort(t.addr, strconv.Itoa(t.port+i%t.ports))
}

func serve(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	var t target
	t.flags(fs)
	fs.Parse(args)
	if err := t.check(); err != nil {
		return err
	}
	errc := make(chan error, t.ports)
	for i := range t.ports {
		ln, err := net.Listen("tcp", t.dest(i))
		if err != nil {
			return err
		}
		go func() { errc <- acceptLoop(ln) }()
	}
	fmt.Printf("listening on %s ports %d-%d\n", t.addr, t.port, t.port+t.ports-1)
	return <-errc
}

func acceptLoop(ln net.Listener) error {
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go echo(c)
	}
}

// echo returns what it reads; its buffer is small because the server holds
// as many connections as the gateway does.
func echo(c net.Conn) {
	defer c.Close()
	buf := make([]byte, 64)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// result is one phase's JSON line.
type result struct {
	Phase      string  `json:"phase"`
	N          int     `json:"n"`
	OK         int64   `json:"ok"`
	Failed     int64   `json:"failed"`
	Seconds    float64 `json:"seconds"`
	FirstError string  `json:"first_error,omitempty"`
}

func open(args []string) error {
	fs := flag.NewFlagSet("open", flag.ExitOnError)
	var t target
	t.flags(fs)
	n := fs.Int("n", 1000, "connections to open")
	c := fs.Int("c", 32, "connections opened (and checked) at a time")
	timeout := fs.Duration("timeout", 10*time.Second, "bound on one connect and on one echo")
	wait := fs.Bool("wait", true, "wait for a line on standard input between opening and echoing")
	fs.Parse(args)
	if err := t.check(); err != nil {
		return err
	}
	if *n < 1 || *c < 1 {
		return errors.New("-n and -c must be at least 1")
	}

	conns := make([]net.Conn, *n)
	defer func() {
		for _, conn := range conns {
			if conn != nil {
				conn.Close()
			}
		}
	}()
	opened := parallel(*n, *c, func(i int) error {
		conn, err := net.DialTimeout("tcp", t.dest(i), *timeout)
		if err != nil {
			return err
		}
		conns[i] = conn
		return nil
	})
	opened.Phase = "open"
	if err := emit(opened); err != nil {
		return err
	}
	if *wait {
		// Any line, or EOF, means go on.
		buf := make([]byte, 1)
		for {
			if _, err := os.Stdin.Read(buf); err != nil || buf[0] == '\n' {
				break
			}
		}
	}
	echoed := parallel(*n, *c, func(i int) error {
		conn := conns[i]
		if conn == nil {
			return errors.New("never opened")
		}
		if err := conn.SetDeadline(time.Now().Add(*timeout)); err != nil {
			return err
		}
		b := []byte{byte(i)}
		if _, err := conn.Write(b); err != nil {
			return fmt.Errorf("write to %s: %w", conn.RemoteAddr(), err)
		}
		if _, err := io.ReadFull(conn, b); err != nil {
			return fmt.Errorf("read from %s: %w", conn.RemoteAddr(), err)
		}
		if b[0] != byte(i) {
			return fmt.Errorf("%s echoed %#x, want %#x", conn.RemoteAddr(), b[0], byte(i))
		}
		return nil
	})
	echoed.Phase = "echo"
	return emit(echoed)
}

// parallel runs fn for 0..n-1 on c workers and counts the outcomes.
func parallel(n, c int, fn func(i int) error) result {
	var next, ok, failed atomic.Int64
	var firstErr atomic.Pointer[string]
	var wg sync.WaitGroup
	start := time.Now()
	for range c {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				if err := fn(i); err != nil {
					failed.Add(1)
					msg := err.Error()
					firstErr.CompareAndSwap(nil, &msg)
					continue
				}
				ok.Add(1)
			}
		})
	}
	wg.Wait()
	r := result{N: n, OK: ok.Load(), Failed: failed.Load(), Seconds: time.Since(start).Seconds()}
	if e := firstErr.Load(); e != nil {
		r.FirstError = *e
	}
	return r
}

func emit(r result) error {
	return json.NewEncoder(os.Stdout).Encode(r)
}
