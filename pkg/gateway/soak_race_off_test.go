//go:build !race

package gateway

const soakRace = false
