module gvisor.dev/gvisor

go 1.23.1

require (
	github.com/google/btree v1.1.2
	golang.org/x/sys v0.26.0
	golang.org/x/time v0.7.0
)
