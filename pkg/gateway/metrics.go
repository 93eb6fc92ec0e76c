package gateway

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metricsCollector reads the gateway's counters when Prometheus scrapes:
// nothing on the data path exists for metrics' sake.
type metricsCollector struct {
	s *Server

	flows, flowsCreated, refused, peerBytes, peerPackets, peerFlows, wgBytes,
	handshakeAge, egressPorts, egressSlice, egressConns, inFlight, inFlightDrops,
	malformed, packets, tableMax, dnsQueries, limited, queueDrops, retransmits,
	peerHandshakes, handshakesRefused, handshakeTimeouts, tunnelMalformed *prometheus.Desc
}

// Collector returns a Prometheus collector of the gateway's metrics.
func (s *Server) Collector() prometheus.Collector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("sluice_"+name, help, labels, nil)
	}
	return &metricsCollector{
		s:             s,
		flows:         d("flows", "Flows in the connection table, by protocol and state.", "proto", "state"),
		flowsCreated:  d("flows_created_total", "Flows created; its rate is new flows per second."),
		refused:       d("flows_refused_total", "Flows refused, by reason.", "reason"),
		peerBytes:     d("peer_flow_bytes_total", "Bytes of a peer's flows, each way (orig: from the peer, reply: to it).", "peer", "direction"),
		peerPackets:   d("peer_flow_packets_total", "Packets of a peer's flows, each way.", "peer", "direction"),
		peerFlows:     d("peer_flows_total", "Flows a peer has opened.", "peer"),
		wgBytes:       d("peer_wireguard_bytes_total", "Bytes WireGuard received from (rx) and sent to (tx) a peer, encryption included.", "peer", "direction"),
		handshakeAge:  d("peer_handshake_age_seconds", "Seconds since a peer's last WireGuard handshake; absent if it never had one.", "peer"),
		egressPorts:   d("egress_ports_in_use", "Egress ports in use, by local address and protocol.", "addr", "proto"),
		egressSlice:   d("egress_ports_slice_size", "Ports in this gateway's slice of the egress range."),
		egressConns:   d("egress_tcp_connections", "Open egress TCP connections, by local address (ports are shared across destinations).", "addr"),
		inFlight:      d("tcp_handshakes_in_flight", "Client TCP handshakes in flight, from the SYN until the connection is relayed or refused."),
		inFlightDrops: d("tcp_handshakes_dropped_total", "SYNs dropped because too many handshakes were in flight."),
		handshakesRefused: d("tcp_handshakes_refused_total",
			"SYNs refused (RST) because their peer had its share of handshakes in flight."),
		handshakeTimeouts: d("tcp_handshake_timeouts_total",
			"Client TCP handshakes dropped, with their egress connection, because the client did not answer the SYN-ACK in time."),
		peerHandshakes: d("peer_tcp_handshakes_in_flight", "A peer's TCP handshakes in flight (in TUN mode, a client address's or /64's).", "peer"),
		malformed:      d("packets_malformed_total", "Packets from clients dropped because they did not parse."),
		packets:        d("packets_total", "Packets through the stack, by direction (in: from clients).", "direction"),
		queueDrops:     d("packets_queue_dropped_total", "Packets toward clients dropped because the tunnel did not take them fast enough."),
		retransmits:    d("tcp_retransmits_total", "TCP segments sent to clients again, by cause (timeout, or loss detected otherwise).", "cause"),
		tableMax:       d("flows_max", "The connection table's size limit."),
		dnsQueries:     d("dns_queries_total", "DNS queries to the gateway's address, by outcome.", "outcome"),
		limited:        d("peer_flows_limited_total", "Flows of a peer refused by its limits, by limit (rate, flows, handshakes).", "peer", "limit"),
		tunnelMalformed: d("tunnel_malformed_total",
			"WireGuard datagrams dropped because they were not WireGuard messages or failed authentication (bad MAC, a handshake no peer's key opens)."),
	}
}

func (c *metricsCollector) Describe(ch chan<- *prometheus.Desc) {
	prometheus.DescribeByCollect(c, ch)
}

func (c *metricsCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.s
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	st := s.Stats()

	byState := map[[2]string]int{}
	for _, e := range s.table.Snapshot() {
		byState[[2]string{e.Key.Proto.String(), e.State.String()}]++
	}
	for k, n := range byState {
		gauge(c.flows, float64(n), k[0], k[1])
	}
	for peer, t := range s.table.PeerTotals() {
		counter(c.peerBytes, t.OrigBytes, peer, "orig")
		counter(c.peerBytes, t.ReplyBytes, peer, "reply")
		counter(c.peerPackets, t.OrigPackets, peer, "orig")
		counter(c.peerPackets, t.ReplyPackets, peer, "reply")
		counter(c.peerFlows, t.Flows, peer)
	}
	counter(c.flowsCreated, st.Table.Inserted)
	for i, name := range RefusalNames {
		counter(c.refused, st.Refused[i], name)
	}
	for _, l := range st.Limits {
		counter(c.limited, l.RateLimited, l.Peer, "rate")
		counter(c.limited, l.FlowLimited, l.Peer, "flows")
		counter(c.limited, l.HandshakeLimited, l.Peer, "handshakes")
		gauge(c.peerHandshakes, float64(l.Handshakes), l.Peer)
	}

	if s.wg != nil {
		counter(c.tunnelMalformed, s.wg.Malformed())
		if peers, err := s.Peers(); err == nil {
			for _, p := range peers {
				counter(c.wgBytes, p.RxBytes, p.Name, "rx")
				counter(c.wgBytes, p.TxBytes, p.Name, "tx")
				if !p.LastHandshake.IsZero() {
					gauge(c.handshakeAge, time.Since(p.LastHandshake).Seconds(), p.Name)
				}
			}
		}
	}

	gauge(c.egressSlice, float64(st.Egress.Slice.Len()))
	for _, a := range st.Egress.Addrs {
		gauge(c.egressPorts, float64(a.TCPPorts), a.Addr.String(), "tcp")
		gauge(c.egressPorts, float64(a.UDPPorts), a.Addr.String(), "udp")
		gauge(c.egressConns, float64(a.TCPConns), a.Addr.String())
	}
	gauge(c.inFlight, float64(st.Stack.InFlight))
	counter(c.inFlightDrops, st.Stack.InFlightDrops)
	counter(c.handshakesRefused, st.Stack.InFlightRefused)
	counter(c.handshakeTimeouts, st.Stack.HandshakeTimeouts)
	counter(c.malformed, st.Stack.Malformed)
	counter(c.packets, st.Stack.PacketsIn, "in")
	counter(c.packets, st.Stack.PacketsOut, "out")
	counter(c.queueDrops, st.Stack.QueueDrops)
	counter(c.retransmits, st.Stack.Timeouts, "timeout")
	counter(c.retransmits, st.Stack.Retransmits-min(st.Stack.Timeouts, st.Stack.Retransmits), "loss")
	gauge(c.tableMax, float64(s.table.MaxFlows()))
	counter(c.dnsQueries, st.DNS.Answered, "answered")
	counter(c.dnsQueries, st.DNS.Failed, "failed")
	counter(c.dnsQueries, st.DNS.Dropped, "dropped")
}
