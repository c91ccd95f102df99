package runner

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/kernel"
	"github.com/hyphae-run/hyphae/vm"
	"github.com/hyphae-run/hyphae/vmm"
	"github.com/hyphae-run/hyphae/vmm/firecracker"
	"github.com/hyphae-run/hyphae/vmm/qemu"
	"github.com/hyphae-run/hyphae/vmm/vmmproc"
)

// VMOptions configure the microVM backend.
type VMOptions struct {
	// VMM is auto (default), firecracker or qemu; see vm.Runtime.ChooseDriver.
	VMM string
	// Kernel is the guest kernel's path (DIMENSION_KERNEL_PATH); empty
	// means the one scripts/fetch-kernel.sh caches in
	// kernel.DefaultCacheDir.
	Kernel string
	// QEMUBinary and FirecrackerBinary name the VMMs (the drivers'
	// defaults when empty).
	QEMUBinary, FirecrackerBinary string
	// VCPUs and MemoryMiB size VMs whose manifest names no resources
	// (vm.DefaultVCPUs, vm.DefaultMemoryMiB when 0).
	VCPUs, MemoryMiB int
	// BootArgs are appended to every guest's kernel command line.
	BootArgs string
	// Owner names the gateway whose VMs these are, unique on the host
	// (dimension-server passes its data dir, made absolute here). Every
	// VM's runtime dir records it with the VMM's identity, and
	// ReapOrphanVMs sweeps only the dirs that name it. Empty leaves the
	// dirs unmarked and makes ReapOrphanVMs a no-op.
	Owner string
	// Logger receives diagnostics (nil = slog.Default()).
	Logger *slog.Logger
}

// consoleTailBytes is how much of the console a failure carries.
const consoleTailBytes = 4096

// maxReadinessJunk bounds the bytes skipped while waiting for the agent's
// readiness frame on a serial channel (line noise before the port opens).
const maxReadinessJunk = 4096

// VMBackend boots each run in a fresh microVM from the bundle's image with
// a private writable layer (the drivers' overlay or scratch disk): the
// registry image is never written.
type VMBackend struct {
	opts   VMOptions
	log    *slog.Logger
	choice vm.Choice
	kernel string
	owner  string

	mu   sync.Mutex      // guards live
	live map[string]bool // ids of the VMs this process runs now
}

var _ Backend = (*VMBackend)(nil)

// NewVMBackend chooses the driver once (probing KVM, which can take a few
// seconds) and checks that the kernel is one it can boot.
func NewVMBackend(ctx context.Context, o VMOptions) (*VMBackend, error) {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	owner := o.Owner
	if owner != "" {
		abs, err := filepath.Abs(owner)
		if err != nil {
			return nil, errcode.Wrap(errcode.InvalidArgument, err, "vm backend owner %q", owner)
		}
		owner = abs
	}
	o.VCPUs = orDefaultInt(o.VCPUs, vm.DefaultVCPUs)
	o.MemoryMiB = orDefaultInt(o.MemoryMiB, vm.DefaultMemoryMiB)
	rt := vm.New(vm.Options{Logger: o.Logger, QEMUBinary: o.QEMUBinary, FirecrackerBinary: o.FirecrackerBinary})
	choice, err := rt.ChooseDriver(ctx, o.VMM)
	if err != nil {
		return nil, err
	}
	ref := o.Kernel
	if ref == "" {
		ref = filepath.Join(kernel.DefaultCacheDir, kernel.CurrentLink)
	}
	k, err := rt.ResolveKernel(ctx, ref, choice.Driver)
	if err != nil {
		return nil, err
	}
	o.Logger.Info("vm backend ready", "driver", choice.Driver, "accel", choice.Accel, "reason", choice.Reason, "kernel", k.Path)
	return &VMBackend{opts: o, log: o.Logger, choice: choice, kernel: k.Path, owner: owner, live: map[string]bool{}}, nil
}

// Name is the driver: "qemu" or "firecracker".
func (b *VMBackend) Name() string { return b.choice.Driver }

// Mock is false.
func (b *VMBackend) Mock() bool { return false }

