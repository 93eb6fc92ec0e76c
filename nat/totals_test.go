package nat

import (
	"net/netip"
	"testing"
)

func TestPeerTotalsKeepEndedFlows(t *testing.T) {
	tab, err := NewTable(TableOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer tab.Close()
	key := func(port uint16) Key {
		return Key{Proto: TCP, Client: netip.AddrPortFrom(netip.MustParseAddr("100.96.0.2"), port), Dest: netip.MustParseAddrPort("192.0.2.1:443")}
	}
	a, _ := tab.Insert(key(1), "alice", nil)
	a.CountOrig(100, 2)
	a.CountReply(1000, 3)
	a.End(ReasonClosed)
	b, _ := tab.Insert(key(2), "alice", nil)
	b.CountOrig(10, 1)
	c, _ := tab.Insert(key(3), "bob", nil)
	c.CountReply(5, 1)

	got := tab.PeerTotals()
	if want := (Totals{Flows: 2, OrigBytes: 110, OrigPackets: 3, ReplyBytes: 1000, ReplyPackets: 3}); got["alice"] != want {
		t.Errorf("alice: %+v, want %+v", got["alice"], want)
	}
	if want := (Totals{Flows: 1, ReplyBytes: 5, ReplyPackets: 1}); got["bob"] != want {
		t.Errorf("bob: %+v, want %+v", got["bob"], want)
	}
}
