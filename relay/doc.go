// Package relay copies bytes both ways between two connections, the one
// thing every path of sluice that splices a client to a server does: the
// gateway's netstack (a client's TCP connection in gVisor to its egress
// socket), the client-side SOCKS5 and HTTP proxies, the edge (a public
// client to an expose agent) and the expose agent (the edge to the origin).
//
// Run ends only when both directions are done, and then no goroutine of it
// is left. What it does is done once, whatever the connections are:
//
//   - Half-close. An EOF read from one side becomes a CloseWrite on the
//     other (for TLS, a close_notify alert and then a FIN under it), and
//     the other direction keeps flowing until it ends too.
//   - Reset propagation. An error on either side (a RST, a failed write, a
//     closed connection) aborts both at once: each side gets a RST where
//     it can be given one, so neither peer waits for a connection that is
//     gone, and neither copy stays blocked.
//   - Idle timeout (Options.IdleTimeout): a relay that moves no byte either
//     way for that long is aborted.
//   - Buffers held only while data is in hand, where the connections let
//     a relay wait for data without one (see below): an idle connection
//     holds no buffer, which is what lets a gateway keep tens of thousands
//     of them open.
//
// # Optional capabilities
//
// A connection is any net.Conn. Run finds what more it can do by type
// assertion, on these small interfaces:
//
//   - CloseWriter (CloseWrite() error), as *net.TCPConn and *tls.Conn have:
//     how an EOF is passed on. A connection without it is closed instead,
//     and the direction coming from it then counts as ended.
//   - Aborter (Abort()): how the connection is reset. Without it, a
//     connection with SetLinger(int) error (*net.TCPConn) gets SetLinger(0)
//     before its Close, which makes the kernel send a RST; one with
//     NetConn() net.Conn (*tls.Conn, wrappers) has the connection under it
//     reset; any other is just closed.
//   - ReadWaiter (WaitReadable() error): blocks until a Read would not, so
//     that the relay takes a buffer only once there is something to read.
//     Without it, a syscall.Conn is waited for by peeking at its socket
//     (such a connection must not buffer what it reads); any other
//     connection is read with a buffer in hand.
//   - TryReader (TryRead(p) (n int, ok bool, err error)): reads without
//     waiting, ok false when there was nothing to read. After a read that
//     filled the buffer the relay keeps it and tries again, and gives it
//     back only when a try finds nothing: a bulk transfer costs no
//     readiness check per read, and a pause holds no buffer. A plain
//     *net.TCPConn gets this from the relay itself.
package relay
