package nat_test

import (
	"errors"
	"fmt"

	"github.com/sluice-vpn/sluice/nat"
)

// The gateway asks the limiter before it creates anything for a new flow,
// and releases the admission when the flow ends, whichever way it ends.
func ExampleLimiter() {
	l, err := nat.NewLimiter(nat.LimiterOptions{
		Default: nat.Limits{NewFlowsPerSecond: 100, MaxFlows: 2},
		Peers:   map[string]nat.Limits{"build-server": {MaxFlows: 1000}},
	})
	if err != nil {
		panic(err)
	}
	var open []func()
	for i := range 3 {
		release, err := l.Admit("laptop")
		switch {
		case errors.Is(err, nat.ErrPeerFlowLimit):
			fmt.Printf("flow %d refused: %v\n", i, err)
			continue
		case err != nil:
			panic(err)
		}
		// ... insert the flow into the table and dial; on failure, or
		// when the flow ends, call release.
		open = append(open, release)
	}
	for _, release := range open {
		release()
	}
	s := l.Stats()[1]
	fmt.Printf("%s: %d open, %d admitted, %d refused\n", s.Peer, s.Flows, s.Admitted, s.FlowLimited)
	// Output:
	// flow 2 refused: peer "laptop": nat: peer's concurrent flow limit reached
	// laptop: 0 open, 2 admitted, 1 refused
}
