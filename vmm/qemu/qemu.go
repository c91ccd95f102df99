// Package qemu is the vmm.Machine driver for qemu-system-x86_64. It is what
// boots hyphae VMs on hosts without Firecracker or a working KVM (such as
// CI runners that only have TCG), using the microvm machine type and the
// devices the guest kernel has built in, read from its build configuration
// (kernel.FindConfig): virtio-blk drives and a virtio-serial port as the
// host↔guest channel on virtio-mmio when the kernel has them (Firecracker's
// guest kernels), else NVMe drives and the second 8250 UART, which the
// stock Debian cloud kernel has built in (its virtio drivers are modules).
// Either channel is backed by a Unix socket on the host.
//
// The registry image is never written: the root drive QEMU writes to is a
// qcow2 overlay in the VM's runtime directory whose backing file is the
// image, which QEMU opens read-only. The overlay is created empty (a few
// hundred KiB of qcow2 metadata), grows only by what the guest writes, and
// goes with the runtime directory in Cleanup. A QEMU-internal
// snapshot=on overlay would do the same but hides the file in $TMPDIR
// where neither its size nor its removal after a SIGKILL can be checked.
//
// Graceful stop: QMP system_powerdown needs an ACPI power button handler
// in the guest, which a bare init lacks, so Stop sends Ctrl-Alt-Del through
// QMP send-key to an emulated i8042. hyphae-init turns the kernel's own
// Ctrl-Alt-Del handling off (reboot(CAD_OFF)), so the kernel signals it with
// SIGINT; it forwards SIGTERM to the program, reports its exit and reboots
// (reboot=k), and -no-reboot turns that into QEMU exiting. Seen working
// here under TCG. If the guest does not react, SIGTERM (QEMU exits at once,
// the guest gets no say) and SIGKILL follow, via vmmproc.
package qemu

import (
	"bufio"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/kernel"
	"github.com/hyphae-run/hyphae/vmm"
	"github.com/hyphae-run/hyphae/vmm/vmmproc"
)

// DefaultBinary is the QEMU system emulator used when Options.Binary is
// empty.
const DefaultBinary = "qemu-system-x86_64"

// Files in a VM's runtime directory.
const (
	ConsoleFile = "console.log"
	QMPSocket   = "qmp.sock"
	ChannelSock = "channel.sock"
	OverlayFile = "root-overlay.qcow2"
)

// startTimeout bounds the wait for QEMU's QMP socket when Start's ctx has
// no deadline.
const startTimeout = 30 * time.Second

// Options configure the driver.
type Options struct {
	// Binary is the QEMU system emulator; empty means DefaultBinary.
	Binary string
	// QemuImg creates the root overlay; empty means qemu-img next to
	// Binary, else on PATH.
	QemuImg string
	// KernelSearch are extra directories holding config-<release> files
	// for the kernel (see kernel.FindConfig), e.g. where the registry
	// keeps a fetched kernel's files.
	KernelSearch []string
	// Accel is AccelKVM, AccelTCG or AccelAuto (empty): auto probes KVM
	// with ProbeKVM at Start. Callers that start many VMs should probe once
	// and pass the answer.
	Accel string
	// Logger gets lifecycle events; nil means slog.Default().
	Logger *slog.Logger
}

// Machine is one QEMU microVM. It implements vmm.Machine.
type Machine struct {
	spec vmm.Spec
	opts Options
	log  *slog.Logger
	dir  string
	dev  devices

	mu      sync.Mutex
	proc    *vmmproc.Process
	accel   string
	started time.Time
}

var _ vmm.Machine = (*Machine)(nil)

