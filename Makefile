# sluice: a VPN gateway that runs entirely in user space.

GO      ?= go
BIN     := bin/sluice
PKGS    := ./...
# Flags for `make run`: none, a WireGuard server as the current user.
RUN_FLAGS ?=

.PHONY: all build test bench run deps clean

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags='-s -w' -o $(BIN) ./cmd/sluice

# go vet, then every package under the race detector. Tests that need root
# (network namespaces, kernel TUN devices) run when this runs as root and
# skip, saying why, otherwise.
test: deps
	$(GO) vet $(PKGS)
	$(GO) test -race -count=1 -timeout 8m $(PKGS)

bench:
	$(GO) test -run '^$$' -bench . -benchmem -count 1 $(PKGS)

run: build
	$(BIN) serve $(RUN_FLAGS)

# What the tests use beyond Go: iproute2 for the namespaces; curl, ping and
# wg (configuring wireguard-go) as clients nobody here wrote. Installed only
# where missing and only as root (CI); elsewhere the tests that need them
# skip.
deps:
	@missing=""; \
	command -v ip   >/dev/null || missing="$$missing iproute2"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	command -v ping >/dev/null || missing="$$missing iputils-ping"; \
	command -v wg   >/dev/null || missing="$$missing wireguard-tools"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

clean:
	rm -rf bin
