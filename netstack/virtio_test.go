package netstack

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"
)

// TestVirtioTCPBothWays carries a bulk upload and a bulk download between a
// client whose packets carry virtio headers (as a kernel TUN device with
// offloads does) and a loopback server. Both ways, segments must cross
// whole, many packets at a time, and arrive intact.
func TestVirtioTCPBothWays(t *testing.T) {
	for _, family := range []string{"ipv4", "ipv6"} {
		t.Run(family, func(t *testing.T) {
			f := newFixture(t, func(o *Options, _ *dialHandler) { o.VirtioNetHdr = true })
			network, addr := "tcp4", "127.0.0.1:0"
			if family == "ipv6" {
				network, addr = "tcp6", "[::1]:0"
			}
			ln, err := net.Listen(network, addr)
			if err != nil {
				t.Skipf("no %s loopback: %v", family, err)
			}
			defer ln.Close()

			const size = 8 << 20
			blob := make([]byte, size)
			rand.Read(blob)
			// The server reads the upload, answers with its SHA-256, then
			// sends the blob back.
			go func() {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				defer c.Close()
				h := sha256.New()
				if _, err := io.CopyN(h, c, size); err != nil {
					return
				}
				c.Write(h.Sum(nil))
				c.Write(blob)
			}()

			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			c, err := f.client.DialContext(ctx, network, ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(30 * time.Second))
			if _, err := c.Write(blob); err != nil {
				t.Fatalf("upload: %v", err)
			}
			sum := make([]byte, sha256.Size)
			if _, err := io.ReadFull(c, sum); err != nil {
				t.Fatalf("upload's checksum: %v", err)
			}
			if want := sha256.Sum256(blob); !bytes.Equal(sum, want[:]) {
				t.Fatal("the server received a different upload")
			}
			got := make([]byte, size)
			if _, err := io.ReadFull(c, got); err != nil {
				t.Fatalf("download: %v", err)
			}
			if !bytes.Equal(got, blob) {
				t.Fatal("the download differs from what the server sent")
			}
			sent, received := f.client.GSOCounts()
			if sent == 0 || received == 0 {
				t.Fatalf("GSO segments: %d sent, %d received; want both > 0", sent, received)
			}
			t.Logf("GSO segments: %d up, %d down", sent, received)
		})
	}
}

// TestVirtioChecksums checks who vouches for a packet's checksum: the
// virtio header's flags, or else the stack itself.
func TestVirtioChecksums(t *testing.T) {
	h := &refusingHandler{err: Refuse(RefuseDrop, errors.New("no"))}
	s, err := New(Options{Handler: h, VirtioNetHdr: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	good := buildUDP4(t, netip.MustParseAddrPort("100.96.0.2:5000"), netip.MustParseAddrPort("192.0.2.1:53"), []byte("x"))
	badSum := bytes.Clone(good)
	badSum[len(badSum)-1] ^= 0xff
	badIPSum := bytes.Clone(good)
	badIPSum[10] ^= 0xff

	withHdr := func(flags, gsoType byte, pkt []byte) []byte {
		b := make([]byte, VirtioNetHdrLen, VirtioNetHdrLen+len(pkt))
		b[0], b[1] = flags, gsoType
		if flags&virtioNeedsCsum != 0 {
			binary.LittleEndian.PutUint16(b[6:], 20)
			binary.LittleEndian.PutUint16(b[8:], 6)
		}
		return append(b, pkt...)
	}
	for _, c := range []struct {
		name    string
		pkt     []byte
		reaches bool
	}{
		{"good checksum, no flags", withHdr(0, 0, good), true},
		{"bad UDP checksum, no flags", withHdr(0, 0, badSum), false},
		{"bad IP checksum, no flags", withHdr(0, 0, badIPSum), false},
		{"unfinished checksum the kernel will not finish (NEEDS_CSUM)", withHdr(virtioNeedsCsum, 0, badSum), true},
		{"checked by the sender (DATA_VALID)", withHdr(virtioDataValid, 0, badSum), true},
		{"UDP claiming TCP segmentation", withHdr(virtioNeedsCsum, virtioGSOTCPv4, good), false},
		{"UDP segmentation, which the device never asked for", withHdr(virtioNeedsCsum, 5, good), false},
		{"header only", withHdr(0, 0, nil), false},
		{"shorter than a header", []byte{0, 0, 0}, false},
	} {
		calls, malformed := h.calls.Load(), s.Stats().Malformed
		s.Write([][]byte{c.pkt}, 0)
		reached := h.calls.Load() > calls
		counted := s.Stats().Malformed > malformed
		if reached != c.reaches || counted == c.reaches {
			t.Errorf("%s: reached the handler %v, counted malformed %v; want reached %v", c.name, reached, counted, c.reaches)
		}
	}
}