// New checks spec (vmm.Validate, the kernel's format, socket path lengths),
// chooses the guest's devices from the kernel's configuration and returns
// a machine that is not started yet. Nothing is created on the host.
func New(spec vmm.Spec, opts Options) (*Machine, error) {
	if err := vmm.Validate(spec); err != nil {
		return nil, err
	}
	switch opts.Accel {
	case "", AccelAuto, AccelKVM, AccelTCG:
	default:
		return nil, errcode.New(errcode.InvalidArgument, "accel %q: want auto, kvm or tcg", opts.Accel)
	}
	info, err := kernel.Inspect(spec.Kernel)
	if err != nil {
		return nil, err
	}
	if err := kernel.CheckBootable(info, vmm.QEMU); err != nil {
		return nil, err
	}
	for _, d := range spec.Drives {
		if _, err := os.Stat(d.Path); err != nil {
			return nil, errcode.Wrap(errcode.NotFound, err, "drive %s", d.ID)
		}
	}
	if opts.Binary == "" {
		opts.Binary = DefaultBinary
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	log := opts.Logger.With("vm", spec.ID, "driver", vmm.QEMU)
	dev, err := devicesFor(spec.Kernel, opts.KernelSearch, log)
	if err != nil {
		return nil, err
	}
	if max := dev.virtioDriveSlots(spec); dev.virtioBlk && len(spec.Drives) > max {
		return nil, errcode.New(errcode.InvalidSpec, "%d drives: microvm's virtio-mmio slots leave room for %d virtio drives", len(spec.Drives), max)
	}
	dir := spec.RuntimeDir
	if dir == "" {
		if dir, err = vmmproc.VMDir(spec.ID); err != nil {
			return nil, err
		}
	}
	if dir, err = filepath.Abs(dir); err != nil {
		return nil, errcode.Wrap(errcode.InvalidSpec, err, "runtime_dir")
	}
	spec.RuntimeDir = dir
	for _, s := range []string{QMPSocket, ChannelSock} {
		if err := vmmproc.CheckSocketPath(filepath.Join(dir, s)); err != nil {
			return nil, err
		}
	}
	return &Machine{spec: spec, opts: opts, log: log, dir: dir, dev: dev}, nil
}

func (m *Machine) path(name string) string { return filepath.Join(m.dir, name) }

// Start creates the runtime directory and the root overlay, spawns QEMU and
// returns once its QMP socket answers. On failure it leaves nothing behind.
func (m *Machine) Start(ctx context.Context) (err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.proc != nil {
		return errcode.New(errcode.InvalidArgument, "vm %s was already started", m.spec.ID)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, startTimeout)
		defer cancel()
	}
	accel := m.opts.Accel
	if accel == "" || accel == AccelAuto {
		ok, reason := ProbeKVM(ctx, m.opts.Binary, m.spec.Kernel)
		accel = AccelTCG
		if ok {
			accel = AccelKVM
		}
		m.log.Info("KVM probe", "kvm", ok, "reason", reason)
	}

	if err := vmmproc.PrepareDir(m.dir); err != nil {
		return err
	}
	var proc *vmmproc.Process
	defer func() {
		if err != nil {
			if proc != nil {
				_ = proc.KillWait(cleanupKillWait)
			}
			_ = vmmproc.RemoveDir(m.dir)
		}
	}()
	for _, s := range []string{QMPSocket, ChannelSock} {
		if err := vmmproc.RemoveStaleSocket(m.path(s)); err != nil {
			return err
		}
	}
	l := layout{accel: accel, channelSock: m.path(ChannelSock), qmpSock: m.path(QMPSocket), dev: m.dev}
	root := rootDrive(m.spec)
	if root.ReadOnly {
		// A read-only root needs no writable layer: QEMU opens the image
		// read-only and the guest mounts it ro.
		l.rootFile, l.rootFormat = root.Path, "raw"
	} else {
		l.rootFile, l.rootFormat = m.path(OverlayFile), "qcow2"
		if err := m.createOverlay(ctx, root.Path, l.rootFile); err != nil {
			return err
		}
	}
	if accel == AccelTCG {
		// Under TCG the kernel's TSC calibration against the PIT fails on
		// a busy host, and with no HPET or PM timer on microvm the boot
		// then hangs; TCG's TSC runs at the host's rate, so say so.
		l.tscKHz = hostTSCKHz()
	}
	if m.spec.VsockCID != 0 {
		if _, err := os.Stat("/dev/vhost-vsock"); err == nil {
			l.vsock = true
		}
	}
	argv := args(m.spec, l)
	m.log.Debug("spawning qemu", "argv", argv)
	proc, err = vmmproc.Start(vmmproc.Config{
		Binary:  m.opts.Binary,
		Args:    argv,
		LogPath: m.path(ConsoleFile),
		Logger:  m.log,
	})
	if err != nil {
		return err
	}
	if err := proc.WaitForSocket(ctx, m.path(QMPSocket)); err != nil {
		return err
	}
	m.proc, m.accel, m.started = proc, accel, time.Now()
	m.log.Info("vm started", "pid", proc.PID(), "accel", accel)
	return nil
}

func rootDrive(spec vmm.Spec) vmm.Drive {
	for _, d := range spec.Drives {
		if d.Root {
			return d
		}
	}
	return vmm.Drive{}
}

