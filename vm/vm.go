// Package vm runs registry images as microVMs and keeps track of them: it
// picks a driver (vmm/firecracker or vmm/qemu), resolves the guest kernel,
// turns an image plus run options into a vmm.Spec, records every VM in the
// registry, supervises foreground runs (console streaming, exit status,
// timeouts, graceful stop, teardown), leaves detached VMs running, stops
// and reads the logs of VMs started by another hyphae process, and
// reconciles the registry with the processes that really run.
//
// Rows exist only for VMs that are starting or running: teardown (at the
// end of a foreground run, on Stop, or by Reconcile once a detached VM has
// exited) removes the runtime directory, with the writable layer in it,
// and deletes the row. So `hyphae list vms` never shows a VM that is not
// there; the exit status of a foreground run is what `hyphae run` returns.
//
// A process is only ever signalled after its identity (PID, kernel start
// time and binary, vmmproc.Identity) has been checked, so a PID reused by
// another program is never killed.
//
// A networked VM (RunOptions.Network) gets its lease, TAP and rules from
// the Network backend after every input was validated and its row was
// recorded, and before its VMM is spawned; every teardown path above also
// tears its network down, and a networked start first reclaims what VMs
// that are gone left in the namespace. A jailed VM (RunOptions.Jail) runs
// Firecracker under its jailer; its row and owner file record the jail,
// so that Stop and Reconcile in another process find its API socket and
// remove the jail.
package vm

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/registry"
	"github.com/hyphae-run/hyphae/vmm"
	"github.com/hyphae-run/hyphae/vmm/firecracker"
	"github.com/hyphae-run/hyphae/vmm/qemu"
	"github.com/hyphae-run/hyphae/vmm/vmmproc"
)

// Options configure a Runtime.
type Options struct {
	// Registry holds images, kernels and VM rows. Required for everything
	// but driver choice.
	Registry *registry.Registry
	// Logger gets lifecycle events; nil means slog.Default().
	Logger *slog.Logger
	// QEMUBinary and FirecrackerBinary name the VMMs (the drivers'
	// defaults when empty).
	QEMUBinary, FirecrackerBinary string
	// NetworkPool is the IPv4 CIDR networked VMs get their /30 from
	// (network.DefaultPool when empty).
	NetworkPool string
	// Network, when set, replaces the default network backend (a
	// network.Manager over the registry's allocations in hyphae's own
	// network namespace); NetworkPool is then unused.
	Network Network
}

// Runtime runs and tracks VMs. It is safe for concurrent use.
type Runtime struct {
	reg    *registry.Registry
	log    *slog.Logger
	qemu   string
	fc     string
	kvm    *kvmProbe
	selfID vmmproc.Identity

	netPool string
	netMu   sync.Mutex // guards net
	net     Network
}

// New returns a Runtime.
func New(o Options) *Runtime {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.QEMUBinary == "" {
		o.QEMUBinary = qemu.DefaultBinary
	}
	if o.FirecrackerBinary == "" {
		o.FirecrackerBinary = firecracker.DefaultBinary
	}
	return &Runtime{reg: o.Registry, log: o.Logger, qemu: o.QEMUBinary, fc: o.FirecrackerBinary,
		kvm: &kvmProbe{}, selfID: selfIdentity(), netPool: o.NetworkPool, net: o.Network}
}

func (rt *Runtime) registry() (*registry.Registry, error) {
	if rt.reg == nil {
		return nil, errcode.New(errcode.InvalidArgument, "vm runtime has no registry")
	}
	return rt.reg, nil
}

// selfIdentity identifies this process, so that Reconcile can tell a VM
// whose start is in progress from one whose starter died.
func selfIdentity() vmmproc.Identity {
	pid := os.Getpid()
	ticks, _ := vmmproc.StartTicks(pid)
	bin := ""
	if exe, err := os.Readlink("/proc/self/exe"); err == nil {
		bin = filepath.Base(exe)
	}
	return vmmproc.Identity{PID: pid, StartTicks: ticks, Binary: bin}
}

