package vm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/registry"
	"github.com/hyphae-run/hyphae/vmm"
	"github.com/hyphae-run/hyphae/vmm/firecracker"
	"github.com/hyphae-run/hyphae/vmm/qemu"
	"github.com/hyphae-run/hyphae/vmm/vmmproc"
)

// orphanKillWait bounds the wait for an orphaned VMM after SIGKILL.
const orphanKillWait = 5 * time.Second

// ReconcileReport says what Reconcile cleaned up.
type ReconcileReport struct {
	// Removed are the ids of rows whose VM was gone (or whose start had
	// died half-way), now deleted with their runtime directories.
	Removed []string `json:"removed"`
	// Orphans are runtime directories of this registry that no row owned,
	// now removed.
	Orphans []string `json:"orphans"`
	// Killed are the PIDs of VMMs that were verified to be ours and had no
	// live owner (an orphan, or a start whose hyphae died).
	Killed []int `json:"killed"`
}

// Reconcile brings the VM rows in line with the processes that really
// run: a running row whose VMM is gone is removed with its runtime
// directory, jail and network; a created row whose starting hyphae died is
// removed, its VMM killed if it got that far. Then runtime directories
// under vmmproc.RuntimeDir() that carry this registry's owner file but
// belong to no row are removed (with their jail), their VMM killed if it
// still runs, and network leases whose VM has no row are torn down. A
// process is signalled only after vmmproc's identity check: a PID now used
// by another program is never touched.
func (rt *Runtime) Reconcile(ctx context.Context) (ReconcileReport, error) {
	rep := ReconcileReport{Removed: []string{}, Orphans: []string{}, Killed: []int{}}
	reg, err := rt.registry()
	if err != nil {
		return rep, err
	}
	// Directories first, leases second, rows last: a run records its row
	// before it creates its directory or takes its lease, so every
	// directory and lease seen here whose VM is alive has its row in the
	// list read next.
	root := vmmproc.RuntimeDir()
	entries, err := os.ReadDir(root)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return rep, errcode.Wrap(errcode.RegistryError, err, "read runtime dir %s", root)
	}
	leased, err := rt.leases(ctx)
	if err != nil {
		return rep, err
	}
	rows, err := reg.ListVMs(ctx)
	if err != nil {
		return rep, err
	}
	owned := map[string]bool{}
	kept := map[string]bool{}
	var errs []error
	for _, row := range rows {
		owned[filepath.Clean(row.RuntimeDir)] = true
		d := detailsOf(row)
		id := d.identity(row)
		switch row.State {
		case registry.VMRunning:
			if id.Alive() {
				kept[row.ID] = true
				continue
			}
		case registry.VMCreated:
			if d.Supervisor.PID != 0 && d.Supervisor.Alive() {
				kept[row.ID] = true
				continue // a start in progress
			}
			if row.PID != 0 && rt.killVerified(id) {
				rep.Killed = append(rep.Killed, row.PID)
			}
		default:
			// Exited rows (written by other tools) say what they are.
			kept[row.ID] = true
			continue
		}
		rt.log.Info("reconcile: removing vm whose process is gone", "id", row.ID, "pid", row.PID, "state", row.State)
		if err := rt.removeRuntimeDir(row.RuntimeDir, row.ID); err != nil {
			errs = append(errs, err)
		}
		if err := rt.cleanupJail(d.Jail, row.ID); err != nil {
			errs = append(errs, err)
		}
		if leased[row.ID] {
			if err := rt.teardownNetwork(ctx, row.ID); err != nil {
				// The row stays, so a later Reconcile tries again.
				errs = append(errs, err)
				continue
			}
		}
		if err := reg.DeleteVM(ctx, row.ID); err != nil && !errcode.HasCode(err, errcode.NotFound) {
			errs = append(errs, err)
			continue
		}
		rep.Removed = append(rep.Removed, row.ID)
	}
	for _, e := range entries {
		dir := filepath.Join(root, e.Name())
		if !e.IsDir() || owned[dir] {
			continue
		}
		o, ok := readOwner(dir)
		if !ok || o.Home != reg.Home() || o.ID != e.Name() {
			continue // not one of ours
		}
		if o.VMM.PID != 0 && rt.killVerified(o.VMM) {
			rep.Killed = append(rep.Killed, o.VMM.PID)
		}
		rt.log.Info("reconcile: removing orphaned runtime dir", "dir", dir)
		if err := rt.cleanupJail(o.Jail, o.ID); err != nil {
			errs = append(errs, err)
		}
		if err := vmmproc.RemoveDir(dir); err != nil {
			errs = append(errs, err)
			continue
		}
		rep.Orphans = append(rep.Orphans, dir)
	}
	// Leases of VMs with no row at all (their row went, their network
	// did not): only this home's leases, so the TAPs of other software in
	// the namespace are never touched here.
	for id := range leased {
		if kept[id] || slices.Contains(rep.Removed, id) {
			continue
		}
		rt.log.Info("reconcile: tearing down the network of a VM that is gone", "id", id)
		if err := rt.teardownNetwork(ctx, id); err != nil {
			errs = append(errs, err)
		}
	}
	return rep, errors.Join(errs...)
}