// createOverlay makes an empty qcow2 whose backing file is the raw image.
func (m *Machine) createOverlay(ctx context.Context, image, overlay string) error {
	abs, err := filepath.Abs(image)
	if err != nil {
		return errcode.Wrap(errcode.InvalidSpec, err, "root drive path")
	}
	tool := m.opts.QemuImg
	if tool == "" {
		tool = "qemu-img"
		if bin, err := exec.LookPath(m.opts.Binary); err == nil {
			if sib := filepath.Join(filepath.Dir(bin), "qemu-img"); fileExists(sib) {
				tool = sib
			}
		}
	}
	if _, err := exec.LookPath(tool); err != nil {
		return errcode.New(errcode.MissingTool, "qemu-img not found").WithHint("install qemu-utils")
	}
	out, err := exec.CommandContext(ctx, tool, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", abs, overlay).CombinedOutput()
	if err != nil {
		return errcode.Wrap(errcode.SpawnFailed, err, "qemu-img create: %s", strings.TrimSpace(string(out)))
	}
	return nil
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// hostTSCKHz reads the host CPU clock from /proc/cpuinfo, or returns 0 when
// it cannot.
func hostTSCKHz() int {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || strings.TrimSpace(k) != "cpu MHz" {
			continue
		}
		mhz, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
		if err != nil || mhz <= 0 {
			return 0
		}
		return int(mhz * 1000)
	}
	return 0
}

func (m *Machine) process() (*vmmproc.Process, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.proc == nil {
		return nil, errcode.New(errcode.VMNotRunning, "vm %s has not been started", m.spec.ID)
	}
	return m.proc, nil
}

// Wait blocks until QEMU exits (the guest rebooted or powered off, or QEMU
// was stopped) or ctx ends.
func (m *Machine) Wait(ctx context.Context) error {
	p, err := m.process()
	if err != nil {
		return err
	}
	return p.Wait(ctx)
}

// Stop asks the guest to shut down with Ctrl-Alt-Del, then escalates to
// SIGTERM and SIGKILL; the whole stop takes at most timeout.
func (m *Machine) Stop(ctx context.Context, timeout time.Duration) error {
	p, err := m.process()
	if err != nil {
		return err
	}
	how, err := p.Stop(ctx, func(ctx context.Context) error { return RequestShutdown(ctx, m.dir) }, timeout)
	if err != nil {
		return err
	}
	m.log.Info("vm stopped", "how", how)
	return nil
}

// Kill ends QEMU at once.
func (m *Machine) Kill() error {
	p, err := m.process()
	if err != nil {
		return err
	}
	return p.Kill()
}

// Console opens the console log: the guest's ttyS0 followed by anything
// QEMU itself printed.
func (m *Machine) Console() (io.ReadCloser, error) {
	f, err := os.Open(m.path(ConsoleFile))
	if err != nil {
		return nil, errcode.Wrap(errcode.VMNotRunning, err, "console of vm %s", m.spec.ID)
	}
	return f, nil
}

// DialChannel connects to the guest's serial channel, retrying until ctx
// ends. QEMU serves one connection at a time on it.
func (m *Machine) DialChannel(ctx context.Context) (net.Conn, error) {
	p, err := m.process()
	if err != nil {
		return nil, err
	}
	var d net.Dialer
	for {
		conn, err := d.DialContext(ctx, "unix", m.path(ChannelSock))
		if err == nil {
			return conn, nil
		}
		select {
		case <-ctx.Done():
			return nil, errcode.Wrap(errcode.ChannelFailed, errors.Join(ctx.Err(), err), "dial channel of vm %s", m.spec.ID)
		case <-p.Done():
			return nil, errcode.New(errcode.ChannelFailed, "vm %s exited before its channel opened", m.spec.ID)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Info describes the machine.
func (m *Machine) Info() vmm.Info {
	m.mu.Lock()
	defer m.mu.Unlock()
	info := vmm.Info{
		ID: m.spec.ID, Driver: vmm.QEMU, State: vmm.StateCreated,
		RuntimeDir: m.dir, ConsolePath: m.path(ConsoleFile), Spec: m.spec, StartedAt: m.started,
	}
	if m.proc != nil {
		info.PID = m.proc.PID()
		info.State = vmm.StateRunning
		if m.proc.Exited() {
			info.State = vmm.StateExited
		}
	}
	return info
}

// Identity returns what identifies the QEMU process across hyphae
// restarts, for the registry; ok is false before Start.
func (m *Machine) Identity() (vmmproc.Identity, bool) {
	p, err := m.process()
	if err != nil {
		return vmmproc.Identity{}, false
	}
	return p.Identity(), true
}

// Accel returns the accelerator the machine was started with.
func (m *Machine) Accel() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.accel
}

// cleanupKillWait bounds how long Start's rollback and Cleanup wait for a
// QEMU they had to kill.
const cleanupKillWait = 5 * time.Second

// Cleanup kills QEMU if it still runs and removes the runtime directory
// (sockets, console log, root overlay). It is idempotent.
func (m *Machine) Cleanup() error {
	m.mu.Lock()
	p := m.proc
	m.mu.Unlock()
	if p != nil && !p.Exited() {
		if err := p.KillWait(cleanupKillWait); err != nil {
			return errcode.Wrap(errcode.StopFailed, err, "qemu of vm %s", m.spec.ID)
		}
	}
	return vmmproc.RemoveDir(m.dir)
}
