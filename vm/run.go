package vm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
	"github.com/hyphae-run/hyphae/network"
	"github.com/hyphae-run/hyphae/registry"
	"github.com/hyphae-run/hyphae/vmm"
	"github.com/hyphae-run/hyphae/vmm/firecracker"
	"github.com/hyphae-run/hyphae/vmm/qemu"
	"github.com/hyphae-run/hyphae/vmm/vmmproc"
)

// Defaults for a run whose image and options name no resources.
const (
	DefaultVCPUs     = 1
	DefaultMemoryMiB = 256
	// DefaultStopTimeout bounds a graceful stop (Ctrl-Alt-Del, then
	// SIGTERM, then SIGKILL).
	DefaultStopTimeout = 10 * time.Second
)

// RunOptions describe one run.
type RunOptions struct {
	// Image is name[:tag], a digest or a digest prefix.
	Image string
	// Kernel is a registered name or a path; empty means the driver's
	// default.
	Kernel string
	// VMM is auto (default), firecracker or qemu.
	VMM       string
	VCPUs     int
	MemoryMiB int
	// BootArgs are appended to the kernel command line (they can override
	// the driver's, e.g. loglevel=7 over quiet).
	BootArgs string
	// Env reaches the program as hyphae.env. tokens on the kernel command
	// line, which the guest can read: never put secrets here.
	Env []guest.EnvVar
	// Network gives the guest a TAP with an address from the pool and,
	// unless NoNAT, outbound NAT. The guest cannot reach the host itself
	// or private ranges, except what Allow lets through.
	Network bool
	NoNAT   bool
	Allow   []network.Allow
	// Jail runs Firecracker under its jailer as the dedicated system user
	// (firecracker.DefaultJailUser); other drivers refuse it.
	Jail bool
}

// machine is what the runtime needs of a driver's Machine.
type machine interface {
	vmm.Machine
	Identity() (vmmproc.Identity, bool)
}

// VM is a VM this process started.
type VM struct {
	rt      *Runtime
	m       machine
	row     registry.VM
	details Details
	// Timing of Start, for the benchmark.
	Began, Spawned time.Time
}

// ID returns the VM's id.
func (v *VM) ID() string { return v.row.ID }

// Info describes the VM as its driver sees it.
func (v *VM) Info() vmm.Info { return v.m.Info() }

// Status returns the VM's row as a Status.
func (v *VM) Status() Status { return statusOf(v.row) }

