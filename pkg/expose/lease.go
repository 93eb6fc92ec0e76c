package expose

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"go.uber.org/zap"
)

// How often the registration is repeated, and how failures back off.
const (
	// defaultRefresh is used when a lease names neither a refresh
	// interval nor a TTL.
	defaultRefresh = 2 * time.Second
	// minRefresh and maxRefresh bound the interval a lease asks for:
	// a gateway's mistake must neither make the agent spin nor let
	// its lease lapse for long.
	minRefresh = 100 * time.Millisecond
	maxRefresh = 60 * time.Second
	// firstBackoff and maxBackoff bound the wait after a failure; it
	// doubles from one to the other. The cap is below the gateway's
	// default lease, so that an agent whose gateway comes back is in
	// rotation again within seconds.
	firstBackoff = 250 * time.Millisecond
	maxBackoff   = 5 * time.Second
	// minRequestTimeout bounds how short a lease may make a request's
	// timeout (see requestTimeoutFor).
	minRequestTimeout = time.Second
	// originProbeInterval is how often an origin that is down is tried.
	originProbeInterval = time.Second
)

// keepRegistered registers reg and refreshes it as each lease asks,
// retrying failures with backoff, until ctx is done; it returns nil then.
// A refusal of the first registration ends it with an error.
func (a *Agent) keepRegistered(ctx context.Context, reg Registration) error {
	var (
		backoff  time.Duration
		ever     bool   // registered at least once
		failing  bool   // the last attempt failed
		lastKind string // of the last failure logged
	)
	timer := time.NewTimer(0)
	defer timer.Stop()
	timeout := requestTimeout
	var last time.Time // of the last attempt
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-timer.C:
		case <-a.originChanged:
			// Tell the gateway now rather than at the next refresh,
			// though no more often than minRefresh if the origin
			// flaps. While failing, the next retry carries the news.
			if !failing && ever {
				timer.Reset(max(0, time.Until(last.Add(minRefresh))))
			}
			continue
		}
		a.attempted.Store(true)
		reg.OriginDown = a.originDown.Load()
		last = time.Now()
		lease, err := a.control.register(ctx, reg, timeout)
		if ctx.Err() != nil {
			return nil
		}
		var wait time.Duration
		if err == nil {
			a.noteLease(lease)
			fields := []zap.Field{zap.String("lease", lease.ID), zap.Uint16("port", reg.Port),
				zap.String("protocol", reg.Protocol), zap.Int("weight", lease.Weight)}
			switch {
			case !ever:
				a.log.Info("registered", fields...)
			case failing:
				a.log.Info("registered again", fields...)
			}
			ever, failing, backoff = true, false, 0
			wait = refreshInterval(lease)
			timeout = requestTimeoutFor(wait)
		} else {
			a.noteFailure(err)
			var ce *ControlError
			if errors.As(err, &ce) && !ever {
				// The gateway answered, and took nothing: there is
				// nothing to withdraw yet.
				a.attempted.Store(false)
			}
			refusal := ce != nil && ce.Refusal()
			if refusal && !ever {
				return fmt.Errorf("expose: register %s: %w", reg.Hostname, err)
			}
			kind := "unreachable"
			if ce != nil {
				kind = fmt.Sprint(ce.StatusCode)
			}
			if !failing || kind != lastKind {
				switch {
				case refusal:
					a.log.Error("the gateway refuses the registration; retrying", zap.Error(err))
				case ever:
					a.log.Warn("registration lost; retrying", zap.Error(err))
				default:
					a.log.Warn("cannot register yet; retrying", zap.Error(err))
				}
			} else {
				a.log.Debug("registration failed", zap.Error(err))
			}
			failing, lastKind = true, kind
			backoff = min(max(2*backoff, a.backoffMin), a.backoffMax)
			// Jitter spreads the agents of a restarted gateway.
			wait = backoff/2 + rand.N(backoff/2+1)
		}
		timer.Reset(wait)
	}
}

// requestTimeoutFor is the timeout of requests refreshing a lease that
// asks for a refresh every refresh. A request that hangs for the full
// requestTimeout would let a short lease lapse before it is retried;
// one bounded by the refresh interval leaves time for a retry (a lease
// lasts three refreshes).
func requestTimeoutFor(refresh time.Duration) time.Duration {
	return min(max(refresh, minRequestTimeout), requestTimeout)
}

// noteLease records a successful registration.
func (a *Agent) noteLease(l Lease) {
	a.registrations.Add(1)
	a.mu.Lock()
	a.lease, a.leaseAt, a.lastOK = l, time.Now(), true
	a.mu.Unlock()
	a.regOnce.Do(func() { close(a.registered) })
}

// noteFailure records a failed registration.
func (a *Agent) noteFailure(err error) {
	a.registrationErrors.Add(1)
	a.mu.Lock()
	a.lastOK, a.lastErr = false, err.Error()
	a.mu.Unlock()
}

// refreshInterval is how long to wait before refreshing l.
func refreshInterval(l Lease) time.Duration {
	d := seconds(l.RefreshSeconds)
	if d <= 0 {
		d = seconds(l.TTLSeconds) / 3
	}
	if d <= 0 {
		d = defaultRefresh
	}
	return min(max(d, minRefresh), maxRefresh)
}

// seconds converts a lease's seconds to a duration, saturating rather
// than overflowing.
func seconds(s float64) time.Duration {
	const limit = float64(24 * time.Hour / time.Second)
	if s != s || s <= 0 {
		return 0
	}
	if s > limit {
		s = limit
	}
	return time.Duration(s * float64(time.Second))
}
