package edge

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// durationBuckets are the upper bounds of the request duration histogram,
// in seconds. Durations run from the request's arrival until the handler
// is done, body streaming included, so the long buckets are for
// downloads, SSE streams and WebSocket sessions.
var durationBuckets = [...]float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 120, 600}

// hostStats are the counters of one hostname. They are only kept for
// hostnames the edge has a reason to know (registered, configured, or a
// TCP route's), so their number is bounded by configuration rather than
// by what clients put in Host headers.
type hostStats struct {
	codes          [5]atomic.Uint64 // responses by status class, 1xx..5xx
	refused        [numReasons]atomic.Uint64
	attemptsFailed atomic.Uint64
	buckets        [len(durationBuckets) + 1]atomic.Uint64 // the last is +Inf
	sumNanos       atomic.Uint64
}

// observe counts a finished HTTP request.
func (s *hostStats) observe(code int, d time.Duration) {
	if c := code / 100; c >= 1 && c <= 5 {
		s.codes[c-1].Add(1)
	}
	secs := d.Seconds()
	i := 0
	for i < len(durationBuckets) && secs > durationBuckets[i] {
		i++
	}
	s.buckets[i].Add(1)
	s.sumNanos.Add(uint64(max(d, 0)))
}

// listenerStats are the counters of one listener.
type listenerStats struct {
	name    string // "http", "https", "tcp:ADDR"
	conns   atomic.Uint64
	active  atomic.Int64
	refused atomic.Uint64 // over MaxConns
	unknown atomic.Uint64 // requests or connections for no known hostname
}

// stats holds the per-hostname counters.
type stats struct {
	mu    sync.RWMutex
	hosts map[string]*hostStats
}

func (s *stats) host(name string) *hostStats {
	s.mu.RLock()
	h := s.hosts[name]
	s.mu.RUnlock()
	if h != nil {
		return h
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if h = s.hosts[name]; h == nil {
		if s.hosts == nil {
			s.hosts = make(map[string]*hostStats)
		}
		h = new(hostStats)
		s.hosts[name] = h
	}
	return h
}

// pruneStats forgets the counters of hostnames the edge no longer has a
// reason to know. It runs with every scrape and every upstream sweep, so
// that hostnames that come and go do not pile up between scrapes, or
// without any.
func (e *Edge) pruneStats() {
	e.stats.mu.RLock()
	var gone []string
	for host := range e.stats.hosts {
		if !e.keepsStats(host) {
			gone = append(gone, host)
		}
	}
	e.stats.mu.RUnlock()
	if len(gone) == 0 {
		return
	}
	e.stats.mu.Lock()
	for _, host := range gone {
		if !e.keepsStats(host) {
			delete(e.stats.hosts, host)
		}
	}
	e.stats.mu.Unlock()
}

// collector reads the edge's counters when Prometheus scrapes.
type collector struct {
	e *Edge

	requests, duration, refused, unknown, attemptsFailed,
	conns, active, connsRefused, replicas *prometheus.Desc
}

// Collector returns a Prometheus collector of the edge's metrics:
//
//	sluice_edge_requests_total{hostname,code}          HTTP responses by class ("1xx" are protocol switches)
//	sluice_edge_request_duration_seconds{hostname}     arrival to end of handling, streaming included
//	sluice_edge_refused_total{hostname,reason}         ip, rate, path, auth, no_replica, misdirected
//	sluice_edge_unknown_host_total{listener}           requests/connections for no known hostname
//	sluice_edge_attempts_failed_total{hostname}        attempts on a replica that failed
//	sluice_edge_connections_total{listener}            client connections accepted
//	sluice_edge_connections_active{listener}
//	sluice_edge_connections_refused_total{listener}    closed at once, over MaxConns
//	sluice_edge_replicas{hostname,health}              from the registry
//
// A hostname's counters start over if it leaves the registry and the
// configuration and comes back.
func (e *Edge) Collector() prometheus.Collector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("sluice_edge_"+name, help, labels, nil)
	}
	return &collector{
		e:              e,
		requests:       d("requests_total", "HTTP responses by hostname and status class.", "hostname", "code"),
		duration:       d("request_duration_seconds", "Time from an HTTP request's arrival until its handling ended, body streaming included.", "hostname"),
		refused:        d("refused_total", "Requests and connections refused before reaching an origin, by reason.", "hostname", "reason"),
		unknown:        d("unknown_host_total", "Requests and connections for a hostname that nothing serves.", "listener"),
		attemptsFailed: d("attempts_failed_total", "Attempts on a replica that failed (dial errors, connections lost before a response).", "hostname"),
		conns:          d("connections_total", "Client connections accepted.", "listener"),
		active:         d("connections_active", "Client connections open.", "listener"),
		connsRefused:   d("connections_refused_total", "Client connections closed at once because MaxConns were open.", "listener"),
		replicas:       d("replicas", "Registered replicas by hostname and health.", "hostname", "health"),
	}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.requests, c.duration, c.refused, c.unknown, c.attemptsFailed, c.conns, c.active, c.connsRefused, c.replicas} {
		ch <- d
	}
}

var codeClasses = [5]string{"1xx", "2xx", "3xx", "4xx", "5xx"}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	e := c.e
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}

	e.pruneStats()
	e.stats.mu.RLock()
	hosts := make(map[string]*hostStats, len(e.stats.hosts))
	for k, v := range e.stats.hosts {
		hosts[k] = v
	}
	e.stats.mu.RUnlock()

	for host, s := range hosts {
		for i := range s.codes {
			counter(c.requests, s.codes[i].Load(), host, codeClasses[i])
		}
		for i := range s.refused {
			counter(c.refused, s.refused[i].Load(), host, reasonNames[i])
		}
		counter(c.attemptsFailed, s.attemptsFailed.Load(), host)
		var n uint64
		cum := make(map[float64]uint64, len(durationBuckets))
		for i, ub := range durationBuckets {
			n += s.buckets[i].Load()
			cum[ub] = n
		}
		n += s.buckets[len(durationBuckets)].Load()
		ch <- prometheus.MustNewConstHistogram(c.duration, n, float64(s.sumNanos.Load())/1e9, cum, host)
	}

	for _, l := range e.listenerCounters() {
		counter(c.conns, l.conns.Load(), l.name)
		gauge(c.active, float64(l.active.Load()), l.name)
		counter(c.connsRefused, l.refused.Load(), l.name)
		counter(c.unknown, l.unknown.Load(), l.name)
	}

	for _, svc := range e.reg.Services() {
		var healthy, unhealthy int
		for _, r := range svc.Replicas {
			if r.Healthy {
				healthy++
			} else {
				unhealthy++
			}
		}
		gauge(c.replicas, float64(healthy), svc.Hostname, "healthy")
		gauge(c.replicas, float64(unhealthy), svc.Hostname, "unhealthy")
	}
}
