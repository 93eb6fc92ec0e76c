package wireguard

import (
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestAddrBindBuffers: the socket buffers are 7 MiB when we may exceed the
// sysctl maximum (root), and at that maximum otherwise.
func TestAddrBindBuffers(t *testing.T) {
	b := NewAddrBind(netip.MustParseAddr("127.0.0.1"))
	openBind(t, b)
	want := socketBufferSize
	if os.Getuid() != 0 {
		for _, name := range []string{"rmem_max", "wmem_max"} {
			raw, err := os.ReadFile("/proc/sys/net/core/" + name)
			if err != nil {
				t.Skipf("not root, and cannot read the sysctl maximum: %v", err)
			}
			v, err := strconv.Atoi(strings.TrimSpace(string(raw)))
			if err != nil {
				t.Fatal(err)
			}
			want = min(want, v)
		}
	}
	rc, err := b.pc.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	rc.Control(func(fd uintptr) {
		for _, opt := range []struct {
			name string
			opt  int
		}{{"SO_RCVBUF", unix.SO_RCVBUF}, {"SO_SNDBUF", unix.SO_SNDBUF}} {
			// The kernel reports twice what it was asked for: the
			// other half is its bookkeeping.
			got, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, opt.opt)
			if err != nil {
				t.Fatal(err)
			}
			if got < want {
				t.Errorf("%s is %d bytes, want at least %d", opt.name, got, want)
			}
		}
	})
}