// Start resolves o into a spec, records the VM (state created), gives it
// its network when o.Network, boots it and marks it running with its VMM's
// identity. Every bad input is refused before anything is set up; a failed
// network setup spawns nothing; a failed start leaves no process, runtime
// directory, TAP, rule, lease or row behind.
func (rt *Runtime) Start(ctx context.Context, o RunOptions) (*VM, error) {
	began := time.Now()
	reg, err := rt.registry()
	if err != nil {
		return nil, err
	}
	if err := checkNetworkOptions(o); err != nil {
		return nil, err
	}
	if _, err := rt.Reconcile(ctx); err != nil {
		rt.log.Warn("reconcile before run failed", "err", err)
	}
	img, err := reg.LookupImage(ctx, o.Image)
	if err != nil {
		return nil, err
	}
	var (
		choice Choice
		kern   ResolvedKernel
	)
	if o.VMM == vmm.QEMU || o.VMM == vmm.Firecracker {
		// A kernel the requested VMM cannot boot is the more useful error
		// than a missing VMM binary.
		if kern, err = rt.ResolveKernel(ctx, o.Kernel, o.VMM); err != nil {
			return nil, err
		}
		if choice, err = rt.ChooseDriver(ctx, o.VMM); err != nil {
			return nil, err
		}
	} else {
		if choice, err = rt.ChooseDriver(ctx, o.VMM); err != nil {
			return nil, err
		}
		if kern, err = rt.ResolveKernel(ctx, o.Kernel, choice.Driver); err != nil {
			return nil, err
		}
	}
	jail, err := rt.jailFor(o, choice)
	if err != nil {
		return nil, err
	}
	var nw Network
	if o.Network {
		if nw, err = rt.network(); err != nil {
			return nil, err
		}
	}
	id, err := newID()
	if err != nil {
		return nil, err
	}
	dir, err := vmmproc.VMDir(id)
	if err != nil {
		return nil, err
	}
	spec := vmm.Spec{
		ID:         id,
		VCPUs:      firstNonZero(o.VCPUs, img.VCPUs, DefaultVCPUs),
		MemoryMiB:  firstNonZero(o.MemoryMiB, img.MemoryMiB, DefaultMemoryMiB),
		Kernel:     kern.Path,
		BootArgs:   bootArgs(o),
		Drives:     []vmm.Drive{{ID: "root", Path: img.Path, Root: true}},
		RuntimeDir: dir,
	}
	// The driver validates the spec here, before the network exists; a
	// networked VM gets its final machine once the NIC is in the spec.
	m, err := rt.newMachine(spec, choice, jail)
	if err != nil {
		return nil, err
	}
	if nw != nil {
		// What VMs that are gone left in the namespace goes before this
		// one takes a lease.
		if err := rt.reclaimNetwork(ctx, nw); err != nil {
			rt.log.Warn("reclaiming the networks of gone VMs failed", "err", err)
		}
	}
	info := m.Info()
	d := Details{Spec: info.Spec, Binary: baseName(choice.Binary), Accel: choice.Accel, Kernel: kern.Name, Supervisor: rt.selfID, Jail: jail}
	row := registry.VM{ID: id, ImageDigest: img.Digest, ImageRef: img.Ref(), Driver: choice.Driver, State: registry.VMCreated,
		RuntimeDir: info.RuntimeDir, ConsolePath: info.ConsolePath}
	if row.Spec, err = json.Marshal(d); err != nil {
		return nil, errcode.Wrap(errcode.InvalidSpec, err, "encode VM details")
	}
	// The row comes before the lease, so that another process's
	// Reconcile or Reclaim sees this VM as live while it has one.
	if err := reg.PutVM(ctx, row); err != nil {
		return nil, err
	}
	v := &VM{rt: rt, m: m, row: row, details: d, Began: began}
	fail := func(err error) (*VM, error) {
		v.teardown(context.WithoutCancel(ctx))
		return nil, err
	}
	if nw != nil {
		if v.details.Network, err = rt.attachNetwork(ctx, nw, &spec, o, choice, jail); err != nil {
			return fail(err)
		}
		if m, err = rt.newMachine(spec, choice, jail); err != nil {
			return fail(err)
		}
		v.m = m
		v.details.Spec = m.Info().Spec
		if err := v.saveDetails(ctx, nil); err != nil {
			return fail(err)
		}
	}
	if err := vmmproc.PrepareDir(info.RuntimeDir); err != nil {
		return fail(err)
	}
	if err := writeOwner(info.RuntimeDir, owner{Home: reg.Home(), ID: id, Jail: jail}); err != nil {
		return fail(err)
	}
	rt.log.Info("starting vm", "id", id, "image", img.Ref(), "driver", choice.Driver, "accel", choice.Accel, "kernel", kern.Name,
		"network", v.details.Network != nil, "jail", jail != nil)
	if err := m.Start(ctx); err != nil {
		return fail(err)
	}
	v.Spawned = time.Now()
	ident, _ := m.Identity()
	if err := writeOwner(info.RuntimeDir, owner{Home: reg.Home(), ID: id, VMM: ident, Jail: jail}); err != nil {
		return fail(err)
	}
	now := time.Now()
	// The identity names the binary as the kernel sees it (symlinks
	// resolved), which is what a later IsSame compares against.
	v.details.Binary = ident.Binary
	err = v.saveDetails(ctx, func(r *registry.VM) {
		r.State, r.PID, r.ProcStartTicks, r.StartedAt = registry.VMRunning, ident.PID, ident.StartTicks, &now
	})
	if err != nil {
		return fail(err)
	}
	return v, nil
}

