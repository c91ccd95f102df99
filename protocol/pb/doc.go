// Package pb holds the Go types generated from
// proto/dimension/protocol/v1/protocol.proto, the host↔guest protocol
// (package dimension.protocol). Regenerate with proto/gen.sh; never edit
// protocol.pb.go by hand.
package pb
