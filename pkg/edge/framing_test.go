package edge

import (
	"strings"
	"testing"
)

// TestFramer follows request streams fed whole and a byte at a time: the
// framing found must not depend on how TCP cut the stream.
func TestFramer(t *testing.T) {
	for _, tc := range []struct {
		name, stream string
		badAt        int // -1: none
		index        int // messages completed, when none is broken
	}{
		{"pipelined", "GET / HTTP/1.1\r\nHost: a\r\n\r\n" +
			"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc" +
			"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n10;x=y\r\n0123456789abcdef\r\n0\r\nT: v\r\n\r\n" +
			"OPTIONS * HTTP/1.1\r\n\r\n" +
			"GET / HTTP/1.0\r\n\r\n", -1, 4},
		{"body looks like a request", "POST / HTTP/1.1\r\nContent-Length: 52\r\n\r\n" +
			"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-E: x\r\n\r\n", -1, 1},
		{"CL and TE", "GET / HTTP/1.1\r\n\r\nPOST / HTTP/1.1\r\ncontent-length: 3\r\nTRANSFER-ENCODING: chunked\r\n\r\n", 1, 0},
		{"bad chunk size", "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3x\r\n", 0, 0},
		{"chunk size with sign", "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n+3\r\n", 0, 0},
		{"bare LF after chunk size", "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n", 0, 0},
		{"chunk overruns", "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n", 0, 0},
		{"two codings", "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 0, 0},
		{"TE on HTTP/1.0", "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 0, 0},
		{"lengths differ", "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 0, 0},
		{"negative length", "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 0, 0},
		{"folded", "POST / HTTP/1.1\r\nX: a\r\n\tb\r\n\r\n", 0, 0},
		{"long line keeps its framing", "GET /" + strings.Repeat("a", 5000) + " HTTP/1.1\r\nX-Long: " + strings.Repeat("b", 5000) +
			"\r\nContent-Length: 2\r\n\r\nxy", -1, 1},
		{"long framing field", "POST / HTTP/1.1\r\nContent-Length: " + strings.Repeat("0", 300) + "1\r\n\r\n", 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, step := range []int{len(tc.stream), 1, 7} {
				f := framer{badAt: -1}
				for s := tc.stream; len(s) > 0; {
					n := min(step, len(s))
					f.feed([]byte(s[:n]))
					s = s[n:]
				}
				if f.badAt != tc.badAt {
					t.Errorf("in pieces of %d: broken at %d (%s), want %d", step, f.badAt, f.why, tc.badAt)
				}
				if tc.badAt < 0 && f.index != tc.index {
					t.Errorf("in pieces of %d: %d messages, want %d", step, f.index, tc.index)
				}
			}
		})
	}
}