// saveDetails writes v.details, and whatever change makes, into the row.
func (v *VM) saveDetails(ctx context.Context, change func(*registry.VM)) error {
	b, err := json.Marshal(v.details)
	if err != nil {
		return errcode.Wrap(errcode.InvalidSpec, err, "encode VM details")
	}
	return v.rt.reg.UpdateVM(ctx, v.row.ID, func(r *registry.VM) error {
		r.Spec = b
		if change != nil {
			change(r)
		}
		v.row = *r
		return nil
	})
}

// bootArgs renders the run's environment as hyphae.env. tokens, then the
// caller's own arguments. quiet keeps the kernel's boot messages off the
// console (the QEMU driver sets it too; Firecracker's base line does not).
func bootArgs(o RunOptions) string {
	parts := []string{"quiet"}
	if env := guest.EncodeCmdlineEnv(o.Env); env != "" {
		parts = append(parts, env)
	}
	if o.BootArgs != "" {
		parts = append(parts, o.BootArgs)
	}
	return strings.Join(parts, " ")
}

func firstNonZero(v ...int) int {
	for _, n := range v {
		if n != 0 {
			return n
		}
	}
	return 0
}

func (rt *Runtime) newMachine(spec vmm.Spec, c Choice, jail *JailDetails) (machine, error) {
	switch c.Driver {
	case vmm.QEMU:
		return qemu.New(spec, qemu.Options{Binary: c.Binary, Accel: c.Accel, KernelSearch: rt.kernelSearch(spec.Kernel), Logger: rt.log})
	case vmm.Firecracker:
		o := firecracker.Options{Binary: c.Binary, Logger: rt.log}
		if jail != nil {
			j := jail.options()
			o.Jail = &j
		}
		return firecracker.New(spec, o)
	}
	return nil, errcode.New(errcode.VMMUnavailable, "unknown driver %q", c.Driver)
}

// Detach lets the VM run on after this process exits: its VMM is in its
// own process group already; the row records that nobody supervises it,
// and its teardown is left to Stop or to Reconcile once it has exited.
func (v *VM) Detach(ctx context.Context) error {
	return v.rt.reg.UpdateVM(ctx, v.row.ID, func(r *registry.VM) error {
		d := detailsOf(*r)
		d.Detached = true
		b, err := json.Marshal(d)
		if err != nil {
			return errcode.Wrap(errcode.InvalidSpec, err, "encode VM details")
		}
		r.Spec = b
		v.row = *r
		return nil
	})
}

// teardown kills what is left of the VM, removes its runtime directory and
// writable layer (and jail), tears its network down, and deletes its row.
// A row another process already removed (Reconcile, Stop) is fine. The
// row goes last: while it exists the VM's lease counts as live.
func (v *VM) teardown(ctx context.Context) {
	if err := v.m.Cleanup(); err != nil {
		v.rt.log.Warn("vm cleanup failed", "id", v.row.ID, "err", err)
	}
	if err := v.rt.teardownNetwork(ctx, v.row.ID); err != nil {
		v.rt.log.Warn("vm network teardown failed; the next networked run reclaims it", "id", v.row.ID, "err", err)
	}
	if err := v.rt.reg.DeleteVM(ctx, v.row.ID); err != nil && !errcode.HasCode(err, errcode.NotFound) {
		v.rt.log.Warn("cannot delete vm row", "id", v.row.ID, "err", err)
	}
}

// SuperviseOptions tune a foreground run.
type SuperviseOptions struct {
	// Output receives the program's output.
	Output io.Writer
	// ShowAll also writes the kernel's, hyphae-init's and the VMM's lines
	// (prefixed with their kind) to Output.
	ShowAll bool
	// Timeout, when > 0, stops the VM once it has run that long.
	Timeout time.Duration
	// StopTimeout bounds the graceful stop on timeout or cancellation
	// (DefaultStopTimeout when 0).
	StopTimeout time.Duration
	// OnLine, when set, sees every console line as it is read.
	OnLine func(Line)
}

// Result is how a foreground run ended.
type Result struct {
	ID string `json:"id"`
	// ExitCode is the program's exit code (128+signal when a signal
	// killed it), or -1 when it never reported one.
	ExitCode int `json:"exit_code"`
	Signal   int `json:"signal,omitempty"`
	// Stopped says the VM was stopped: by cancellation (Ctrl-C) or on
	// timeout (TimedOut).
	Stopped  bool `json:"stopped"`
	TimedOut bool `json:"timed_out"`
	// Exited is when the status line was read; Gone when the VMM had
	// exited; TornDown when teardown finished (benchmark timing).
	Exited, Gone, TornDown time.Time `json:"-"`
}

