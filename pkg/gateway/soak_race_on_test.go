//go:build race

package gateway

// soakRace reports a -race build, whose shadow memory multiplies the
// resident size the soak measures.
const soakRace = true
