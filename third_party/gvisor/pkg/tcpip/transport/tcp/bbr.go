// Copyright 2026 The sluice Authors.
//
// Licensed under the Apache License, Version 2.0 (the "License");
// you may not use this file except in compliance with the License.
// You may obtain a copy of the License at
//
//     http://www.apache.org/licenses/LICENSE-2.0
//
// Unless required by applicable law or agreed to in writing, software
// distributed under the License is distributed on an "AS IS" BASIS,
// WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
// See the License for the specific language governing permissions and
// limitations under the License.

package tcp

import (
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/seqnum"
)

// sluice: not in upstream gVisor.
//
// bbrState is a model-based congestion control after BBR (v1): the window
// follows the path's measured bandwidth-delay product instead of backing
// off on every loss. Loss-based controls (reno, cubic) hold a window of a
// dozen packets on a link that drops 1 % of packets at random whatever its
// capacity, which is what a Wi-Fi or mobile client's path often is; a
// Linux server with BBR keeps its speed there, and a gateway that
// re-originates the client's connections must not do worse than the
// server behind it would have done end to end.
//
// gVisor does not pace, so this keeps BBR's estimates and its window but
// not its pacing gains: the window is twice the estimated BDP plus room
// for the ACKs that GRO and delayed ACKs aggregate (three send quanta),
// which bounds the queue it can build to about one BDP and lets the
// bandwidth estimate grow by up to 2x a round when the path has more to
// give.
type bbrState struct {
	s *sender

	startup     bool // growing like slow start until the bandwidth stops growing
	fullBWCount int  // rounds in startup without 25 % more bandwidth
	fullBW      float64

	// Rounds: a round ends when the data sent at its start is acked. A
	// round that began with nothing waiting to be sent measures the
	// application, not the path: its sample counts only if it raises
	// the estimate.
	roundEnd        seqnum.Value
	roundStart      tcpip.MonotonicTime
	roundUna        seqnum.Value
	roundAppLimited bool

	// Delivery rate, in packets a second: the max over the last
	// bbrBWRounds samples, one a round.
	bwSamples   [bbrBWRounds]float64
	bwIdx       int
	maxBW       float64
	minRTT      time.Duration
	minRTTStamp tcpip.MonotonicTime

	// ProbeRTT: when minRTT has not been seen again for bbrMinRTTWindow,
	// the window drops to bbrMinCwnd; once the data in flight has drained
	// to that, it stays there for bbrProbeRTTTime (at least a round), and
	// the lowest RTT seen then becomes the minimum.
	probing      bool
	probeDrained tcpip.MonotonicTime // when the probe ends; zero until drained
	probeMinRTT  time.Duration

	target     int // the window outside ProbeRTT, recovery and timeouts
	priorCwnd  int // the window when recovery began, given back after it
	inRecovery bool
}

const (
	bbrBWRounds     = 10
	bbrMinRTTWindow = 10 * time.Second
	bbrProbeRTTTime = 200 * time.Millisecond
	bbrMinCwnd      = 4
	bbrCwndGain     = 2.0
	// In startup the window grows, as in slow start, up to this many
	// times the estimated BDP (BBR's high gain, 2/ln 2): beyond it, the
	// window only fills the bottleneck's queue.
	bbrHighGain = 2.89
	// The window also holds three send quanta for ACKs that arrive
	// together (GRO, delayed ACKs), as Linux's BBR adds three TSO
	// segments: a quantum is a millisecond of data at the estimated
	// bandwidth, between 2 packets and a 64 KiB GSO segment (45 at a
	// 1420-byte MTU). A fixed allowance would be a second of queue on a
	// 1 Mbit/s link.
	bbrQuantumTime    = time.Millisecond
	bbrMinQuantum     = 2
	bbrMaxQuantum     = 45
	bbrQuantaInWindow = 3
)

func newBBRCC(s *sender) *bbrState {
	now := s.ep.stack.Clock().NowMonotonic()
	return &bbrState{
		s:           s,
		startup:     true,
		roundEnd:    s.SndNxt,
		roundStart:  now,
		roundUna:    s.SndUna,
		minRTTStamp: now,
		target:      InitialCwnd,
	}
}

// rttSample is the most precise RTT the sender has: RACK's, measured from
// nanosecond send times; the smoothed RTT comes from millisecond
// timestamps when both ends send them.
//
// +checklocks:b.s.ep.mu
func (b *bbrState) rttSample(rtt time.Duration) time.Duration {
	if r := b.s.rc.RTT; r > 0 {
		return r
	}
	return rtt
}