// Supervise streams the program's output until the VM exits, stops the VM
// when ctx ends or the timeout passes, then tears it down. It returns the
// program's status; a fatal hyphae-init line is an errcode.InitFatal
// error, a timeout an errcode.Timeout error (with the Result filled in),
// and a VM that ended without a status line an errcode.BootFailed error
// carrying the end of its console.
func (v *VM) Supervise(ctx context.Context, o SuperviseOptions) (Result, error) {
	if o.Output == nil {
		o.Output = io.Discard
	}
	if o.StopTimeout <= 0 {
		o.StopTimeout = DefaultStopTimeout
	}
	res := Result{ID: v.row.ID, ExitCode: -1}
	done := make(chan struct{})
	go func() {
		_ = v.m.Wait(context.Background())
		res.Gone = time.Now()
		close(done)
	}()
	var (
		status *Line
		werr   error
	)
	followed := make(chan error, 1)
	go func() {
		followed <- followConsole(context.Background(), v.row.ConsolePath, done, func(l Line) bool {
			if o.OnLine != nil {
				o.OnLine(l)
			}
			switch {
			case l.Kind == LineStatus:
				st := l
				status = &st
				if l.Text != "" {
					_, werr = io.WriteString(o.Output, l.Text)
				}
				if o.ShowAll {
					_, werr = fmt.Fprintf(o.Output, "[%s] exit code=%d signal=%d fatal=%q\n", l.Kind, l.Status.ExitCode, l.Status.Signal, l.Status.Fatal)
				}
			case l.Kind == LineProgram:
				_, werr = io.WriteString(o.Output, l.Text+"\n")
			case o.ShowAll:
				_, werr = fmt.Fprintf(o.Output, "[%s] %s\n", l.Kind, l.Text)
			}
			return true
		})
	}()
	var timeout <-chan time.Time
	if o.Timeout > 0 {
		t := time.NewTimer(o.Timeout)
		defer t.Stop()
		timeout = t.C
	}
	stop := func(why string) {
		v.rt.log.Info("stopping vm", "id", v.row.ID, "why", why)
		res.Stopped = true
		if err := v.m.Stop(context.Background(), o.StopTimeout); err != nil {
			v.rt.log.Warn("graceful stop failed", "id", v.row.ID, "err", err)
		}
	}
	var ferr error
	select {
	case ferr = <-followed:
	case <-ctx.Done():
		stop("cancelled")
		ferr = <-followed
	case <-timeout:
		res.TimedOut = true
		stop("timeout")
		ferr = <-followed
	}
	<-done
	tail := vmmproc.Tail(v.row.ConsolePath, 2048)
	v.teardown(context.WithoutCancel(ctx))
	res.TornDown = time.Now()
	if status != nil {
		res.ExitCode, res.Signal, res.Exited = status.Status.ExitCode, status.Status.Signal, status.At
	}
	switch {
	case res.TimedOut:
		return res, errcode.New(errcode.Timeout, "vm %s: the program did not finish within %s and was stopped", v.row.ID, o.Timeout)
	case status != nil && status.Status.Fatal != "":
		return res, errcode.New(errcode.InitFatal, "vm %s: hyphae-init could not run the program: %s", v.row.ID, status.Status.Fatal)
	case status == nil && !res.Stopped:
		return res, errcode.New(errcode.BootFailed, "vm %s ended without reporting an exit status; its console ends:\n%s", v.row.ID, tail)
	case ferr != nil && !errors.Is(ferr, context.Canceled):
		return res, ferr
	case werr != nil:
		return res, errcode.Wrap(errcode.ProcessFailed, werr, "write the program's output")
	}
	return res, nil
}

func baseName(p string) string {
	if i := strings.LastIndexByte(p, '/'); i >= 0 {
		return p[i+1:]
	}
	return p
}
