// Command connrate measures how many new TCP connections per second reach
// an HTTP server: each connection sends one HTTP/1.1 request with
// "Connection: close", reads the response to EOF and closes. It prints one
// JSON object: the rate, the percentiles of the whole exchange and of the
// TCP connect alone (the handshake, which through sluice includes the
// gateway's egress dial), and the failures.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

func main() {
	addr := flag.String("addr", "10.99.2.2:8080", "server `HOST:PORT`")
	path := flag.String("path", "/tiny", "request `PATH`")
	n := flag.Int("n", 2000, "connections in all")
	c := flag.Int("c", 1, "connections at a time (1: one after the other)")
	timeout := flag.Duration("timeout", 5*time.Second, "bound on one connection's exchange")
	flag.Parse()
	if *n < 1 || *c < 1 {
		fmt.Fprintln(os.Stderr, "connrate: -n and -c must be at least 1")
		os.Exit(2)
	}

	req := fmt.Appendf(nil, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", *path, *addr)
	// Each slot is written by the one worker that took its index.
	total := make([]time.Duration, *n)
	connect := make([]time.Duration, *n)
	var next atomic.Int64
	var failed atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	start := time.Now()
	for range *c {
		wg.Go(func() {
			buf := make([]byte, 32<<10)
			for {
				i := next.Add(1) - 1
				if i >= int64(*n) {
					return
				}
				t0 := time.Now()
				dial, err := exchange(*addr, req, buf, *timeout)
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
					total[i], connect[i] = -1, -1
					continue
				}
				total[i], connect[i] = time.Since(t0), dial
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)

	okTotal, okConnect := succeeded(total), succeeded(connect)
	out := map[string]any{
		"n": *n, "c": *c, "ok": len(okTotal), "errors": failed.Load(),
		"seconds":        elapsed.Seconds(),
		"conn_per_s":     float64(len(okTotal)) / elapsed.Seconds(),
		"p50_ms":         percentile(okTotal, 0.50),
		"p99_ms":         percentile(okTotal, 0.99),
		"connect_p50_ms": percentile(okConnect, 0.50),
		"connect_p99_ms": percentile(okConnect, 0.99),
	}
	if e := firstErr.Load(); e != nil {
		out["first_error"] = e
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		os.Exit(1)
	}
}

// exchange makes one connection and one request; it returns how long the
// TCP connect took.
func exchange(addr string, req, buf []byte, timeout time.Duration) (time.Duration, error) {
	t0 := time.Now()
	conn, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return 0, err
	}
	dial := time.Since(t0)
	defer conn.Close()
	if err := conn.SetDeadline(t0.Add(timeout)); err != nil {
		return 0, err
	}
	if _, err := conn.Write(req); err != nil {
		return 0, err
	}
	br := bufio.NewReader(conn)
	status, err := br.ReadSlice('\n')
	if err != nil {
		return 0, fmt.Errorf("status line: %w", err)
	}
	if !bytes.Contains(status, []byte(" 200 ")) {
		return 0, fmt.Errorf("status %q", bytes.TrimSpace(status))
	}
	if _, err := io.CopyBuffer(io.Discard, br, buf); err != nil {
		return 0, fmt.Errorf("body: %w", err)
	}
	return dial, nil
}

func succeeded(d []time.Duration) []time.Duration {
	var ok []time.Duration
	for _, v := range d {
		if v >= 0 {
			ok = append(ok, v)
		}
	}
	slices.Sort(ok)
	return ok
}

// percentile of sorted durations in milliseconds, nearest rank below.
func percentile(sorted []time.Duration, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	return float64(sorted[int(p*float64(len(sorted)-1))].Microseconds()) / 1000
}