// Update implements congestionControl.Update.
//
// +checklocks:b.s.ep.mu
func (b *bbrState) Update(packetsAcked int, rtt time.Duration) {
	s := b.s
	now := s.ep.stack.Clock().NowMonotonic()
	// After a timeout the sender counts nothing in flight, so an ACK of
	// the old window reads as a large number of packets: no more than a
	// window's worth can have been acked.
	packetsAcked = min(max(packetsAcked, 0), max(s.SndCwnd, bbrMinCwnd))

	if r := b.rttSample(rtt); r > 0 {
		if b.minRTT == 0 || r < b.minRTT {
			b.minRTT, b.minRTTStamp = r, now
		}
		if b.probing && (b.probeMinRTT == 0 || r < b.probeMinRTT) {
			b.probeMinRTT = r
		}
	}
	if b.probing {
		if b.probeDrained == (tcpip.MonotonicTime{}) && s.Outstanding <= bbrMinCwnd {
			b.probeDrained = now.Add(max(bbrProbeRTTTime, b.minRTT))
			b.probeMinRTT = 0
		} else if b.probeDrained != (tcpip.MonotonicTime{}) && now.After(b.probeDrained) {
			b.probing = false
			if b.probeMinRTT > 0 {
				b.minRTT = b.probeMinRTT
			}
			b.minRTTStamp = now
		}
	}

	if !b.roundEnd.LessThan(s.SndUna) && s.SndUna != s.SndNxt {
		// The round goes on.
		b.grow(packetsAcked)
		return
	}
	b.endRound(now)
	b.grow(packetsAcked)
}

// endRound takes the round's bandwidth sample and starts the next round.
//
// +checklocks:b.s.ep.mu
func (b *bbrState) endRound(now tcpip.MonotonicTime) {
	s := b.s
	// A round shorter than the minimum RTT (its first byte was sent
	// before it began) counts as one minimum RTT, which keeps ACKs that
	// arrive together from reading as a burst of bandwidth.
	elapsed := max(now.Sub(b.roundStart), b.minRTT)
	if mss := s.MaxPayloadSize; elapsed > 0 && mss > 0 {
		sample := float64(b.roundUna.Size(s.SndUna)) / float64(mss) / elapsed.Seconds()
		if !b.roundAppLimited || sample > b.maxBW {
			b.bwSamples[b.bwIdx] = sample
			b.bwIdx = (b.bwIdx + 1) % bbrBWRounds
			b.maxBW = 0
			for _, bw := range b.bwSamples {
				b.maxBW = max(b.maxBW, bw)
			}
		}
	}
	if b.startup && !b.roundAppLimited {
		if b.maxBW >= b.fullBW*1.25 {
			b.fullBW, b.fullBWCount = b.maxBW, 0
		} else if b.fullBWCount++; b.fullBWCount >= 3 {
			b.startup = false
		}
	}
	b.roundEnd, b.roundStart, b.roundUna = s.SndNxt, now, s.SndUna
	b.roundAppLimited = s.writeNext == nil
	b.target = b.window(bbrCwndGain)

	if !b.startup && !b.probing && now.Sub(b.minRTTStamp) > bbrMinRTTWindow {
		b.probing = true
		b.probeDrained = tcpip.MonotonicTime{}
	}
}

// window is gain times the estimated BDP, and room for aggregated ACKs.
func (b *bbrState) window(gain float64) int {
	bdp := b.maxBW * b.minRTT.Seconds()
	quantum := min(max(b.maxBW*bbrQuantumTime.Seconds(), bbrMinQuantum), bbrMaxQuantum)
	return max(bbrMinCwnd, int(gain*bdp+bbrQuantaInWindow*quantum))
}

// grow moves the window toward the target by the packets acked, as slow
// start does, so that a window cut by a timeout comes back within a
// round; in startup it grows while below bbrHighGain times the BDP.
//
// +checklocks:b.s.ep.mu
func (b *bbrState) grow(packetsAcked int) {
	s := b.s
	switch {
	case b.probing:
		s.SndCwnd = bbrMinCwnd
		return
	case b.inRecovery:
		return // enterRecovery and leaveRecovery set it; PostRecovery gives it back
	case b.startup:
		if b.maxBW == 0 || s.SndCwnd < b.window(bbrHighGain) {
			s.SndCwnd += packetsAcked
		}
		return
	}
	s.SndCwnd = min(b.target, s.SndCwnd+packetsAcked)
	// Recovery sets the window from ssthresh: keep it at the model's.
	s.Ssthresh = max(b.target, 2)
}

// HandleLossDetected implements congestionControl.HandleLossDetected. Loss
// is not a signal of congestion to the model: recovery keeps the window
// (enterRecovery adds three packets to ssthresh), and PostRecovery gives
// back what leaveRecovery takes.
//
// +checklocks:b.s.ep.mu
func (b *bbrState) HandleLossDetected() {
	b.priorCwnd = b.s.SndCwnd
	b.inRecovery = true
	b.s.Ssthresh = max(b.s.SndCwnd-3, 2)
}

// HandleRTOExpired implements congestionControl.HandleRTOExpired: after a
// timeout the window restarts from one packet and grows back to the
// model's by the packets acked.
//
// +checklocks:b.s.ep.mu
func (b *bbrState) HandleRTOExpired() {
	b.inRecovery = false
	b.s.Ssthresh = max(b.target, 2)
	b.s.SndCwnd = 1
}

// PostRecovery implements congestionControl.PostRecovery.
//
// +checklocks:b.s.ep.mu
func (b *bbrState) PostRecovery() {
	b.inRecovery = false
	b.s.SndCwnd = max(b.s.SndCwnd, b.priorCwnd)
}
