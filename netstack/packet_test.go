package netstack

import (
	"encoding/binary"
	"encoding/hex"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// buildUDP4 builds an IPv4 UDP packet with valid checksums.
func buildUDP4(t testing.TB, src, dst netip.AddrPort, payload []byte) []byte {
	t.Helper()
	b := make([]byte, 28+len(payload))
	ip := header.IPv4(b)
	ip.Encode(&header.IPv4Fields{
		TotalLength: uint16(len(b)), TTL: 64, Protocol: 17,
		SrcAddr: tcpip.AddrFrom4(src.Addr().As4()), DstAddr: tcpip.AddrFrom4(dst.Addr().As4()),
	})
	ip.SetChecksum(^ip.CalculateChecksum())
	u := header.UDP(b[20:])
	u.Encode(&header.UDPFields{SrcPort: src.Port(), DstPort: dst.Port(), Length: uint16(8 + len(payload))})
	copy(b[28:], payload)
	xsum := header.PseudoHeaderChecksum(17, ip.SourceAddress(), ip.DestinationAddress(), uint16(8+len(payload)))
	u.SetChecksum(^checksum.Checksum(b[20:], xsum))
	return b
}

// buildSYN builds a TCP SYN from a client to a documentation address.
func buildSYN(t testing.TB, family int) []byte {
	t.Helper()
	var b []byte
	var src, dst tcpip.Address
	var th header.TCP
	if family == 4 {
		b = make([]byte, 40)
		src, dst = tcpip.AddrFrom4([4]byte{100, 96, 0, 2}), tcpip.AddrFrom4([4]byte{192, 0, 2, 1})
		ip := header.IPv4(b)
		ip.Encode(&header.IPv4Fields{TotalLength: 40, TTL: 64, Protocol: 6, SrcAddr: src, DstAddr: dst})
		ip.SetChecksum(^ip.CalculateChecksum())
		th = header.TCP(b[20:])
	} else {
		b = make([]byte, 60)
		src = tcpip.AddrFrom16(netip.MustParseAddr("fd5c:1ce::2").As16())
		dst = tcpip.AddrFrom16(netip.MustParseAddr("2001:db8::1").As16())
		header.IPv6(b).Encode(&header.IPv6Fields{PayloadLength: 20, TransportProtocol: 6, HopLimit: 64, SrcAddr: src, DstAddr: dst})
		th = header.TCP(b[40:])
	}
	th.Encode(&header.TCPFields{SrcPort: 40000, DstPort: 443, SeqNum: 12345, DataOffset: 20, Flags: header.TCPFlagSyn, WindowSize: 65535})
	th.SetChecksum(^th.CalculateChecksum(header.PseudoHeaderChecksum(6, src, dst, 20)))
	return b
}

func TestInspect(t *testing.T) {
	good := buildUDP4(t, netip.MustParseAddrPort("1.2.3.4:1"), netip.MustParseAddrPort("5.6.7.8:2"), []byte("hi"))
	pi, ok := inspect(good)
	if !ok || pi.version != 4 || pi.proto != 17 || pi.src.String() != "1.2.3.4" || pi.dst.String() != "5.6.7.8" || pi.fragment {
		t.Fatalf("inspect: %+v %v", pi, ok)
	}
	padded := append(good[:len(good):len(good)], 0, 0, 0)
	if pi, ok := inspect(padded); !ok || ipLen(padded, pi) != len(good) {
		t.Fatal("padding after the IP length must be accepted and trimmed")
	}
	frag := append([]byte(nil), good...)
	binary.BigEndian.PutUint16(frag[6:8], 0x2000) // MF
	if pi, ok := inspect(frag); !ok || !pi.fragment {
		t.Fatal("MF not seen")
	}
	for _, b := range [][]byte{nil, {0x45}, good[:19], good[:len(good)-1], {0x40, 0, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}} {
		if _, ok := inspect(b); ok {
			t.Errorf("inspect accepted %x", b)
		}
	}
}

// seedPackets loads the packets in testdata/packets, one hex-encoded packet
// per file.
func seedPackets(t testing.TB) map[string][]byte {
	t.Helper()
	files, err := filepath.Glob("../testdata/packets/*.hex")
	if err != nil || len(files) == 0 {
		t.Fatalf("no seed packets in ../testdata/packets: %v", err)
	}
	seeds := make(map[string][]byte)
	for _, name := range files {
		text, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		b, err := hex.DecodeString(strings.TrimSpace(string(text)))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		seeds[filepath.Base(name)] = b
	}
	return seeds
}

// TestSeedPacketsParse keeps the seeds honest: each is a packet inspect
// accepts, so the fuzzer starts from inputs that reach the protocols.
func TestSeedPacketsParse(t *testing.T) {
	for name, b := range seedPackets(t) {
		if _, ok := inspect(b); !ok {
			t.Errorf("%s: not a well-formed IP packet", name)
		}
	}
}

// FuzzStackWrite feeds arbitrary packets to a stack whose handler refuses
// everything: nothing may panic, and whatever the stack sends back must be
// a well-formed IP packet.
func FuzzStackWrite(f *testing.F) {
	for _, seed := range seedPackets(f) {
		f.Add(seed, false)
		// The same packet behind a virtio header claiming TCP GSO with
		// an unfinished checksum, as a TUN device with offloads sends.
		f.Add(append([]byte{virtioNeedsCsum, virtioGSOTCPv4, 40, 0, 100, 0, 20, 0, 16, 0}, seed...), true)
	}
	f.Fuzz(func(t *testing.T, b []byte, virtio bool) {
		s, err := New(Options{Handler: &refusingHandler{err: Refuse(RefuseProhibited, nil)}, QueueLen: 64, VirtioNetHdr: virtio})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		s.Write([][]byte{b}, 0)
		for {
			select {
			case pkt := <-s.link.out:
				out := make([]byte, pkt.Size())
				copyPacket(out, pkt)
				pkt.DecRef()
				if _, ok := inspect(out); !ok {
					t.Fatalf("stack sent a malformed packet %x", out)
				}
			default:
				return
			}
		}
	})
}

// TestICMPv6EchoInterception checks that IPv6 echo requests reach the
// handler whatever extension headers precede them, that fragments of them
// never reach gVisor (which would reassemble and answer them itself), and
// that the stack sends nothing back on its own. The seed fragment is a
// first fragment whose length is not a multiple of 8, which reassembly
// drops as malformed (RFC 8200 4.5); TestEchoNeedingFragments has the
// fragments that make a whole request.
func TestICMPv6EchoInterception(t *testing.T) {
	h := &refusingHandler{err: Refuse(RefuseDrop, nil)}
	s, err := New(Options{Handler: h})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	seeds := seedPackets(t)
	s.Write([][]byte{seeds["icmp6-echo.hex"], seeds["icmp6-echo-hopbyhop.hex"], seeds["icmp6-echo-fragment.hex"]}, 0)
	if got := h.calls.Load(); got != 2 {
		t.Errorf("handler saw %d echo requests, want 2", got)
	}
	if st := s.Stats(); st.Malformed != 1 || st.Unsupported != 0 {
		t.Errorf("malformed: %d, unsupported %d; want 1 (the fragment) and 0", st.Malformed, st.Unsupported)
	}
	select {
	case pkt := <-s.link.out:
		pkt.DecRef()
		t.Fatal("the stack answered an echo request itself")
	case <-time.After(100 * time.Millisecond):
	}
}
