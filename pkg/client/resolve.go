package client

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// DNS over the tunnel: how long one server gets for one question, how many
// rounds over the servers a lookup makes, and the UDP answer size it
// advertises (the DNS flag day's, which fits any tunnel MTU unfragmented).
const (
	dnsTryTimeout = 3 * time.Second
	dnsRounds     = 2
	dnsUDPSize    = 1232
)

// resolver looks names up by asking the DNS servers of the configuration,
// through the tunnel. There is no cache: answers are only as old as the
// query, and the host's resolver is never asked.
type resolver struct {
	servers []netip.Addr
	// dial opens a connection through the tunnel: "udp" or "tcp".
	dial func(ctx context.Context, proto string, dst netip.AddrPort) (net.Conn, error)
}

// errNoDNS is the answer to every name when the configuration names no
// DNS server.
const errNoDNS = "no DNS server in the tunnel configuration (DNS in [Interface])"

// lookup returns host's IPv4 addresses (want4) and IPv6 addresses (want6),
// IPv4 first. Errors are *net.DNSError; one that ctx ended unwraps to
// ctx.Err().
func (r *resolver) lookup(ctx context.Context, host string, want4, want6 bool) ([]netip.Addr, error) {
	if len(r.servers) == 0 {
		return nil, &net.DNSError{Err: errNoDNS, Name: host, IsNotFound: true}
	}
	if !isDomainName(host) {
		return nil, &net.DNSError{Err: "not a valid domain name", Name: host, IsNotFound: true}
	}
	fqdn := host
	if !strings.HasSuffix(fqdn, ".") {
		fqdn += "."
	}
	name, err := dnsmessage.NewName(fqdn)
	if err != nil {
		return nil, &net.DNSError{Err: "not a valid domain name", Name: host, IsNotFound: true}
	}
	var types []dnsmessage.Type
	if want4 {
		types = append(types, dnsmessage.TypeA)
	}
	if want6 {
		types = append(types, dnsmessage.TypeAAAA)
	}
	type answer struct {
		addrs []netip.Addr
		err   error
	}
	answers := make([]answer, len(types))
	var wg sync.WaitGroup
	for i, t := range types {
		wg.Add(1)
		go func() {
			defer wg.Done()
			answers[i].addrs, answers[i].err = r.query(ctx, host, name, t)
		}()
	}
	wg.Wait()
	var addrs []netip.Addr
	var firstErr error
	for _, a := range answers {
		addrs = append(addrs, a.addrs...)
		if a.err != nil && firstErr == nil {
			firstErr = a.err
		}
	}
	if len(addrs) > 0 {
		return addrs, nil
	}
	if firstErr != nil {
		return nil, firstErr
	}
	return nil, &net.DNSError{Err: "no such host", Name: host, Server: r.servers[0].String(), IsNotFound: true}
}

// query asks the servers in turn for name's records of type t, and stops
// at the first answer; a name that does not exist is an answer. No records
// of the type is (nil, nil).
func (r *resolver) query(ctx context.Context, host string, name dnsmessage.Name, t dnsmessage.Type) ([]netip.Addr, error) {
	var last error
	for range dnsRounds {
		for _, srv := range r.servers {
			if ctx.Err() != nil {
				return nil, &net.DNSError{Err: ctx.Err().Error(), Name: host, IsTimeout: errors.Is(ctx.Err(), context.DeadlineExceeded), UnwrapErr: ctx.Err()}
			}
			addrs, err := r.exchange(ctx, host, netip.AddrPortFrom(srv, 53), name, t)
			if err == nil {
				return addrs, nil
			}
			if de, ok := err.(*net.DNSError); ok && de.IsNotFound {
				return nil, err
			}
			last = err
		}
	}
	return nil, last
}

// exchange asks one server one question over UDP, and again over TCP if
// the answer was truncated.
func (r *resolver) exchange(ctx context.Context, host string, srv netip.AddrPort, name dnsmessage.Name, t dnsmessage.Type) ([]netip.Addr, error) {
	q := dnsmessage.Question{Name: name, Type: t, Class: dnsmessage.ClassINET}
	id, msg, err := newQuery(q)
	if err != nil {
		return nil, &net.DNSError{Err: "cannot build the query: " + err.Error(), Name: host, Server: srv.String()}
	}
	fail := func(err error) error {
		de := &net.DNSError{Err: err.Error(), Name: host, Server: srv.String(), IsTemporary: true}
		if ctx.Err() != nil {
			de.Err, de.UnwrapErr = ctx.Err().Error(), ctx.Err()
			de.IsTimeout = errors.Is(ctx.Err(), context.DeadlineExceeded)
		} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
			de.IsTimeout = true
		}
		return de
	}
	for _, proto := range []string{"udp", "tcp"} {
		answer, err := r.roundTrip(ctx, proto, srv, id, q, msg)
		if err != nil {
			return nil, fail(err)
		}
		var p dnsmessage.Parser
		h, err := p.Start(answer)
		if err != nil {
			return nil, fail(errors.New("cannot parse the answer"))
		}
		if h.Truncated && proto == "udp" {
			continue
		}
		if err := p.SkipAllQuestions(); err != nil {
			return nil, fail(errors.New("cannot parse the answer"))
		}
		switch h.RCode {
		case dnsmessage.RCodeSuccess:
		case dnsmessage.RCodeNameError:
			return nil, &net.DNSError{Err: "no such host", Name: host, Server: srv.String(), IsNotFound: true}
		case dnsmessage.RCodeServerFailure:
			return nil, &net.DNSError{Err: "server failure", Name: host, Server: srv.String(), IsTemporary: true}
		default:
			return nil, &net.DNSError{Err: "server answered " + h.RCode.String(), Name: host, Server: srv.String()}
		}
		addrs, err := parseAddrs(&p, t)
		if err != nil {
			return nil, fail(err)
		}
		return addrs, nil
	}
	return nil, fail(errors.New("answer truncated over TCP"))
}

