package edge

import (
	"bytes"
	"context"
	"net"
	"strconv"
	"sync"
)

// framingConn follows the HTTP/1.x message framing of what a client
// sends on a plain HTTP connection, to find what RFC 9112 says a server
// must not pass on and net/http repairs silently: a request with both
// Content-Length and Transfer-Encoding (net/http drops the
// Content-Length and forwards the request, so a front proxy that framed
// it by its length and the edge disagree on where the next request
// starts: request smuggling, RFC 9112 section 11.2). It also sees
// malformed chunk sizes and the like, which net/http finds too, but
// only once the request is in flight.
//
// It only watches: the bytes go to net/http unchanged. Wherever the two
// parsers could disagree, each treats the message as broken, and the
// edge closes the connection after any broken message, so a
// disagreement can never move where a request starts.
//
// TLS connections are not watched: net/http must see the *tls.Conn
// itself. A proxy that speaks plain HTTP/1.1 to the edge, where
// smuggling lives, does so on the HTTP listener; over TLS, malformed
// bodies still close the connection (see serveHTTP), and so does every
// request with a Transfer-Encoding, which may have carried a
// Content-Length that net/http dropped (see handler).
type framingConn struct {
	net.Conn
	mu     sync.Mutex
	f      framer
	served int // requests handed to the handler so far
}

// Read reads from the connection and follows what it read.
func (c *framingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.mu.Lock()
		c.f.feed(p[:n])
		c.mu.Unlock()
	}
	return n, err
}

// CloseWrite passes a half-close on, which net/http uses to end a
// connection gracefully.
func (c *framingConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}

// nextRequest is called by the handler for each request, in order (an
// HTTP/1 connection serves one at a time): it reports whether that
// request's framing was broken, and why. net/http has read the
// request's head by then, so a broken head is known; a broken body may
// become known only later (see broken).
func (c *framingConn) nextRequest() (index int, why string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	index = c.served
	c.served++
	if c.f.badAt >= 0 && c.f.badAt <= index {
		return index, c.f.why
	}
	return index, ""
}

// broken reports whether request index, or one before it, was framed
// badly, as far as the connection has been read.
func (c *framingConn) broken(index int) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.f.badAt >= 0 && c.f.badAt <= index
}

// framingListener hands out framingConns.
type framingListener struct{ net.Listener }

func (l framingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	f := &framingConn{Conn: c}
	f.f.badAt = -1
	return f, nil
}

type framingConnKey struct{}

// framingContext is the http.Server's ConnContext: it lets the handler
// find the connection's framingConn.
func framingContext(ctx context.Context, c net.Conn) context.Context {
	if fc, ok := c.(*framingConn); ok {
		return context.WithValue(ctx, framingConnKey{}, fc)
	}
	return ctx
}

func framingOf(ctx context.Context) *framingConn {
	fc, _ := ctx.Value(framingConnKey{}).(*framingConn)
	return fc
}

// The framer's states.
const (
	frHead      = iota // the request line and header fields
	frBody             // n bytes of a Content-Length body
	frChunkSize        // a chunk-size line
	frChunkData        // n bytes of chunk data
	frChunkEnd         // the CRLF after chunk data
	frTrailer          // trailer fields, up to an empty line
	frStopped          // a message was broken; nothing after it is read
)

// maxKept is how much of a line the framer keeps. The lines it reads
// (Content-Length, Transfer-Encoding, a chunk size) are short; of any
// other line only the name matters, which comes first.
const maxKept = 256

// framer is an HTTP/1.x request framing parser (RFC 9112 sections 2 to
// 7) that only keeps what framing needs: a few hundred bytes per
// connection, however large the requests.
type framer struct {
	state int
	line  [maxKept]byte
	kept  int    // bytes of the current line in line
	long  bool   // the current line is longer than maxKept
	tail  []byte // the current line's last bytes, up to tailLen
	n     int64

	index   int // the handler's index of the message being read
	badAt   int // the first broken message, -1 if none
	why     string
	started bool // the request line was read
	http10  bool
	unseen  bool // net/http answers this request itself (OPTIONS *)
	cls     []string
	tes     []string
}

// tailLen is how much of a line's end the framer keeps: " HTTP/1.0\r".
const tailLen = 10

func (f *framer) fail(why string) {
	f.badAt, f.why, f.state = f.index, why, frStopped
}

// feed follows p, the next bytes of the connection.
func (f *framer) feed(p []byte) {
	for len(p) > 0 {
		switch f.state {
		case frStopped:
			return
		case frBody, frChunkData:
			k := int64(len(p))
			if k > f.n {
				k = f.n
			}
			p, f.n = p[k:], f.n-k
			if f.n == 0 {
				if f.state == frBody {
					f.endMessage()
				} else {
					f.state = frChunkEnd
				}
			}
		default:
			i := bytes.IndexByte(p, '\n')
			chunk := p
			if i >= 0 {
				chunk = p[:i]
			}
			if room := maxKept - f.kept; len(chunk) > room {
				f.long = true
				f.kept += copy(f.line[f.kept:], chunk[:room])
			} else {
				f.kept += copy(f.line[f.kept:], chunk)
			}
			f.tail = append(f.tail, chunk[max(0, len(chunk)-tailLen):]...)
			if len(f.tail) > tailLen {
				f.tail = append(f.tail[:0], f.tail[len(f.tail)-tailLen:]...)
			}
			if i < 0 {
				return
			}
			p = p[i+1:]
			f.endLine(f.line[:f.kept], f.long)
			f.kept, f.long, f.tail = 0, false, f.tail[:0]
		}
	}
}

