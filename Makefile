# sluice: a VPN gateway that runs entirely in user space.

GO      ?= go
BIN     := bin/sluice
PKGS    := ./...
# Flags for `make run`: none, a WireGuard server as the current user.
RUN_FLAGS ?=

.PHONY: all build test bench bench-deps run deps clean fuzz soak

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags='-s -w' -o $(BIN) ./cmd/sluice

# go vet, then every package under the race detector. Tests that need root
# (network namespaces, kernel TUN devices) run when this runs as root and
# skip, saying why, otherwise. The client side, which programs embed on
# laptops, must also build for macOS and Windows.
CLIENT_PKGS := ./pkg/client/... ./pkg/proxy/... ./pkg/expose/... ./relay/... ./netstack/...
test: deps
	$(GO) vet $(PKGS)
	GOOS=darwin GOARCH=arm64 CGO_ENABLED=0 $(GO) build $(CLIENT_PKGS)
	GOOS=windows GOARCH=amd64 CGO_ENABLED=0 $(GO) build $(CLIENT_PKGS)
	$(GO) test -race -count=1 -timeout 8m $(PKGS)

# The Go micro-benchmarks, then (as root on Linux) sluice against the
# classic design it replaces, side by side in network namespaces:
# testdata/bench/compare.sh, which prints the table and writes it into
# BENCH.md. REPS (3) and DUR (10 s a run) set its length; about 13 minutes
# with the defaults on 2 cores.
bench:
	@status=0; \
	$(GO) test -run '^$$' -bench . -benchmem -count 1 $(PKGS) || status=$$?; \
	if [ "$$(id -u)" = 0 ] && [ "$$(uname -s)" = Linux ]; then \
		$(MAKE) --no-print-directory bench-deps && testdata/bench/compare.sh || status=$$?; \
	else \
		echo "bench: the comparison with the classic design needs root on Linux (network namespaces); skipped"; \
	fi; \
	exit $$status

# What the comparison uses beyond Go, from Debian's packages where missing.
bench-deps:
	@missing=""; \
	command -v ip        >/dev/null || missing="$$missing iproute2"; \
	command -v iperf3    >/dev/null || missing="$$missing iperf3"; \
	command -v wg        >/dev/null || missing="$$missing wireguard-tools"; \
	command -v iptables  >/dev/null || missing="$$missing iptables"; \
	command -v conntrack >/dev/null || missing="$$missing conntrack"; \
	command -v nft       >/dev/null || missing="$$missing nftables"; \
	command -v ethtool   >/dev/null || missing="$$missing ethtool"; \
	command -v curl      >/dev/null || missing="$$missing curl"; \
	command -v ping      >/dev/null || missing="$$missing iputils-ping"; \
	command -v jq        >/dev/null || missing="$$missing jq"; \
	command -v python3   >/dev/null || missing="$$missing python3"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing:$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
		else \
			echo "bench-deps: missing:$$missing" >&2; exit 1; \
		fi; \
	fi

run: build
	$(BIN) serve $(RUN_FLAGS)

# What the tests use beyond Go: iproute2 for the namespaces; curl, ping and
# wg (configuring wireguard-go) as clients nobody here wrote; iptables for
# the expose test's origin, which may send nothing but WireGuard. Installed only
# where missing and only as root (CI); elsewhere the tests that need them
# skip.
deps:
	@missing=""; \
	command -v ip   >/dev/null || missing="$$missing iproute2"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	command -v ping >/dev/null || missing="$$missing iputils-ping"; \
	command -v wg   >/dev/null || missing="$$missing wireguard-tools"; \
	command -v iptables >/dev/null || missing="$$missing iptables"; \
	command -v nft  >/dev/null || missing="$$missing nftables"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# Every fuzz target, one after another, each for FUZZTIME on one worker
# (FUZZPARALLEL): testdata/fuzz/run.sh lists them. A crash stops the run
# and leaves its input in the package's testdata/fuzz/, where `make test`
# runs it from then on. See RELIABILITY.md.
FUZZTIME ?= 30s
FUZZPARALLEL ?= 1
fuzz:
	GO=$(GO) FUZZTIME=$(FUZZTIME) FUZZPARALLEL=$(FUZZPARALLEL) testdata/fuzz/run.sh

# The soak for SOAK_DURATION (10m): churn, SYN and connect floods and
# egress exhaustion against one gateway, checking that goroutines,
# descriptors, memory and flows come back after each round and that
# shutdown keeps its grace; then 200 SIGKILLs of a process adding peers.
# `make test` runs the short version of both. See RELIABILITY.md.
SOAK_DURATION ?= 10m
soak:
	SOAK_DURATION=$(SOAK_DURATION) $(GO) test -count=1 -v -timeout 3h -run '^TestSoak$$' ./pkg/gateway
	SOAK_DURATION=$(SOAK_DURATION) $(GO) test -count=1 -v -timeout 30m -run '^TestKillDuringPeerWrites$$' ./pkg/service

clean:
	rm -rf bin