// Start boots a VM and connects its channel, retrying until ctx ends. On
// QEMU's channel (a UART or a virtio-serial port) it also waits for the
// agent's readiness frame (bytes sent before the guest opens the port are
// lost); on vsock the accepted connection is the readiness.
func (b *VMBackend) Start(ctx context.Context, req BootRequest) (Session, error) {
	if len(req.Entrypoint) > 0 {
		return nil, errcode.New(errcode.InvalidManifest, "run %s: the manifest overrides the entrypoint, which a VM cannot honour", req.RunID).
			WithHint("build the image with that entrypoint (hyphae build --entrypoint) instead")
	}
	id, err := shortID()
	if err != nil {
		return nil, err
	}
	dir, err := vmmproc.VMDir(id)
	if err != nil {
		return nil, err
	}
	release := b.track(id)
	args := []string{"quiet"}
	if b.opts.BootArgs != "" {
		args = append(args, b.opts.BootArgs)
	}
	spec := vmm.Spec{
		ID:          id,
		VCPUs:       orDefaultInt(req.VCPUs, b.opts.VCPUs),
		MemoryMiB:   orDefaultInt(req.MemoryMiB, b.opts.MemoryMiB),
		Kernel:      b.kernel,
		BootArgs:    strings.Join(args, " "),
		Drives:      []vmm.Drive{{ID: "root", Path: req.ImagePath, Root: true}},
		ChannelPort: vmm.DefaultChannelPort,
		RuntimeDir:  dir,
	}
	log := b.log.With("run", req.RunID)
	var m vmm.Machine
	switch b.choice.Driver {
	case vmm.QEMU:
		m, err = qemu.New(spec, qemu.Options{Binary: b.choice.Binary, Accel: b.choice.Accel, Logger: log})
	case vmm.Firecracker:
		// Hybrid vsock over a per-VM Unix socket: the CID only has to be a
		// valid guest CID, not unique on the host.
		spec.VsockCID = 3
		m, err = firecracker.New(spec, firecracker.Options{Binary: b.choice.Binary, Logger: log})
	default:
		err = errcode.New(errcode.VMMUnavailable, "unknown driver %q", b.choice.Driver)
	}
	if err != nil {
		release()
		return nil, err
	}
	s := &vmSession{m: m, console: m.Info().ConsolePath, release: release}
	fail := func(err error) (Session, error) {
		tail := s.ConsoleTail()
		_ = s.Close()
		if ctx.Err() != nil {
			err = errors.Join(ctx.Err(), err)
		}
		return nil, errcode.Wrap(errcode.BootFailed, err, "run %s: vm %s did not become ready; its console ends:\n%s", req.RunID, id, tail)
	}
	// Marked before the VMM exists, so that a gateway dying during the
	// boot leaves a dir its successor removes; the VMM's identity is added
	// once Start returns (QEMU's QMP, Firecracker's API is up). A death
	// before that leaves only the VMM's binary on record, and the sweep
	// finds the VMM by its command line, which names this dir.
	own := vmOwner{ID: id, Run: req.RunID, VMM: vmmproc.Identity{Binary: filepath.Base(b.choice.Binary)}}
	if err := b.markOwned(dir, own); err != nil {
		return fail(err)
	}
	log.Info("booting vm", "vm", id, "driver", b.choice.Driver, "accel", b.choice.Accel, "image", req.ImagePath)
	if err := m.Start(ctx); err != nil {
		return fail(err)
	}
	if im, ok := m.(identifier); ok {
		own.VMM, _ = im.Identity()
	}
	if err := b.markOwned(dir, own); err != nil {
		return fail(err)
	}
	conn, err := m.DialChannel(ctx)
	if err != nil {
		return fail(err)
	}
	s.conn = conn
	if b.choice.Driver == vmm.QEMU {
		if err := awaitReadiness(ctx, conn); err != nil {
			return fail(err)
		}
	}
	return s, nil
}

// awaitReadiness reads up to the agent's readiness frame (one zero byte,
// protocol.EmptyFrame), byte by byte so that nothing after it is consumed.
func awaitReadiness(ctx context.Context, conn net.Conn) error {
	stop := context.AfterFunc(ctx, func() { _ = conn.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	var b [1]byte
	for range maxReadinessJunk {
		if _, err := io.ReadFull(conn, b[:]); err != nil {
			if ctx.Err() != nil {
				return errcode.Wrap(errcode.ChannelFailed, ctx.Err(), "waiting for the agent's readiness frame")
			}
			return errcode.Wrap(errcode.ChannelFailed, err, "waiting for the agent's readiness frame (the guest ended or the channel closed)")
		}
		if b[0] == 0 {
			_ = conn.SetReadDeadline(time.Time{})
			return nil
		}
	}
	return errcode.New(errcode.ProtocolViolation, "no readiness frame within the first %d bytes of the channel", maxReadinessJunk)
}

// vmSession is one booted VM.
type vmSession struct {
	m       vmm.Machine
	console string
	conn    net.Conn
	release func() // forgets the VM in its backend's live set
	once    sync.Once
	err     error
}

func (s *vmSession) Conn() io.ReadWriter { return s.conn }

func (s *vmSession) Stop(ctx context.Context, timeout time.Duration) error {
	return s.m.Stop(ctx, timeout)
}

func (s *vmSession) Kill() error { return s.m.Kill() }

func (s *vmSession) ConsoleTail() string { return vmmproc.Tail(s.console, consoleTailBytes) }

// Close kills the VMM if it still runs and removes its runtime directory,
// writable layer included.
func (s *vmSession) Close() error {
	s.once.Do(func() {
		if s.conn != nil {
			_ = s.conn.Close()
		}
		s.err = s.m.Cleanup()
		s.release()
	})
	return s.err
}

// shortID names a VM: run ids can be 128 bytes, too long for the socket
// paths under its runtime directory.
func shortID() (string, error) {
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", errcode.Wrap(errcode.SpawnFailed, err, "making a vm id")
	}
	return "run-" + hex.EncodeToString(b[:]), nil
}

func orDefaultInt(v, def int) int {
	if v > 0 {
		return v
	}
	return def
}
