package runner

import (
	"context"
	"io"
	"time"
)

// BootRequest is what a Backend needs to start one run's sandbox.
type BootRequest struct {
	// RunID names the run (and the VM, in logs and runtime paths).
	RunID string
	// ImagePath is the bundle's registry ext4 image. It is never written.
	ImagePath string
	// VCPUs and MemoryMiB size the VM (0 = the backend's default).
	VCPUs, MemoryMiB int
	// Entrypoint, when set, replaces the image's own (the manifest's
	// override). Backends that cannot honour it refuse the run.
	Entrypoint []string
}

// Backend starts sandboxes that run dimension-agent: microVMs, or host
// processes in mock mode. It is safe for concurrent use.
type Backend interface {
	// Start boots a sandbox for req and returns once its host↔guest
	// channel is connected and the agent is ready for the Request. It
	// gives up when ctx ends (the boot deadline). On failure nothing is
	// left behind and the error carries what the sandbox printed (the
	// console tail).
	Start(ctx context.Context, req BootRequest) (Session, error)
	// Name is the sandbox kind, put into events as attribute "vmm":
	// "qemu", "firecracker" or "mock".
	Name() string
	// Mock reports whether runs are host processes rather than VMs.
	Mock() bool
}

// Session is one started sandbox.
type Session interface {
	// Conn is the connected, ready host↔guest byte stream.
	Conn() io.ReadWriter
	// Stop shuts the sandbox down gracefully, then forcibly, within
	// timeout.
	Stop(ctx context.Context, timeout time.Duration) error
	// Kill ends the sandbox at once.
	Kill() error
	// ConsoleTail is the end of what the sandbox printed (the VM console,
	// or the mock agent's stderr), for diagnosing failures.
	ConsoleTail() string
	// Close tears the sandbox down: the VM or process is killed, its
	// runtime directory and writable layer removed, the channel closed.
	// It is idempotent.
	Close() error
}
