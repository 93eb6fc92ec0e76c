// Command sluice is a VPN gateway that runs entirely in user space.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
)

func main() {
	ctx, stop := signalContext(context.Background(), os.Stderr, os.Exit)
	err := newRootCmd().ExecuteContext(ctx)
	stop()
	if err != nil {
		// A command that ran another (connect -- CMD) exits as it did.
		var st interface{ ExitStatus() int }
		if errors.As(err, &st) {
			os.Exit(st.ExitStatus())
		}
		fmt.Fprintln(os.Stderr, "sluice:", err)
		os.Exit(1)
	}
}
