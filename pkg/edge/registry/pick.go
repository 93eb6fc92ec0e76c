package registry

import (
	"fmt"
	"time"
)

// Pick chooses a replica of hostname serving protocol ("" for any),
// skipping the IDs in exclude (replicas already tried for this request).
//
// The choice is deterministic: smooth weighted round-robin (as nginx does
// it) between the weight rules' groups that have a healthy replica, so a
// 90/10 split is exact over every 10 picks; then the least recently
// picked healthy replica of the group. Replicas that match no rule serve
// when no weighted group can; replicas resting (cooling down after a
// failure, or reporting their origin down) serve when nothing else can,
// since trying is better than refusing: those that only failed first,
// least recently failed first.
//
// ErrUnknownHost: the hostname is neither configured nor registered.
// ErrNoReplica: it is, but no replica can take the attempt.
func (r *Registry) Pick(hostname, protocol string, exclude []string) (Replica, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	// No sweep of other hostnames here: only Register adds entries, and
	// it sweeps, so the request path stays one hostname long.
	now := r.now()
	s := r.services[hostname]
	if s != nil {
		r.purge(s, now)
		s = r.services[hostname]
	}
	if s == nil {
		if _, ok := r.hosts[hostname]; ok || r.claimed(hostname, now) {
			return Replica{}, fmt.Errorf("%w for %s: none registered", ErrNoReplica, hostname)
		}
		return Replica{}, fmt.Errorf("%w: %s", ErrUnknownHost, hostname)
	}
	if protocol != "" && protocol != s.protocol {
		return Replica{}, fmt.Errorf("%w for %s: it is served as %s, not %s", ErrNoReplica, hostname, s.protocol, protocol)
	}

	clear(s.healthy)
	var spare, resting *replica // best unmatched, best resting
	for _, rp := range s.replicas {
		if rp.group >= 0 && s.rules[rp.group].Weight == 0 || excluded(rp.ID, exclude) {
			continue
		}
		switch {
		case rp.resting(now):
			if resting == nil || rp.restsBefore(resting) {
				resting = rp
			}
		case rp.group < 0:
			if spare == nil || rp.lastPick < spare.lastPick {
				spare = rp
			}
		default:
			s.healthy[rp.group]++
		}
	}

	var pick *replica
	weight, healthy := 0, true
	if g := s.nextGroup(); g >= 0 {
		for _, rp := range s.replicas {
			if rp.group == g && !rp.resting(now) && !excluded(rp.ID, exclude) &&
				(pick == nil || rp.lastPick < pick.lastPick) {
				pick = rp
			}
		}
		weight = share(s.rules[g].Weight, s.healthy[g])
	} else if spare != nil {
		pick = spare
		if len(s.rules) == 0 {
			weight = 1
		}
	} else if resting != nil {
		pick, healthy = resting, false
	} else {
		return Replica{}, fmt.Errorf("%w for %s", ErrNoReplica, hostname)
	}
	s.picks++
	pick.lastPick = s.picks
	out := pick.Replica
	out.Weight, out.Healthy = weight, healthy
	return out, nil
}

// nextGroup advances the smooth weighted round-robin over the groups with
// healthy replicas (s.healthy) and returns the chosen one, or -1. Groups
// without a healthy replica keep their current weight and their share
// goes to the others meanwhile.
func (s *service) nextGroup() int {
	total, best := 0, -1
	for g, n := range s.healthy {
		w := s.rules[g].Weight
		if n == 0 || w == 0 {
			continue
		}
		s.cur[g] += w
		total += w
		if best < 0 || s.cur[g] > s.cur[best] {
			best = g
		}
	}
	if best >= 0 {
		s.cur[best] -= total
	}
	return best
}

func excluded(id string, exclude []string) bool {
	for _, x := range exclude {
		if x == id {
			return true
		}
	}
	return false
}

// share is a group weight divided among n replicas, rounded, at least 1.
func share(w, n int) int {
	if w == 0 || n == 0 {
		return 0
	}
	return max(1, (w+n/2)/n)
}

func (rp *replica) cooling(now time.Time) bool {
	return !rp.coolTill.IsZero() && now.Before(rp.coolTill)
}

// resting reports whether rp is out of rotation: cooling down, or its
// agent cannot reach its origin.
func (rp *replica) resting(now time.Time) bool {
	return rp.OriginDown || rp.cooling(now)
}

// restsBefore orders resting replicas for a last resort: one whose agent
// reached its origin at its last word before one that did not (a failed
// attempt may have been a passing one), then the least recently failed.
func (rp *replica) restsBefore(o *replica) bool {
	if rp.OriginDown != o.OriginDown {
		return !rp.OriginDown
	}
	return rp.lastFail.Before(o.lastFail)
}

// weightOf returns rp's current Weight and Healthy, as Replica documents
// them.
func (s *service) weightOf(rp *replica, now time.Time) (weight int, healthy bool) {
	if rp.resting(now) {
		return 0, false
	}
	if len(s.rules) == 0 {
		return 1, true
	}
	if rp.group < 0 {
		return 0, true
	}
	n := 0
	for _, x := range s.replicas {
		if x.group == rp.group && !x.resting(now) {
			n++
		}
	}
	return share(s.rules[rp.group].Weight, n), true
}

// Report tells how an attempt on replica id went: nil for success. A
// failure keeps the replica out of rotation for FailureCooldown (unless
// nothing else can serve); a success ends that at once.
func (r *Registry) Report(id string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	rp := r.byID[id]
	if rp == nil {
		return
	}
	if err == nil {
		rp.coolTill = time.Time{}
		return
	}
	now := r.now()
	rp.Failures++
	rp.LastError = err.Error()
	rp.lastFail = now
	rp.coolTill = now.Add(r.cooldown)
}
