package kerneltun

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// netns is a network namespace private to one test, entered by one locked OS
// thread that runs whatever the test hands it. Interfaces and sockets created
// on that thread belong to the namespace for life, wherever they are used
// later, so all test traffic stays inside it. The namespace has no name and
// vanishes with its last thread, socket and interface: nothing to clean up
// even if the test process dies.
type netns struct {
	fns  chan func()
	done chan struct{}
}

// newNetns skips the test unless it runs as root with iproute2 installed,
// and returns a fresh namespace that is torn down when the test ends.
func newNetns(t *testing.T) *netns {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("kerneltun: creating TUN devices and network namespaces needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN); skipping")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("kerneltun: iproute2's ip command is not installed; it is needed to assign test addresses; skipping")
	}
	ns := &netns{fns: make(chan func()), done: make(chan struct{})}
	started := make(chan error, 1)
	go func() {
		defer close(ns.done)
		// Never unlocked: when this goroutine returns, the runtime ends
		// the thread instead of letting it run other goroutines in here.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			started <- fmt.Errorf("unshare(CLONE_NEWNET): %w", err)
			return
		}
		started <- nil
		for fn := range ns.fns {
			fn()
		}
	}()
	if err := <-started; err != nil {
		<-ns.done
		t.Fatal(err)
	}
	t.Cleanup(func() {
		close(ns.fns)
		<-ns.done
	})
	return ns
}

// do runs fn on the namespace's thread and returns its error.
func (ns *netns) do(fn func() error) error {
	errc := make(chan error, 1)
	ns.fns <- func() { errc <- fn() }
	return <-errc
}

// ip runs the ip command inside the namespace; the child inherits the
// namespace from the thread that forks it.
func (ns *netns) ip(t *testing.T, args ...string) {
	t.Helper()
	err := ns.do(func() error {
		out, err := exec.Command("ip", args...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// quietIPv6 turns IPv6 off on an interface so that the kernel's router
// solicitations and MLD reports do not interleave with the packets a test
// looks for. The tests filter anyway; this only keeps the device quiet.
func (ns *netns) quietIPv6(t *testing.T, name string) {
	t.Helper()
	err := ns.do(func() error {
		// /proc/sys/net resolves against the opening thread's namespace.
		err := os.WriteFile("/proc/sys/net/ipv6/conf/"+name+"/disable_ipv6", []byte("1"), 0)
		if errors.Is(err, os.ErrNotExist) {
			return nil // no IPv6 in this kernel
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}
