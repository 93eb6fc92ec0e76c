package edge

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"testing"
)

// parseProxyV2 reads a PROXY protocol v2 header of a TCP connection, as
// an origin behind the edge would, independently of appendProxyV2.
func parseProxyV2(r io.Reader) (src, dst netip.AddrPort, err error) {
	var hdr [16]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return src, dst, err
	}
	if !bytes.Equal(hdr[:12], []byte("\r\n\r\n\x00\r\nQUIT\n")) {
		return src, dst, errors.New("no PROXY v2 signature")
	}
	if hdr[12]>>4 != 2 || hdr[12]&0xf != 1 {
		return src, dst, fmt.Errorf("version/command %#x, want version 2 PROXY", hdr[12])
	}
	body := make([]byte, binary.BigEndian.Uint16(hdr[14:]))
	if _, err := io.ReadFull(r, body); err != nil {
		return src, dst, err
	}
	switch hdr[13] {
	case 0x11:
		if len(body) < 12 {
			return src, dst, errors.New("short TCP4 addresses")
		}
		s, d := netip.AddrFrom4([4]byte(body[0:4])), netip.AddrFrom4([4]byte(body[4:8]))
		return netip.AddrPortFrom(s, binary.BigEndian.Uint16(body[8:])), netip.AddrPortFrom(d, binary.BigEndian.Uint16(body[10:])), nil
	case 0x21:
		if len(body) < 36 {
			return src, dst, errors.New("short TCP6 addresses")
		}
		s, d := netip.AddrFrom16([16]byte(body[0:16])), netip.AddrFrom16([16]byte(body[16:32]))
		return netip.AddrPortFrom(s, binary.BigEndian.Uint16(body[32:])), netip.AddrPortFrom(d, binary.BigEndian.Uint16(body[34:])), nil
	}
	return src, dst, fmt.Errorf("family/protocol %#x", hdr[13])
}

func TestProxyV2Golden(t *testing.T) {
	cases := []struct {
		src, dst string
		golden   string
	}{
		{
			"192.0.2.10:51234", "198.51.100.1:443",
			"0d0a0d0a000d0a515549540a" + "21" + "11" + "000c" +
				"c000020a" + "c6336401" + "c822" + "01bb",
		},
		{
			"[2001:db8::1]:40000", "[2001:db8::2]:8443",
			"0d0a0d0a000d0a515549540a" + "21" + "21" + "0024" +
				"20010db8000000000000000000000001" + "20010db8000000000000000000000002" + "9c40" + "20fb",
		},
		{
			// Mixed families go as IPv6, the IPv4 address mapped.
			"192.0.2.10:1", "[2001:db8::2]:2",
			"0d0a0d0a000d0a515549540a" + "21" + "21" + "0024" +
				"00000000000000000000ffffc000020a" + "20010db8000000000000000000000002" + "0001" + "0002",
		},
		{
			// An IPv4 client seen through a dual-stack socket is IPv4.
			"[::ffff:192.0.2.10]:51234", "[::ffff:198.51.100.1]:443",
			"0d0a0d0a000d0a515549540a" + "21" + "11" + "000c" +
				"c000020a" + "c6336401" + "c822" + "01bb",
		},
	}
	for _, c := range cases {
		src, dst := netip.MustParseAddrPort(c.src), netip.MustParseAddrPort(c.dst)
		got := hex.EncodeToString(appendProxyV2(nil, src, dst))
		if got != c.golden {
			t.Errorf("%s -> %s:\n got %s\nwant %s", c.src, c.dst, got, c.golden)
			continue
		}
		// And back, followed by the stream's first bytes.
		r := bufio.NewReader(io.MultiReader(bytes.NewReader(appendProxyV2([]byte{}, src, dst)), bytes.NewReader([]byte("hello"))))
		ps, pd, err := parseProxyV2(r)
		if err != nil {
			t.Fatalf("%s -> %s: parse: %v", c.src, c.dst, err)
		}
		if ps.Addr().Unmap() != src.Addr().Unmap() || ps.Port() != src.Port() || pd.Addr().Unmap() != dst.Addr().Unmap() || pd.Port() != dst.Port() {
			t.Errorf("parsed %s -> %s, want %s -> %s", ps, pd, src, dst)
		}
		rest, _ := io.ReadAll(r)
		if string(rest) != "hello" {
			t.Errorf("after the header: %q, want the stream", rest)
		}
	}
}

func TestProxyV2LocalGolden(t *testing.T) {
	const golden = "0d0a0d0a000d0a515549540a" + "20" + "00" + "0000"
	if got := hex.EncodeToString(appendProxyV2Local(nil)); got != golden {
		t.Errorf("LOCAL header:\n got %s\nwant %s", got, golden)
	}
	// Without both addresses an origin still gets a header, a LOCAL
	// one, so nothing the client writes can pass for one.
	valid := netip.MustParseAddrPort("192.0.2.10:51234")
	for _, c := range []struct{ src, dst netip.AddrPort }{
		{netip.AddrPort{}, valid},
		{valid, netip.AddrPort{}},
		{netip.AddrPort{}, netip.AddrPort{}},
	} {
		if got := hex.EncodeToString(proxyHeader(c.src, c.dst)); got != golden {
			t.Errorf("proxyHeader(%s, %s) = %s, want the LOCAL header %s", c.src, c.dst, got, golden)
		}
	}
	if got, want := proxyHeader(valid, valid), appendProxyV2(nil, valid, valid); !bytes.Equal(got, want) {
		t.Errorf("proxyHeader with both addresses = %x, want the PROXY header %x", got, want)
	}
}
