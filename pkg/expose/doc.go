// Package expose publishes a service through a sluice gateway from a
// machine that accepts no inbound connections: the agent joins the
// gateway as an ordinary WireGuard peer, in user space (pkg/client),
// listens on a port of its own tunnel address, and tells the gateway
// which hostname it serves there. The gateway's public edge then routes
// that hostname's traffic through the tunnel to the agent, which relays
// each connection to the origin (Options.To). Nothing listens on the
// origin's host outside the tunnel, and the agent needs no privileges.
//
// The canonical use is
//
//	c, err := client.New(client.Options{ConfigFile: "peer.conf"})
//	...
//	defer c.Close()
//	control, err := expose.ControlAddr(c.DNSServers())
//	...
//	a, err := expose.New(expose.Options{
//		Tunnel:   c,
//		Control:  control,
//		Hostname: "app.example.com",
//		To:       "http://localhost:4000",
//		Labels:   map[string]string{"release": "canary"},
//	})
//	...
//	err = a.Run(ctx) // until ctx is done
//
// # Protocol
//
// The agent speaks HTTP/1.1 with JSON bodies, through the tunnel, to
// ControlPort on the gateway's tunnel address (the DNS server that the
// peer configuration names). PUT /v1/registrations carries a
// Registration (hostname, the tunnel port, protocol, labels) and is
// answered with a Lease; the agent repeats it every Lease.RefreshSeconds,
// and the gateway drops a replica whose lease runs out, so an agent that
// goes away leaves rotation within seconds and one that comes back is
// put back by its next PUT. On the way out the agent sends DELETE
// /v1/registrations?hostname=H&port=P. There is no secret: WireGuard has
// authenticated the source address of the control connection, and the
// peer that owns it is the agent's identity. See protocol.go.
//
// # Connections
//
// The agent does not parse what it relays: each connection from the
// gateway becomes one connection to the origin and the bytes pass
// untouched both ways, half-closes included, so HTTP keep-alive,
// WebSocket upgrades, server-sent events, large uploads and any TCP
// protocol work alike. For an https:// origin the agent speaks TLS to it
// (HTTP/1.1 only, since that is what the edge sends). Connections from
// any address but the gateway's are closed at once, and at most
// Options.MaxConns are relayed at a time.
package expose
