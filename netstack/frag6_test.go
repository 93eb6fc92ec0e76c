package netstack

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"
	"time"
)

// fragment6 builds an IPv6 fragment header and data: offset in bytes.
func fragment6(id uint32, offset int, more bool, data []byte) []byte {
	f := make([]byte, 8, 8+len(data))
	f[0] = protoICMPv6
	v := uint16(offset)
	if more {
		v |= 1
	}
	binary.BigEndian.PutUint16(f[2:4], v)
	binary.BigEndian.PutUint32(f[4:8], id)
	return append(f, data...)
}

func TestFrag6Reassembly(t *testing.T) {
	src, dst := netip.MustParseAddr("fd5c:1ce::2"), netip.MustParseAddr("2001:db8::1")
	now := time.Now()
	msg := make([]byte, 100)
	for i := range msg {
		msg[i] = byte(i)
	}
	var r frag6Reassembler

	// Out of order, last first.
	for _, f := range [][]byte{fragment6(1, 64, false, msg[64:]), fragment6(1, 0, true, msg[:32])} {
		if got, ok := r.add(src, dst, f, now); got != nil || !ok {
			t.Fatalf("incomplete message: got %d bytes, ok %v", len(got), ok)
		}
	}
	got, ok := r.add(src, dst, fragment6(1, 32, true, msg[32:64]), now)
	if !ok || !bytes.Equal(got, msg) {
		t.Fatalf("reassembled %x, ok %v", got, ok)
	}
	if len(r.pending) != 0 {
		t.Errorf("%d messages still pending", len(r.pending))
	}

	// Overlap drops the whole message (RFC 5722).
	r.add(src, dst, fragment6(2, 0, true, msg[:32]), now)
	if _, ok := r.add(src, dst, fragment6(2, 24, true, msg[24:56]), now); ok {
		t.Error("an overlapping fragment was accepted")
	}
	if got, _ := r.add(src, dst, fragment6(2, 56, false, msg[56:]), now); got != nil {
		t.Error("a message with overlapping fragments was reassembled")
	}

	// A non-last fragment must be a multiple of 8 bytes.
	if _, ok := r.add(src, dst, fragment6(3, 0, true, msg[:30]), now); ok {
		t.Error("a 30-byte non-last fragment was accepted")
	}

	// Pending messages are bounded and expire.
	r = frag6Reassembler{}
	for id := range uint32(frag6MaxPending + 10) {
		from := netip.AddrFrom16([16]byte{0xfd, 15: byte(id / frag6MaxPerSource)})
		r.add(from, dst, fragment6(100+id, 0, true, msg[:8]), now)
	}
	if len(r.pending) != frag6MaxPending {
		t.Errorf("%d messages pending, want the limit %d", len(r.pending), frag6MaxPending)
	}
	r.add(src, dst, fragment6(999, 0, true, msg[:8]), now.Add(frag6Timeout+time.Second))
	if len(r.pending) != 1 {
		t.Errorf("%d messages pending after the others expired, want 1", len(r.pending))
	}
}

// One client sending nothing but first fragments holds at most
// frag6MaxPerSource messages, its newest: another client's ping is still
// put together.
func TestFrag6OneSourceCannotFillTheTable(t *testing.T) {
	flooder, other := netip.MustParseAddr("fd5c:1ce::2"), netip.MustParseAddr("fd5c:1ce::3")
	dst := netip.MustParseAddr("2001:db8::1")
	now := time.Now()
	var r frag6Reassembler
	for id := range uint32(frag6MaxPending * 2) {
		r.add(flooder, dst, fragment6(id, 0, true, make([]byte, 8)), now.Add(time.Duration(id)*time.Millisecond))
	}
	if len(r.pending) != frag6MaxPerSource {
		t.Fatalf("%d messages pending from one source, want %d", len(r.pending), frag6MaxPerSource)
	}
	// The flooder's newest are the ones kept.
	if _, ok := r.pending[frag6Key{flooder, dst, frag6MaxPending*2 - 1}]; !ok {
		t.Error("the flooder's newest message was dropped instead of its oldest")
	}
	msg := bytes.Repeat([]byte("ping"), 4)
	r.add(other, dst, fragment6(7, 0, true, msg[:8]), now)
	got, ok := r.add(other, dst, fragment6(7, 8, false, msg[8:]), now)
	if !ok || !bytes.Equal(got, msg) {
		t.Errorf("another client's ping: %q, %v; want it put together", got, ok)
	}
}
