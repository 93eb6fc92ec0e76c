package memtun

import (
	"fmt"
	"os"
	"sync"
)

// stageLen is how many packets a Read or Write moves per lock acquisition.
// Copying happens outside the lock, so the staging arrays live on the stack;
// a fixed size keeps them there whatever BatchSize is.
const stageLen = 32

// queue is one direction of a link: a bounded ring of packets with a single
// writing end and a single reading end (each of which may have several
// goroutines calling it).
type queue struct {
	pools *pools

	mu       sync.Mutex
	readable sync.Cond // packets were queued, or an end closed
	writable sync.Cond // room was made, or an end closed
	ring     []*packet
	head     int // index of the oldest packet
	n        int // packets queued
	// readerClosed means nobody will read again: writes fail and queued
	// packets are released. writerClosed means nothing more will be
	// written: reads drain the ring and then fail.
	readerClosed, writerClosed bool
}

func newQueue(length int, p *pools) *queue {
	q := &queue{pools: p, ring: make([]*packet, length)}
	q.readable.L = &q.mu
	q.writable.L = &q.mu
	return q
}

// write queues a copy of each bufs[i][offset:], blocking while the ring is
// full. It returns how many of bufs were consumed.
func (q *queue) write(bufs [][]byte, offset int) (int, error) {
	for _, b := range bufs {
		if offset < 0 || offset > len(b) {
			return 0, errOffset
		}
	}
	var (
		staged [stageLen]*packet
		index  [stageLen]int // index in bufs of staged[k]
	)
	next := 0
	for next < len(bufs) {
		// Copy a run of packets before taking the lock, so the reader is
		// never held up by our copying.
		k := 0
		var stop error
		for next < len(bufs) && k < stageLen {
			data := bufs[next][offset:]
			if len(data) > MaxPacketSize {
				stop = fmt.Errorf("memtun: write: packet of %d bytes exceeds %d", len(data), MaxPacketSize)
				break
			}
			if len(data) > 0 {
				staged[k] = q.pools.get(data)
				index[k] = next
				k++
			}
			next++
		}
		if done, err := q.push(staged[:k]); err != nil {
			for _, pk := range staged[done:k] {
				q.pools.put(pk)
			}
			return index[done], err
		}
		if stop != nil {
			return next, stop
		}
	}
	return len(bufs), nil
}

// push appends pks to the ring, waiting for room. On error it returns how many
// it appended; the caller still owns the rest.
func (q *queue) push(pks []*packet) (int, error) {
	if len(pks) == 0 {
		return 0, nil
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	done := 0
	for done < len(pks) {
		for q.n == len(q.ring) && !q.readerClosed && !q.writerClosed {
			q.writable.Wait()
		}
		switch {
		case q.writerClosed:
			return done, os.ErrClosed
		case q.readerClosed:
			return done, errClosedPeer
		}
		for done < len(pks) && q.n < len(q.ring) {
			q.ring[(q.head+q.n)%len(q.ring)] = pks[done]
			q.n++
			done++
		}
		q.readable.Signal()
	}
	// Another writer may be waiting for the room we did not use.
	if q.n < len(q.ring) {
		q.writable.Signal()
	}
	return done, nil
}

// read blocks until a packet is queued or an end closes, then copies up to
// len(bufs) queued packets into bufs[i][offset:].
func (q *queue) read(bufs [][]byte, sizes []int, offset int) (int, error) {
	for _, b := range bufs {
		if offset < 0 || offset > len(b) {
			return 0, errOffset
		}
	}
	var staged [stageLen]*packet
	n := 0
	q.mu.Lock()
	for q.n == 0 && !q.readerClosed && !q.writerClosed {
		q.readable.Wait()
	}
	if q.readerClosed || q.n == 0 {
		q.mu.Unlock()
		return 0, os.ErrClosed
	}
	for {
		k := 0
		short := false // the head packet does not fit its buffer
		for n+k < len(bufs) && k < stageLen && q.n > 0 {
			pk := q.ring[q.head]
			if len(pk.b) > len(bufs[n+k])-offset {
				short = true
				break
			}
			staged[k] = q.pop()
			k++
		}
		if short && n+k == 0 {
			// Like a TUN read into a short buffer: the packet is lost and
			// the caller hears about it.
			pk := q.pop()
			q.signalAfterPop()
			q.mu.Unlock()
			size := len(pk.b)
			q.pools.put(pk)
			return 0, fmt.Errorf("memtun: read: packet of %d bytes does not fit buffer of %d", size, len(bufs[0])-offset)
		}
		q.signalAfterPop()
		q.mu.Unlock()

		for i, pk := range staged[:k] {
			sizes[n+i] = copy(bufs[n+i][offset:], pk.b)
			q.pools.put(pk)
			staged[i] = nil
		}
		n += k
		if short || n == len(bufs) {
			return n, nil
		}
		q.mu.Lock()
		if q.n == 0 || q.readerClosed {
			q.mu.Unlock()
			return n, nil
		}
	}
}

// pop removes the oldest packet; q.mu is held and q.n > 0.
func (q *queue) pop() *packet {
	pk := q.ring[q.head]
	q.ring[q.head] = nil
	q.head = (q.head + 1) % len(q.ring)
	q.n--
	return pk
}

// signalAfterPop wakes a writer for the room just made and, if packets are
// left, another reader to take them; each woken goroutine passes the baton on
// the same way. q.mu is held.
func (q *queue) signalAfterPop() {
	q.writable.Signal()
	if q.n > 0 {
		q.readable.Signal()
	}
}

// closeReader marks the reading end gone and releases queued packets, which
// nobody can read any more.
func (q *queue) closeReader() {
	q.mu.Lock()
	q.readerClosed = true
	var dropped []*packet
	for q.n > 0 {
		dropped = append(dropped, q.pop())
	}
	q.readable.Broadcast()
	q.writable.Broadcast()
	q.mu.Unlock()
	for _, pk := range dropped {
		q.pools.put(pk)
	}
}

// closeWriter marks the writing end gone; readers drain what is queued.
func (q *queue) closeWriter() {
	q.mu.Lock()
	q.writerClosed = true
	q.readable.Broadcast()
	q.writable.Broadcast()
	q.mu.Unlock()
}