// killVerified is vmmproc.KillVerified with this runtime's bound and
// logger; a kill that fails is logged and counts as not killed.
func (rt *Runtime) killVerified(id vmmproc.Identity) bool {
	killed, err := vmmproc.KillVerified(id, orphanKillWait, rt.log)
	if err != nil {
		rt.log.Warn("cannot kill orphaned vmm", "pid", id.PID, "err", err)
	}
	return killed
}

// removeRuntimeDir removes a row's runtime directory when it is really
// that VM's (its owner file names it): a row pointing elsewhere must not
// make hyphae delete an arbitrary directory.
func (rt *Runtime) removeRuntimeDir(dir, id string) error {
	if dir == "" {
		return nil
	}
	if o, ok := readOwner(dir); !ok || o.ID != id {
		if _, err := os.Stat(dir); err == nil {
			rt.log.Warn("leaving a runtime dir without this VM's owner file", "dir", dir, "id", id)
		}
		return nil
	}
	return vmmproc.RemoveDir(dir)
}

// List reconciles, then returns every VM.
func (rt *Runtime) List(ctx context.Context) ([]Status, error) {
	reg, err := rt.registry()
	if err != nil {
		return nil, err
	}
	if _, err := rt.Reconcile(ctx); err != nil {
		rt.log.Warn("reconcile failed", "err", err)
	}
	rows, err := reg.ListVMs(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]Status, 0, len(rows))
	for _, r := range rows {
		out = append(out, statusOf(r))
	}
	return out, nil
}

// Get reconciles, then returns the VM whose id is, or uniquely starts
// with, id.
func (rt *Runtime) Get(ctx context.Context, id string) (Status, error) {
	all, err := rt.List(ctx)
	if err != nil {
		return Status{}, err
	}
	var match []Status
	for _, s := range all {
		if s.ID == id {
			return s, nil
		}
		if id != "" && strings.HasPrefix(s.ID, id) {
			match = append(match, s)
		}
	}
	switch len(match) {
	case 1:
		return match[0], nil
	case 0:
		return Status{}, errcode.New(errcode.VMNotFound, "no VM %q (a VM that exited has been cleaned up)", id).
			WithHint("`hyphae list vms` shows the running VMs")
	}
	return Status{}, errcode.New(errcode.InvalidArgument, "VM id prefix %q is ambiguous (%d VMs)", id, len(match))
}

// StopResult says how a VM was stopped.
type StopResult struct {
	ID string `json:"id"`
	// Method is vmmproc's stop step that ended it: graceful, sigterm,
	// sigkill or already-exited.
	Method string `json:"method"`
	TookMS int64  `json:"took_ms"`
}

