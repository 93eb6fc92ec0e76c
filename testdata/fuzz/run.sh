#!/bin/sh
# Runs every fuzz target of the repository, one after another, each for
# FUZZTIME (30s) on FUZZPARALLEL (1) workers, and prints the executions
# each reached. A crash stops the run; its input is left in the package's
# testdata/fuzz/FuzzXxx/, where it becomes a regression seed that `make
# test` runs. TARGETS (a space-separated list of names) runs only those.
#
#   testdata/fuzz/run.sh                      # what `make fuzz` runs
#   FUZZTIME=5m testdata/fuzz/run.sh
#   TARGETS="FuzzParseRule FuzzParse" testdata/fuzz/run.sh
set -eu
cd "$(dirname "$0")/../.."

GO=${GO:-go}
FUZZTIME=${FUZZTIME:-30s}
FUZZPARALLEL=${FUZZPARALLEL:-1}
# Minimising each new interesting input costs a coverage snapshot per
# try, which on the packages that link gVisor stalls the fuzzer for
# minutes; a hundred tries is enough for the corpus.
FUZZMINIMIZE=${FUZZMINIMIZE:-100x}

# package target, one per line: every fuzz target in the repository.
ALL="
./netstack FuzzInspect
./netstack FuzzVirtioHeader
./netstack FuzzSegmenter
./netstack FuzzStackIngress
./netstack FuzzStackWrite
./tunnel/wireguard FuzzParseConfig
./tunnel/wireguard FuzzParseUAPI
./tunnel/wireguard FuzzPeerUAPI
./pkg/config FuzzParse
./nat FuzzParseRule
./nat FuzzParsePortRange
./pkg/proxy FuzzSOCKS5Request
./pkg/proxy FuzzSOCKS5Session
./pkg/proxy FuzzSOCKS5Datagram
./pkg/proxy FuzzHTTPProxyRequest
./pkg/edge/registry FuzzRegistration
./pkg/state FuzzDecode
"

summary=""
echo "$ALL" | while read -r pkg target; do
	[ -n "$pkg" ] || continue
	if [ -n "${TARGETS:-}" ]; then
		case " $TARGETS " in *" $target "*) ;; *) continue ;; esac
	fi
	echo "== $pkg $target ($FUZZTIME)"
	log=$(mktemp)
	status=0
	$GO test -run '^$' -fuzz "^${target}\$" -fuzztime "$FUZZTIME" -fuzzminimizetime "$FUZZMINIMIZE" \
		-parallel "$FUZZPARALLEL" "$pkg" >"$log" 2>&1 || status=$?
	execs=$(grep -o 'execs: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
	tail -n 3 "$log"
	echo "result: $pkg $target execs=${execs:-?} status=$status"
	if [ "$status" != 0 ]; then
		cat "$log"
		rm -f "$log"
		exit "$status"
	fi
	rm -f "$log"
done