// endLine takes a line of the head, a chunk size or a trailer: l is what
// was kept of it, without the LF; long says whether more was cut off.
func (f *framer) endLine(l []byte, long bool) {
	cr := len(f.tail) > 0 && f.tail[len(f.tail)-1] == '\r'
	if cr && !long {
		l = l[:len(l)-1]
	}
	switch f.state {
	case frHead:
		f.headLine(l, long)
	case frChunkSize:
		// Chunk lines end in CRLF, and nothing else (RFC 9112 7.1; as
		// net/http reads them).
		if !cr || bytes.IndexByte(l, '\r') >= 0 {
			f.fail("a chunk-size line does not end in CRLF")
			return
		}
		size := l
		if i := bytes.IndexByte(size, ';'); i >= 0 {
			size = size[:i]
		} else if long {
			f.fail("a chunk-size line is too long")
			return
		}
		size = bytes.TrimRight(size, " \t")
		n, ok := parseHex(size)
		if !ok {
			f.fail("a malformed chunk size")
			return
		}
		if n == 0 {
			f.state = frTrailer
			return
		}
		f.state, f.n = frChunkData, n
	case frChunkEnd:
		if !cr || len(l) != 0 {
			f.fail("chunk data is not followed by CRLF")
		}
		f.state = frChunkSize
	case frTrailer:
		if len(l) == 0 && !long {
			f.endMessage()
		}
	}
}

// headLine takes a line of the request head.
func (f *framer) headLine(l []byte, long bool) {
	if !f.started {
		if len(l) == 0 && !long {
			return // an empty line before a request is tolerated (RFC 9112 2.2)
		}
		f.started = true
		// net/http answers "OPTIONS *" without calling the handler, so
		// that request has no index of the handler's.
		f.unseen = !long && bytes.HasPrefix(l, []byte("OPTIONS * "))
		f.http10 = bytes.HasSuffix(bytes.TrimSuffix(f.tail, []byte("\r")), []byte(" HTTP/1.0"))
		return
	}
	if len(l) == 0 && !long {
		f.endHead()
		return
	}
	if l[0] == ' ' || l[0] == '\t' {
		// Obsolete line folding could carry a framing field's value
		// past a parser that does not unfold it (RFC 9112 5.2).
		f.fail("a header field is folded over lines")
		return
	}
	name, value, ok := bytes.Cut(l, []byte(":"))
	if !ok {
		if long {
			return // a name longer than maxKept is no framing field
		}
		f.fail("a header line without a colon")
		return
	}
	lower := string(bytes.ToLower(bytes.TrimRight(name, " \t")))
	switch lower {
	case "content-length", "transfer-encoding":
		if long {
			f.fail(lower + " is too long")
			return
		}
		v := string(bytes.Trim(value, " \t"))
		if lower == "content-length" {
			f.cls = append(f.cls, v)
		} else {
			f.tes = append(f.tes, v)
		}
	}
}

// endHead decides how the body of the request whose head just ended is
// framed (RFC 9112 6.3).
func (f *framer) endHead() {
	switch {
	case len(f.tes) > 0 && len(f.cls) > 0:
		f.fail("Content-Length together with Transfer-Encoding")
	case len(f.tes) > 0:
		// Only chunked is served, alone, and not to HTTP/1.0, which
		// has no transfer codings (RFC 9112 6.1).
		if f.http10 || len(f.tes) != 1 || !equalFold(f.tes[0], "chunked") {
			f.fail("an unsupported Transfer-Encoding")
			return
		}
		f.state = frChunkSize
	case len(f.cls) > 0:
		n, err := strconv.ParseInt(f.cls[0], 10, 64)
		if err != nil || n < 0 || f.cls[0][0] == '+' {
			f.fail("a malformed Content-Length")
			return
		}
		for _, v := range f.cls[1:] {
			if v != f.cls[0] {
				f.fail("Content-Length fields that differ")
				return
			}
		}
		if n == 0 {
			f.endMessage()
			return
		}
		f.state, f.n = frBody, n
	default:
		f.endMessage()
	}
}

func (f *framer) endMessage() {
	if !f.unseen {
		f.index++
	}
	f.state = frHead
	f.started, f.http10, f.unseen, f.cls, f.tes = false, false, false, f.cls[:0], f.tes[:0]
}

// parseHex parses a chunk size: 1 to 16 hex digits, no sign.
func parseHex(b []byte) (int64, bool) {
	if len(b) == 0 || len(b) > 16 {
		return 0, false
	}
	var n uint64
	for _, c := range b {
		switch {
		case c >= '0' && c <= '9':
			c -= '0'
		case c >= 'a' && c <= 'f':
			c -= 'a' - 10
		case c >= 'A' && c <= 'F':
			c -= 'A' - 10
		default:
			return 0, false
		}
		n = n<<4 | uint64(c)
	}
	if n > 1<<62 {
		return 0, false
	}
	return int64(n), true
}

func equalFold(a, b string) bool { return bytes.EqualFold([]byte(a), []byte(b)) }