// roundTrip sends msg to srv and returns the first answer to it: over UDP,
// the first datagram with the query's ID and question; over TCP, the
// first message.
func (r *resolver) roundTrip(ctx context.Context, proto string, srv netip.AddrPort, id uint16, q dnsmessage.Question, msg []byte) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, dnsTryTimeout)
	defer cancel()
	c, err := r.dial(ctx, proto, srv)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	deadline, _ := ctx.Deadline()
	c.SetDeadline(deadline)
	// Cancelling ctx ends a read that is waiting for the answer.
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	if proto == "tcp" {
		framed := binary.BigEndian.AppendUint16(make([]byte, 0, 2+len(msg)), uint16(len(msg)))
		if _, err := c.Write(append(framed, msg...)); err != nil {
			return nil, err
		}
		var n [2]byte
		if _, err := io.ReadFull(c, n[:]); err != nil {
			return nil, err
		}
		answer := make([]byte, binary.BigEndian.Uint16(n[:]))
		if _, err := io.ReadFull(c, answer); err != nil {
			return nil, err
		}
		if !answers(answer, id, q) {
			return nil, errors.New("answer does not match the question")
		}
		return answer, nil
	}
	if _, err := c.Write(msg); err != nil {
		return nil, err
	}
	buf := make([]byte, dnsUDPSize)
	for {
		n, err := c.Read(buf)
		if err != nil {
			return nil, err
		}
		if answers(buf[:n], id, q) {
			return buf[:n], nil
		}
		// Anything else is a stray or a forgery: keep waiting.
	}
}

// newQuery builds a recursive query for q with a random ID, advertising
// dnsUDPSize with EDNS(0).
func newQuery(q dnsmessage.Question) (uint16, []byte, error) {
	var idb [2]byte
	rand.Read(idb[:])
	id := binary.BigEndian.Uint16(idb[:])
	b := dnsmessage.NewBuilder(make([]byte, 0, 512), dnsmessage.Header{ID: id, RecursionDesired: true})
	b.EnableCompression()
	if err := b.StartQuestions(); err != nil {
		return 0, nil, err
	}
	if err := b.Question(q); err != nil {
		return 0, nil, err
	}
	if err := b.StartAdditionals(); err != nil {
		return 0, nil, err
	}
	var opt dnsmessage.ResourceHeader
	if err := opt.SetEDNS0(dnsUDPSize, dnsmessage.RCodeSuccess, false); err != nil {
		return 0, nil, err
	}
	if err := b.OPTResource(opt, dnsmessage.OPTResource{}); err != nil {
		return 0, nil, err
	}
	msg, err := b.Finish()
	return id, msg, err
}

// answers reports whether msg is a response to the query id for q.
func answers(msg []byte, id uint16, q dnsmessage.Question) bool {
	var p dnsmessage.Parser
	h, err := p.Start(msg)
	if err != nil || !h.Response || h.ID != id {
		return false
	}
	got, err := p.Question()
	if err != nil {
		return false
	}
	return got.Type == q.Type && got.Class == q.Class && strings.EqualFold(got.Name.String(), q.Name.String())
}

// parseAddrs collects the records of type t from the answer section. The
// records of a CNAME chain's target come in the same answer, so the chain
// needs no following.
func parseAddrs(p *dnsmessage.Parser, t dnsmessage.Type) ([]netip.Addr, error) {
	var addrs []netip.Addr
	for {
		h, err := p.AnswerHeader()
		if err == dnsmessage.ErrSectionDone {
			return addrs, nil
		}
		if err != nil {
			return nil, errors.New("cannot parse the answer")
		}
		switch {
		case h.Type == t && t == dnsmessage.TypeA:
			a, err := p.AResource()
			if err != nil {
				return nil, errors.New("cannot parse the answer")
			}
			addrs = append(addrs, netip.AddrFrom4(a.A))
		case h.Type == t && t == dnsmessage.TypeAAAA:
			a, err := p.AAAAResource()
			if err != nil {
				return nil, errors.New("cannot parse the answer")
			}
			addrs = append(addrs, netip.AddrFrom16(a.AAAA))
		default:
			if err := p.SkipAnswer(); err != nil {
				return nil, errors.New("cannot parse the answer")
			}
		}
	}
}

// isDomainName reports whether s is a name DNS can carry: dot-separated
// labels of 1 to 63 letters, digits, hyphens and underscores, 253
// characters at most without the final dot.
func isDomainName(s string) bool {
	s = strings.TrimSuffix(s, ".")
	if s == "" || len(s) > 253 {
		return false
	}
	for label := range strings.SplitSeq(s, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return false
			}
		}
	}
	return true
}
