package netstack

import (
	"fmt"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

// Congestion controls a stack's TCP can use. The gateway's connections to
// clients and the client's own connections use DefaultCongestionControl
// unless told otherwise.
const (
	// CongestionBBR follows the path's measured bandwidth and RTT and does
	// not back off on every loss, as Linux's BBR does; third_party/gvisor
	// carries it. A link that loses 1-2 % of its packets at random (Wi-Fi,
	// mobile) holds a loss-based window to a dozen packets.
	CongestionBBR = "bbr"
	// CongestionCubic is gVisor's CUBIC, loss-based.
	CongestionCubic = "cubic"
	// CongestionReno is NewReno, loss-based.
	CongestionReno = "reno"

	DefaultCongestionControl = CongestionBBR
)

// checkCongestionControl fills in the default and names a control the
// stack does not have.
func checkCongestionControl(field string, cc *string) error {
	switch *cc {
	case "":
		*cc = DefaultCongestionControl
	case CongestionBBR, CongestionCubic, CongestionReno:
	default:
		return fmt.Errorf("netstack: %s: %q is not one of %s, %s, %s", field, *cc, CongestionBBR, CongestionCubic, CongestionReno)
	}
	return nil
}

// tuneTCP sets what both stacks want of gVisor's TCP: SACK, buffers that
// grow to 8 MiB with the connection (a 1 MiB window caps a 50 ms path at
// 20 MB/s), and the congestion control. extra are a stack's own options.
func tuneTCP(s *stack.Stack, cc string, extra ...tcpip.SettableTransportProtocolOption) error {
	opts := []tcpip.SettableTransportProtocolOption{
		ptr(tcpip.TCPSACKEnabled(true)),
		ptr(tcpip.TCPModerateReceiveBufferOption(true)),
		ptr(tcpip.CongestionControlOption(cc)),
		&tcpip.TCPReceiveBufferSizeRangeOption{Min: 4 << 10, Default: 1 << 20, Max: 8 << 20},
		&tcpip.TCPSendBufferSizeRangeOption{Min: 4 << 10, Default: 1 << 20, Max: 8 << 20},
	}
	for _, opt := range append(opts, extra...) {
		if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, opt); err != nil {
			return fmt.Errorf("netstack: TCP option %T: %s", opt, err)
		}
	}
	return nil
}
