package service

import (
	"io"
	"net/http"
	"testing"
	"time"
)

// The cost of publishing a service through the edge, in process: an HTTP
// client on loopback, the edge, the gateway's stack, WireGuard over
// loopback UDP, the agent's client stack, the agent, and the origin on
// loopback; against the same requests sent straight to the origin,
// measured first in the same benchmark.

const exposeBenchHost = "bench.sluice.test"

// benchmarkExpose times b.N GETs of path, through the edge and straight
// to the origin, and reports both rates and their ratio.
func benchmarkExpose(b *testing.B, path string, size int64) {
	r, edgeAddr := startEdgeService(b, nil)
	blob := make([]byte, size)
	o := newOrigin(b, "bench", func(mux *http.ServeMux) {
		mux.HandleFunc(path, func(w http.ResponseWriter, _ *http.Request) { w.Write(blob) })
	})
	runAgent(b, addPeer(b, r, "bench"), exposeBenchHost, o.srv.URL, nil)

	hc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1}}
	get := func(addr string) {
		req, _ := http.NewRequest(http.MethodGet, "http://"+addr+path, nil)
		req.Host = exposeBenchHost
		resp, err := hc.Do(req)
		if err != nil {
			b.Fatal(err)
		}
		n, err := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err != nil || n != size || resp.StatusCode != http.StatusOK {
			b.Fatalf("%d bytes, status %d, %v", n, resp.StatusCode, err)
		}
	}
	originAddr := o.srv.Listener.Addr().String()
	get(edgeAddr) // the first request pays for the connections
	get(originAddr)

	start := time.Now()
	for range b.N {
		get(originAddr)
	}
	direct := time.Since(start)
	b.SetBytes(size)
	b.ResetTimer()
	start = time.Now()
	for range b.N {
		get(edgeAddr)
	}
	edge := time.Since(start)
	b.StopTimer()
	if size > 1<<20 {
		mb := func(d time.Duration) float64 { return float64(size) * float64(b.N) / d.Seconds() / 1e6 }
		b.ReportMetric(mb(edge), "edge-MB/s")
		b.ReportMetric(mb(direct), "direct-MB/s")
		b.ReportMetric(mb(edge)/mb(direct), "ratio")
		return
	}
	rate := func(d time.Duration) float64 { return float64(b.N) / d.Seconds() }
	b.ReportMetric(rate(edge), "edge-req/s")
	b.ReportMetric(rate(direct), "direct-req/s")
	b.ReportMetric(rate(edge)/rate(direct), "ratio")
}

// BenchmarkExposeRequests: small answers, one request at a time over a
// kept-alive connection; latency bound.
func BenchmarkExposeRequests(b *testing.B) { benchmarkExpose(b, "/small", 100) }

// BenchmarkExposeDownload: 16 MiB answers; throughput bound.
func BenchmarkExposeDownload(b *testing.B) { benchmarkExpose(b, "/blob", 16<<20) }
