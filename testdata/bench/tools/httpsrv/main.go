// Command httpsrv is the benchmark's web server in the server namespace: it
// serves the files of one directory and records which source addresses it
// has seen, so that the scripts can check that traffic arrived NATed (from
// the gateway's address) and never from the client or its tunnel address.
package main

import (
	"flag"
	"log"
	"net"
	"net/http"
	"os"
	"sync"
	"time"
)

func main() {
	addr := flag.String("addr", ":8080", "listen `ADDR`")
	dir := flag.String("dir", ".", "`DIR` to serve")
	peers := flag.String("peers", "", "append each new source address to `FILE`")
	flag.Parse()

	rec := &peerLog{path: *peers, seen: map[string]bool{}}
	files := http.FileServer(http.Dir(*dir))
	srv := &http.Server{
		Addr: *addr,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			rec.note(r.RemoteAddr)
			files.ServeHTTP(w, r)
		}),
		ReadHeaderTimeout: 10 * time.Second,
	}
	log.Fatal(srv.ListenAndServe())
}

// peerLog appends each source address it has not seen before to a file; the
// file is the interface to the shell scripts, which grep it.
type peerLog struct {
	path string
	mu   sync.Mutex
	seen map[string]bool
}

func (p *peerLog) note(remote string) {
	if p.path == "" {
		return
	}
	host, _, err := net.SplitHostPort(remote)
	if err != nil {
		host = remote
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.seen[host] {
		return
	}
	p.seen[host] = true
	f, err := os.OpenFile(p.path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		log.Printf("peers file: %v", err)
		return
	}
	defer f.Close()
	if _, err := f.WriteString(host + "\n"); err != nil {
		log.Printf("peers file: %v", err)
	}
}
