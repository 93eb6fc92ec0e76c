package main

import (
	"strings"
	"testing"

	"go.uber.org/zap"

	"github.com/sluice-vpn/sluice/pkg/config"
	"github.com/sluice-vpn/sluice/pkg/edge"
)

// The admin API's view of the configuration never carries the edge's
// credential hashes: an unsalted hash of a weak password is as good as
// the password.
func TestServeConfigViewIsRedacted(t *testing.T) {
	hash := edge.HashSecret("password")
	conf := config.Default()
	conf.Edge.HTTP = config.ListenAddr{Port: 8080}
	conf.Edge.Hostnames = map[string]config.EdgeHostname{"app.example.com": {
		Auth: config.EdgeAuth{Bearer: []string{hash}, Basic: map[string]string{"alice": hash}},
	}}
	if err := conf.Validate(); err != nil {
		t.Fatal(err)
	}
	opts := serviceOptions(newServeCmd(), serveFlags{}, conf, zap.NewNop())
	view := string(opts.ConfigYAML)
	if strings.Contains(view, hash) || !strings.Contains(view, "redacted") {
		t.Errorf("the configuration served by the admin API shows the hashes:\n%s", view)
	}
	if len(conf.Edge.Hostnames["app.example.com"].Auth.Bearer) != 1 || conf.Edge.Hostnames["app.example.com"].Auth.Bearer[0] != hash {
		t.Error("redacting the view changed the running configuration")
	}
}
