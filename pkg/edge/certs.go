package edge

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
)

// certSet chooses the HTTPS listener's certificate by the name a client
// asks for (SNI): a certificate naming it exactly, else one with a
// wildcard for its parent ("*.example.com" covers "a.example.com" but
// neither "example.com" nor "a.b.example.com"), else the first one.
type certSet struct {
	exact map[string]*tls.Certificate
	wild  map[string]*tls.Certificate // by the parent domain
	first *tls.Certificate
}

// newCertSet indexes certs by the DNS names of their leaves; where two
// certificates name the same host, the first given wins.
func newCertSet(certs []tls.Certificate) (*certSet, error) {
	if len(certs) == 0 {
		return nil, errors.New("edge: Options.Certificates is empty, and HTTPSAddr needs at least one")
	}
	s := &certSet{exact: make(map[string]*tls.Certificate), wild: make(map[string]*tls.Certificate)}
	for i := range certs {
		c := &certs[i]
		if len(c.Certificate) == 0 {
			return nil, fmt.Errorf("edge: Options.Certificates[%d] has no certificate", i)
		}
		if c.PrivateKey == nil {
			return nil, fmt.Errorf("edge: Options.Certificates[%d] has no private key", i)
		}
		leaf := c.Leaf
		if leaf == nil {
			var err error
			if leaf, err = x509.ParseCertificate(c.Certificate[0]); err != nil {
				return nil, fmt.Errorf("edge: Options.Certificates[%d]: %w", i, err)
			}
		}
		if s.first == nil {
			s.first = c
		}
		for _, n := range leaf.DNSNames {
			n = strings.ToLower(strings.TrimSuffix(n, "."))
			if parent, ok := strings.CutPrefix(n, "*."); ok {
				if _, dup := s.wild[parent]; !dup {
					s.wild[parent] = c
				}
			} else if _, dup := s.exact[n]; !dup {
				s.exact[n] = c
			}
		}
	}
	return s, nil
}

// get is tls.Config.GetCertificate.
func (s *certSet) get(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	return s.choose(hello.ServerName), nil
}

func (s *certSet) choose(serverName string) *tls.Certificate {
	name := strings.ToLower(strings.TrimSuffix(serverName, "."))
	if name == "" {
		return s.first
	}
	if c, ok := s.exact[name]; ok {
		return c
	}
	if _, parent, ok := strings.Cut(name, "."); ok {
		if c, ok := s.wild[parent]; ok {
			return c
		}
	}
	return s.first
}