// Stop stops the VM id (started by this or any other hyphae process):
// Ctrl-Alt-Del through the VMM's socket (in the runtime directory, or the
// jail), then SIGTERM, then SIGKILL, all within timeout; then removes its
// runtime directory, jail and network, and its row.
func (rt *Runtime) Stop(ctx context.Context, id string, timeout time.Duration) (StopResult, error) {
	if timeout <= 0 {
		timeout = DefaultStopTimeout
	}
	s, err := rt.Get(ctx, id)
	if err != nil {
		return StopResult{}, err
	}
	row, err := rt.reg.GetVM(ctx, s.ID)
	if err != nil {
		return StopResult{}, errcode.Wrap(errcode.VMNotFound, err, "vm %s", s.ID)
	}
	began := time.Now()
	res := StopResult{ID: s.ID, Method: string(vmmproc.StoppedAlready)}
	d := detailsOf(row)
	if row.PID != 0 {
		p, err := vmmproc.Attach(d.identity(row), rt.log)
		if err == nil {
			graceful := func(ctx context.Context) error {
				return requestShutdown(ctx, row.Driver, row.RuntimeDir, row.ID, d.Jail)
			}
			how, err := p.Stop(ctx, graceful, timeout)
			p.Release()
			if err != nil {
				return res, err
			}
			res.Method = string(how)
		}
	}
	if err := rt.removeRuntimeDir(row.RuntimeDir, row.ID); err != nil {
		return res, err
	}
	if err := rt.cleanupJail(d.Jail, row.ID); err != nil {
		return res, err
	}
	if err := rt.teardownNetwork(ctx, row.ID); err != nil {
		return res, err
	}
	if err := rt.reg.DeleteVM(ctx, row.ID); err != nil && !errcode.HasCode(err, errcode.NotFound) {
		return res, err
	}
	res.TookMS = time.Since(began).Milliseconds()
	rt.log.Info("vm stopped", "id", row.ID, "method", res.Method)
	return res, nil
}

// requestShutdown sends Ctrl-Alt-Del through the VMM's socket: in the
// runtime directory, or in the jail of a jailed Firecracker.
func requestShutdown(ctx context.Context, driver, dir, id string, jail *JailDetails) error {
	switch {
	case driver == vmm.QEMU:
		return qemu.RequestShutdown(ctx, dir)
	case driver == vmm.Firecracker && jail != nil:
		sock, err := firecracker.JailAPISocket(jail.options(), jail.Firecracker, id)
		if err != nil {
			return err
		}
		c := firecracker.NewClient(sock, 0)
		defer c.Close()
		return c.SendCtrlAltDel(ctx)
	case driver == vmm.Firecracker:
		return firecracker.RequestShutdown(ctx, dir)
	}
	return errcode.New(errcode.VMMUnavailable, "unknown driver %q", driver)
}

// LogOptions tune Logs.
type LogOptions struct {
	// Follow keeps reading until the VM exits.
	Follow bool
	// All shows the kernel's, hyphae-init's and the VMM's lines too.
	All bool
}

// Logs writes the program output of VM id's console to w: what is there
// now, or with Follow everything until the VM exits (after which the VM is
// reconciled away). It returns the program's status line when it was
// read.
func (rt *Runtime) Logs(ctx context.Context, id string, w io.Writer, o LogOptions) (*Line, error) {
	s, err := rt.Get(ctx, id)
	if err != nil {
		return nil, err
	}
	done := make(chan struct{})
	if o.Follow {
		row, err := rt.reg.GetVM(ctx, s.ID)
		if err != nil {
			return nil, errcode.Wrap(errcode.VMNotFound, err, "vm %s", s.ID)
		}
		p, err := vmmproc.Attach(detailsOf(row).identity(row), rt.log)
		if err != nil {
			close(done)
		} else {
			defer p.Release()
			go func() {
				<-p.Done()
				close(done)
			}()
		}
	} else {
		close(done)
	}
	var (
		status *Line
		werr   error
	)
	err = followConsole(ctx, s.ConsolePath, done, func(l Line) bool {
		switch {
		case l.Kind == LineStatus:
			st := l
			status = &st
			if l.Text != "" {
				_, werr = io.WriteString(w, l.Text)
			}
		case l.Kind == LineProgram:
			_, werr = io.WriteString(w, l.Text+"\n")
		case o.All:
			_, werr = fmt.Fprintf(w, "[%s] %s\n", l.Kind, l.Text)
		}
		return werr == nil
	})
	if werr != nil {
		return status, errcode.Wrap(errcode.ProcessFailed, werr, "write logs")
	}
	if err != nil {
		return status, err
	}
	if o.Follow {
		if _, err := rt.Reconcile(context.WithoutCancel(ctx)); err != nil {
			rt.log.Warn("reconcile after logs failed", "err", err)
		}
	}
	return status, nil
}
