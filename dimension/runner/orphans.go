package runner

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/vmm/vmmproc"
)

// ownerFile marks a runtime directory as a VM of one dimension gateway. It
// is not hyphae's own (vm's hyphae-vm.json), so that `hyphae run`'s
// reconcile never takes a gateway's VMs, nor ReapOrphanVMs hyphae's.
const ownerFile = "dimension-vm.json"

// orphanKillWait bounds the wait for an orphaned VMM after SIGKILL.
const orphanKillWait = 5 * time.Second

// vmOwner is the owner file's record.
type vmOwner struct {
	// Gateway is VMOptions.Owner of the backend that started the VM.
	Gateway string `json:"gateway"`
	// ID is the VM's id, which is also its directory's name.
	ID string `json:"id"`
	// Run is the run the VM served, for the sweep's log.
	Run string `json:"run"`
	// VMM is the VMM process once spawned; before, only its Binary is
	// set, so that a sweep can still find it by its command line.
	VMM vmmproc.Identity `json:"vmm"`
}

// identifier is what both drivers' machines offer beyond vmm.Machine: the
// identity of the spawned VMM.
type identifier interface {
	Identity() (vmmproc.Identity, bool)
}

// track records that a VM of this process uses id, so that a sweep never
// takes a run in flight; the returned func forgets it.
func (b *VMBackend) track(id string) func() {
	b.mu.Lock()
	b.live[id] = true
	b.mu.Unlock()
	return func() {
		b.mu.Lock()
		delete(b.live, id)
		b.mu.Unlock()
	}
}

func (b *VMBackend) isLive(id string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.live[id]
}

// markOwned writes dir's owner file (creating dir), when the backend has
// an owner.
func (b *VMBackend) markOwned(dir string, o vmOwner) error {
	if b.owner == "" {
		return nil
	}
	if err := vmmproc.PrepareDir(dir); err != nil {
		return err
	}
	o.Gateway = b.owner
	return vmmproc.WriteOwnerFile(dir, ownerFile, o)
}

// ReapOrphanVMs removes what VMs of an earlier process of this gateway
// left behind when it died without its teardown (SIGKILL, a crash): for
// every directory under vmmproc.RuntimeDir() whose owner file names this
// backend's Owner, it SIGKILLs the recorded VMM when, and only when, that
// PID is still the recorded process (vmmproc.KillVerified), then removes
// the directory with its sockets, console log and writable layer.
// Directories of other gateways, of hyphae, of another user or without an
// owner file are never touched, nor are VMs this backend is running now.
// It returns the directories it removed; a backend without an Owner
// removes nothing. Call it before serving, so that no run is being booted.
func (b *VMBackend) ReapOrphanVMs(ctx context.Context) ([]string, error) {
	removed := []string{}
	if b.owner == "" {
		return removed, nil
	}
	root := vmmproc.RuntimeDir()
	entries, err := os.ReadDir(root)
	if errors.Is(err, os.ErrNotExist) {
		return removed, nil
	}
	if err != nil {
		return removed, errcode.Wrap(errcode.StopFailed, err, "read runtime dir %s", root)
	}
	var errs []error
dirs:
	for _, e := range entries {
		if err := ctx.Err(); err != nil {
			errs = append(errs, errcode.Wrap(errcode.Timeout, err, "sweeping orphaned vms"))
			break
		}
		if !e.IsDir() || b.isLive(e.Name()) {
			continue
		}
		dir := filepath.Join(root, e.Name())
		var o vmOwner
		if err := vmmproc.ReadOwnerFile(dir, ownerFile, &o); err != nil || o.Gateway != b.owner || o.ID != e.Name() {
			continue // not one of ours
		}
		log := b.log.With("dir", dir, "vm", o.ID, "run", o.Run)
		vmms := []vmmproc.Identity{o.VMM}
		if o.VMM.PID == 0 && o.VMM.Binary != "" {
			// Its starter died before recording the PID: a VMM of that
			// binary whose command line names this dir is that VM's.
			vmms = vmmproc.FindByArg(o.VMM.Binary, dir+string(filepath.Separator))
		}
		for _, vmm := range vmms {
			if vmm.PID == 0 {
				continue
			}
			killed, err := vmmproc.KillVerified(vmm, orphanKillWait, b.log)
			if err != nil {
				// The directory stays, so that a later sweep tries again.
				errs = append(errs, errcode.Wrap(errcode.StopFailed, err, "orphaned vm %s", o.ID))
				continue dirs
			}
			if killed {
				log.Info("killed the vmm of an orphaned vm", "pid", vmm.PID, "binary", vmm.Binary)
			} else {
				log.Info("the vmm of an orphaned vm is gone (or its pid is another program's now)", "pid", vmm.PID)
			}
		}
		if err := vmmproc.RemoveDir(dir); err != nil {
			errs = append(errs, err)
			continue
		}
		log.Info("removed the runtime dir of an orphaned vm")
		removed = append(removed, dir)
	}
	return removed, errors.Join(errs...)
}
