package state

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// DefaultDir returns the state directory to use when none is configured:
//
//   - the first path in $STATE_DIRECTORY (set by systemd's StateDirectory=,
//     colon-separated when there are several),
//   - else $XDG_STATE_HOME/sluice,
//   - else /var/lib/sluice when running as root,
//   - else ~/.local/state/sluice.
//
// It does not create the directory; Open does.
func DefaultDir() (string, error) {
	return defaultDir(os.Getenv, os.Geteuid(), os.UserHomeDir)
}

func defaultDir(getenv func(string) string, euid int, home func() (string, error)) (string, error) {
	if v := getenv("STATE_DIRECTORY"); v != "" {
		first, _, _ := strings.Cut(v, ":")
		if !filepath.IsAbs(first) {
			return "", fmt.Errorf("state: STATE_DIRECTORY=%q: %q is not an absolute path", v, first)
		}
		return filepath.Clean(first), nil
	}
	// The XDG base directory spec says relative paths are to be ignored.
	if v := getenv("XDG_STATE_HOME"); v != "" && filepath.IsAbs(v) {
		return filepath.Join(v, "sluice"), nil
	}
	if euid == 0 {
		return "/var/lib/sluice", nil
	}
	h, err := home()
	if err != nil {
		return "", fmt.Errorf("state: no state directory: STATE_DIRECTORY and XDG_STATE_HOME are unset and %w", err)
	}
	return filepath.Join(h, ".local", "state", "sluice"), nil
}
