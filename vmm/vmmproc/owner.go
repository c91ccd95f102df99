package vmmproc

import (
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hyphae-run/hyphae/errcode"
)

// maxOwnerFile bounds what ReadOwnerFile reads: an owner file is a few
// hundred bytes of JSON.
const maxOwnerFile = 64 << 10

// WriteOwnerFile records v as JSON in dir/name (mode 0600), replacing it
// atomically, so that a reader after a crash sees the old record or the
// new one, never half of one. Callers use it to mark a runtime directory
// as theirs (who started the VM, the VMM's Identity) for orphan recovery
// by a later process.
func WriteOwnerFile(dir, name string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return errcode.Wrap(errcode.SpawnFailed, err, "encode owner file")
	}
	tmp := filepath.Join(dir, name+".new")
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return errcode.Wrap(errcode.SpawnFailed, err, "write owner file in %s", dir)
	}
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		_ = os.Remove(tmp)
		return errcode.Wrap(errcode.SpawnFailed, err, "write owner file in %s", dir)
	}
	return nil
}

// ReadOwnerFile decodes dir/name into v. It refuses (errcode.NotFound) a
// dir or file that is a symlink, not a directory or regular file, or
// belongs to another user: the runtime root may be a shared /tmp, and a
// record planted there by someone else must not make this process kill or
// delete anything.
func ReadOwnerFile(dir, name string, v any) error {
	uid := os.Geteuid()
	mine := func(path string, wantDir bool) error {
		st, err := os.Lstat(path)
		if err != nil {
			return err
		}
		switch {
		case wantDir && !st.IsDir(), !wantDir && !st.Mode().IsRegular():
			return errors.New("not a plain directory or file")
		case !ownedBy(st, uid):
			return errors.New("owned by another user")
		}
		return nil
	}
	path := filepath.Join(dir, name)
	if err := mine(dir, true); err != nil {
		return errcode.Wrap(errcode.NotFound, err, "runtime dir %s", dir)
	}
	if err := mine(path, false); err != nil {
		return errcode.Wrap(errcode.NotFound, err, "owner file %s", path)
	}
	f, err := os.Open(path)
	if err != nil {
		return errcode.Wrap(errcode.NotFound, err, "owner file %s", path)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxOwnerFile+1))
	if err != nil {
		return errcode.Wrap(errcode.NotFound, err, "owner file %s", path)
	}
	if len(b) > maxOwnerFile {
		return errcode.New(errcode.NotFound, "owner file %s is larger than %d bytes", path, maxOwnerFile)
	}
	if err := json.Unmarshal(b, v); err != nil {
		return errcode.Wrap(errcode.NotFound, err, "owner file %s", path)
	}
	return nil
}

// ownedBy reports whether the file st describes belongs to uid.
func ownedBy(st os.FileInfo, uid int) bool {
	sys, ok := st.Sys().(*syscall.Stat_t)
	return ok && int(sys.Uid) == uid
}

// KillVerified SIGKILLs the process id names when, and only when, it is
// still that process: Attach checks the identity through a pidfd, so a PID
// reused by another program is never signalled, not even if the reuse
// races with the check. It waits up to wait for the process to end and
// reports whether it killed; a process that is gone or is now another
// program is (false, nil).
func KillVerified(id Identity, wait time.Duration, logger *slog.Logger) (bool, error) {
	p, err := Attach(id, logger)
	if err != nil {
		// Gone (ESRCH), no process at all (EINVAL: a zero or negative
		// PID) or another program now (no errno: the identity check) is
		// "not killed". Any other failure to open a pidfd (EMFILE,
		// ENOMEM) says nothing about the process: report it, so that
		// callers keep the record for a later try.
		var errno unix.Errno
		if errors.As(err, &errno) && errno != unix.ESRCH && errno != unix.EINVAL {
			return false, err
		}
		return false, nil
	}
	defer p.Release()
	if err := p.KillWait(wait); err != nil {
		return false, err
	}
	return true, nil
}
