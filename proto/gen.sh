#!/bin/sh
# Regenerates the Go code for the host↔guest protocol into protocol/pb.
# Needs protoc (Debian: protobuf-compiler) and protoc-gen-go v1.36.12:
#   go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
PATH="$(go env GOPATH)/bin:$PATH"
protoc -I proto \
	--go_out=. --go_opt=module=github.com/hyphae-run/hyphae \
	proto/dimension/protocol/v1/protocol.proto
