package nat

import (
	"errors"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"
)

type icmpReport struct {
	remote, client netip.AddrPort
	payload        string
	err            UDPError
}

// closedPort returns a loopback UDP port that nothing listens on.
func closedPort(t *testing.T, network, addr string) netip.AddrPort {
	t.Helper()
	c, err := net.ListenPacket(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	ap := c.LocalAddr().(*net.UDPAddr).AddrPort()
	c.Close()
	return ap
}

// TestUDPPortUnreachable: a datagram to a closed port comes back as the
// kernel's port unreachable, which the mapper hands on for the flow it
// belongs to; the mapping stays up, and the next send, to a live server,
// neither fails with that error nor is lost.
func TestUDPPortUnreachable(t *testing.T) {
	for _, fam := range []struct{ network, addr string }{{"udp4", "127.0.0.1:0"}, {"udp6", "[::1]:0"}} {
		t.Run(fam.network, func(t *testing.T) {
			reports := make(chan icmpReport, 8)
			f := newUDPFixture(t, FilterAddressPortDependent, TableOptions{}, func(o *UDPOptions) {
				o.DeliverError = func(remote, client netip.AddrPort, payload []byte, e UDPError) {
					reports <- icmpReport{remote, client, string(payload), e}
				}
			})
			client := client1
			if fam.network == "udp6" {
				client = client6
			}
			closed := closedPort(t, fam.network, fam.addr)
			if err := f.udp.Send("p", client, closed, []byte("anyone there?")); err != nil {
				t.Fatal(err)
			}
			var r icmpReport
			select {
			case r = <-reports:
			case <-time.After(3 * time.Second):
				t.Fatal("no ICMP error reported")
			}
			if r.remote != closed || r.client != client || r.payload != "anyone there?" {
				t.Errorf("reported %+v, want %v -> %v with the payload", r, client, closed)
			}
			if !errors.Is(r.err, syscall.ECONNREFUSED) || r.err.TimeExceeded || r.err.From != closed.Addr() {
				t.Errorf("error %+v, want connection refused from %v", r.err, closed.Addr())
			}
			if got := f.udp.Stats().ICMPErrors; got != 1 {
				t.Errorf("ICMPErrors = %d, want 1", got)
			}

			// Another closed port: its error is pending on the socket when
			// the next send, to a live server, goes out.
			closed2 := closedPort(t, fam.network, fam.addr)
			if err := f.udp.Send("p", client, closed2, []byte("again")); err != nil {
				t.Fatal(err)
			}
			time.Sleep(50 * time.Millisecond)
			srv := startUDPServer(t, fam.network, fam.addr)
			if err := f.udp.Send("p", client, srv.addr, []byte("hello")); err != nil {
				t.Fatalf("send to a live server after a refusal: %v", err)
			}
			if d := f.sink.next(t); d.src != srv.addr || d.dst != client {
				t.Errorf("delivered %+v", d)
			}
			select {
			case r = <-reports:
				if r.remote != closed2 {
					t.Errorf("second error for %v, want %v", r.remote, closed2)
				}
			case <-time.After(3 * time.Second):
				t.Fatal("no ICMP error reported for the second closed port")
			}
			if f.udp.Stats().Mappings != 1 {
				t.Errorf("%d mappings, want the one still open", f.udp.Stats().Mappings)
			}
		})
	}
}
