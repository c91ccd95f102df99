// Package vmm defines what hyphae asks of a virtual machine monitor: a
// Spec describing one microVM and the Machine interface every driver
// (vmm/firecracker, vmm/qemu) implements. The rest of hyphae and dimension
// talks to VMs only through these types.
package vmm

import (
	"context"
	"io"
	"net"
	"time"
)

// Driver names.
const (
	Firecracker = "firecracker"
	QEMU        = "qemu"
)

// DefaultChannelPort is the guest vsock port the host connects to (§3.2).
const DefaultChannelPort = 1024

// Drive is a block device given to the guest.
type Drive struct {
	ID       string `json:"id"`
	Path     string `json:"path"`
	Root     bool   `json:"root,omitempty"`
	ReadOnly bool   `json:"read_only,omitempty"`
}

// NetworkInterface is a TAP device handed to the guest.
type NetworkInterface struct {
	ID      string `json:"id"`
	TapName string `json:"tap_name"`
	MAC     string `json:"mac"`
}

// Spec describes one microVM. The root drive is a registry image and is
// never written: each driver gives the guest a private writable layer.
type Spec struct {
	ID        string             `json:"id"`
	VCPUs     int                `json:"vcpus"`
	MemoryMiB int                `json:"memory_mib"`
	Kernel    string             `json:"kernel"`
	BootArgs  string             `json:"boot_args,omitempty"`
	Drives    []Drive            `json:"drives"`
	Network   []NetworkInterface `json:"network,omitempty"`
	// VsockCID is the guest's vsock context id (≥ 3) where the channel is
	// vsock.
	VsockCID uint32 `json:"vsock_cid,omitempty"`
	// ChannelPort is the guest port of the host↔guest channel.
	ChannelPort uint32 `json:"channel_port,omitempty"`
	// RuntimeDir holds the VM's sockets, console log and writable layer; it
	// is removed when the VM is cleaned up.
	RuntimeDir string `json:"runtime_dir"`
}

// State is a machine's lifecycle state.
type State string

// States.
const (
	StateCreated State = "created"
	StateRunning State = "running"
	StateExited  State = "exited"
)

// Info describes a machine for listings and inspection.
type Info struct {
	ID          string    `json:"id"`
	Driver      string    `json:"driver"`
	PID         int       `json:"pid"`
	State       State     `json:"state"`
	StartedAt   time.Time `json:"started_at"`
	RuntimeDir  string    `json:"runtime_dir"`
	ConsolePath string    `json:"console_path"`
	Spec        Spec      `json:"spec"`
}

// Machine is one microVM managed by a driver.
type Machine interface {
	// Start spawns the VMM and boots the guest. It returns once the VMM
	// is ready and the guest has been started, not when the guest program
	// is up.
	Start(ctx context.Context) error
	// Wait blocks until the VMM process exits or ctx ends.
	Wait(ctx context.Context) error
	// Stop asks the guest to shut down, then escalates to SIGTERM and
	// SIGKILL, each step bounded; the whole stop takes at most timeout.
	Stop(ctx context.Context, timeout time.Duration) error
	// Kill ends the VMM at once.
	Kill() error
	// Console returns a reader over the console log from its beginning.
	Console() (io.ReadCloser, error)
	// DialChannel opens the host↔guest byte stream, retrying until ctx
	// ends.
	DialChannel(ctx context.Context) (net.Conn, error)
	// Info describes the machine.
	Info() Info
	// Cleanup removes what the machine left on the host (runtime dir,
	// writable layer). It is idempotent and safe after Kill.
	Cleanup() error
}
