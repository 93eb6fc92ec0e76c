//go:build !linux

package wireguard

import "net"

// Elsewhere AddrBind runs without offloads and with the default buffers;
// x/net's batch calls move one datagram per system call there.

const controlSize = 0

func setSocketOptions(uintptr) (rxOffload bool, err error) { return false, nil }

func supportsSegmentation(*net.UDPConn) bool { return false }

func segmentSize([]byte) (int, error) { return 0, nil }

func appendSegmentSize(oob []byte, _ uint16) []byte { return oob }

func disablesSegmentation(error) bool { return false }

func refusesOne(error) bool { return false }
