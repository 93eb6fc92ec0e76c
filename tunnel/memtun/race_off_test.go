//go:build !race

package memtun

const raceEnabled = false