// Details is what the registry's spec column holds for a VM: the spec it
// was started with and what finding and describing its VMM later needs.
type Details struct {
	Spec vmm.Spec `json:"spec"`
	// Binary is the VMM executable's base name (vmmproc.Identity.Binary).
	Binary string `json:"vmm_binary"`
	// Accel is QEMU's accelerator (kvm or tcg).
	Accel string `json:"accel,omitempty"`
	// Kernel is the kernel as resolved: its registry name, else its path.
	Kernel string `json:"kernel"`
	// Supervisor is the hyphae process that started the VM. While the row
	// is still "created" a live supervisor means the start is in progress.
	Supervisor vmmproc.Identity `json:"supervisor"`
	// Detached is set once the starter let the VM run on without it.
	Detached bool `json:"detached"`
	// Network is the VM's lease and filter settings, when it has one.
	Network *NetworkDetails `json:"network,omitempty"`
	// Jail is how Firecracker was jailed, when it was.
	Jail *JailDetails `json:"jail,omitempty"`
}

func detailsOf(row registry.VM) Details {
	var d Details
	// A row written by another tool may hold a bare spec or nothing.
	if err := json.Unmarshal(row.Spec, &d); err != nil || d.Spec.ID == "" {
		_ = json.Unmarshal(row.Spec, &d.Spec)
	}
	return d
}

func (d Details) identity(row registry.VM) vmmproc.Identity {
	return vmmproc.Identity{PID: row.PID, StartTicks: row.ProcStartTicks, Binary: d.Binary}
}

// Status describes a VM for listings and inspection.
type Status struct {
	ID          string     `json:"id"`
	Image       string     `json:"image"`
	ImageDigest string     `json:"image_digest"`
	Driver      string     `json:"driver"`
	Accel       string     `json:"accel,omitempty"`
	Kernel      string     `json:"kernel"`
	State       string     `json:"state"`
	PID         int        `json:"pid"`
	Detached    bool       `json:"detached"`
	CreatedAt   time.Time  `json:"created_at"`
	StartedAt   *time.Time `json:"started_at,omitempty"`
	// UptimeSeconds is how long the VM has been running.
	UptimeSeconds float64  `json:"uptime_seconds"`
	RuntimeDir    string   `json:"runtime_dir"`
	ConsolePath   string   `json:"console_path"`
	Spec          vmm.Spec `json:"spec"`
	// Network is the VM's lease and filter settings (nil without
	// --network).
	Network *NetworkDetails `json:"network,omitempty"`
	// Jailed says Firecracker runs under its jailer.
	Jailed bool `json:"jailed"`
}

func statusOf(row registry.VM) Status {
	d := detailsOf(row)
	s := Status{
		ID: row.ID, Image: row.ImageRef, ImageDigest: row.ImageDigest, Driver: row.Driver, Accel: d.Accel,
		Kernel: d.Kernel, State: row.State, PID: row.PID, Detached: d.Detached, CreatedAt: row.CreatedAt,
		StartedAt: row.StartedAt, RuntimeDir: row.RuntimeDir, ConsolePath: row.ConsolePath, Spec: d.Spec,
		Network: d.Network, Jailed: d.Jail != nil,
	}
	if row.StartedAt != nil && row.State == registry.VMRunning {
		s.UptimeSeconds = time.Since(*row.StartedAt).Seconds()
	}
	return s
}

// newID returns a fresh VM id: 12 hex digits, valid as a Firecracker
// instance id and a path element.
func newID() (string, error) {
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", errcode.Wrap(errcode.SpawnFailed, err, "generate a VM id")
	}
	return hex.EncodeToString(b[:]), nil
}

// ownerFile marks a runtime directory as one of this registry's VMs, for
// orphan recovery: a directory without it, or naming another home, is
// never touched.
const ownerFile = "hyphae-vm.json"

type owner struct {
	Home string           `json:"home"`
	ID   string           `json:"id"`
	VMM  vmmproc.Identity `json:"vmm"`
	// Jail lets orphan cleanup remove the jail of a VM whose row is gone.
	Jail *JailDetails `json:"jail,omitempty"`
}

func writeOwner(dir string, o owner) error { return vmmproc.WriteOwnerFile(dir, ownerFile, o) }

// readOwner reads dir's owner file through vmmproc.ReadOwnerFile, which
// refuses symlinks and other users' files: the runtime root may be a
// shared /tmp.
func readOwner(dir string) (owner, bool) {
	var o owner
	if err := vmmproc.ReadOwnerFile(dir, ownerFile, &o); err != nil || o.ID == "" {
		return owner{}, false
	}
	return o, true
}
