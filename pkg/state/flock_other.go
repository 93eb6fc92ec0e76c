//go:build !unix || aix

package state

import (
	"errors"
	"os"
)

// tryFlock is not implemented here: without a lock the gateway and the CLI
// could overwrite each other's changes, so refuse instead.
func tryFlock(*os.File) (bool, error) {
	return false, errors.New("advisory locks are not supported on this system")
}
