package netstack

import (
	"encoding/binary"
	"net/netip"
	"sync"
	"time"
)

// IPv6 echo requests that arrive in fragments are reassembled here, not
// by gVisor: gVisor answers every echo request it reassembles itself, and
// the gateway must never answer on a destination's behalf. Only ICMPv6 is
// reassembled this way; other fragments go to gVisor as before.

// Limits of the ICMPv6 reassembly: the stack holds at most
// frag6MaxPending messages, each at most 64 KiB, and each for at most
// frag6Timeout (RFC 8200 allows 60 s; a ping does not wait so long). One
// client address holds at most frag6MaxPerSource of them: its next one
// takes the place of its oldest, so that one client sending first
// fragments cannot keep the others' pings from being put together.
const (
	frag6MaxPending   = 64
	frag6MaxPerSource = 8
	frag6Timeout      = 10 * time.Second
)

type frag6Key struct {
	src, dst netip.Addr
	id       uint32
}

// frag6Message is one message being put together: its bytes after the
// fragment header, and which 8-byte blocks of them have arrived.
type frag6Message struct {
	started time.Time
	data    []byte
	blocks  []bool // per 8 bytes of data
	got     int    // bytes received
	total   int    // the message's length once its last fragment came; -1 before
}

// frag6Reassembler's zero value is ready for use.
type frag6Reassembler struct {
	mu      sync.Mutex
	pending map[frag6Key]*frag6Message
}

// add takes one fragment: frag is the fragment header and what follows.
// It returns the whole message once every fragment has come, and ok false
// for a fragment that is malformed or overlaps another (RFC 5722: the
// whole message is then dropped).
func (r *frag6Reassembler) add(src, dst netip.Addr, frag []byte, now time.Time) (msg []byte, ok bool) {
	if len(frag) < 8 {
		return nil, false
	}
	offset := int(binary.BigEndian.Uint16(frag[2:4]) &^ 7)
	more := frag[3]&1 == 1
	key := frag6Key{src, dst, binary.BigEndian.Uint32(frag[4:8])}
	part := frag[8:]
	end := offset + len(part)
	if end > 0xffff || (more && len(part)%8 != 0) || len(part) == 0 {
		r.drop(key)
		return nil, false
	}

	r.mu.Lock()
	defer r.mu.Unlock()
	if r.pending == nil {
		r.pending = make(map[frag6Key]*frag6Message)
	}
	m := r.pending[key]
	if m == nil {
		r.expireLocked(now)
		r.limitSourceLocked(src)
		if len(r.pending) >= frag6MaxPending {
			return nil, true // no room: this fragment is lost, as on a busy host
		}
		m = &frag6Message{started: now, total: -1}
		r.pending[key] = m
	}
	if !more {
		if m.total >= 0 && m.total != end || end < len(m.data) {
			delete(r.pending, key)
			return nil, false
		}
		m.total = end
	} else if m.total >= 0 && end > m.total {
		delete(r.pending, key)
		return nil, false
	}
	if end > len(m.data) {
		m.data = append(m.data, make([]byte, end-len(m.data))...)
		m.blocks = append(m.blocks, make([]bool, (end+7)/8-len(m.blocks))...)
	}
	for b := offset / 8; b < (end+7)/8; b++ {
		if m.blocks[b] {
			delete(r.pending, key)
			return nil, false
		}
		m.blocks[b] = true
	}
	copy(m.data[offset:], part)
	m.got += len(part)
	if m.total < 0 || m.got < m.total {
		return nil, true
	}
	delete(r.pending, key)
	return m.data[:m.total], true
}

func (r *frag6Reassembler) drop(key frag6Key) {
	r.mu.Lock()
	delete(r.pending, key)
	r.mu.Unlock()
}

// expireLocked forgets messages whose fragments stopped coming.
func (r *frag6Reassembler) expireLocked(now time.Time) {
	for k, m := range r.pending {
		if now.Sub(m.started) > frag6Timeout {
			delete(r.pending, k)
		}
	}
}

// limitSourceLocked makes room for one more message from src: while src
// holds frag6MaxPerSource, its oldest is dropped.
func (r *frag6Reassembler) limitSourceLocked(src netip.Addr) {
	for {
		n := 0
		var oldest frag6Key
		var oldestAt time.Time
		for k, m := range r.pending {
			if k.src != src {
				continue
			}
			if n++; n == 1 || m.started.Before(oldestAt) {
				oldest, oldestAt = k, m.started
			}
		}
		if n < frag6MaxPerSource {
			return
		}
		delete(r.pending, oldest)
	}
}
