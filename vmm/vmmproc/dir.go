// Package vmmproc spawns and supervises VMM processes (firecracker,
// qemu-system-x86_64) for the vmm drivers: a per-VM runtime directory, the
// process in its own process group with its console going to a log file,
// an identity (PID plus kernel start time) that survives a restart of
// hyphae and is never fooled by a reused PID, bounded waits for sockets,
// and a stop that escalates from a graceful request to SIGTERM to SIGKILL.
package vmmproc

import (
	"os"
	"path/filepath"
	"strings"

	"github.com/hyphae-run/hyphae/errcode"
)

// EnvRuntimeDir overrides where per-VM runtime directories live.
const EnvRuntimeDir = "HYPHAE_RUNTIME_DIR"

// RuntimeDir returns the directory holding every VM's runtime directory:
// $HYPHAE_RUNTIME_DIR, else $XDG_RUNTIME_DIR/hyphae, else /tmp/hyphae.
func RuntimeDir() string {
	if d := os.Getenv(EnvRuntimeDir); d != "" {
		return d
	}
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "hyphae")
	}
	return filepath.Join(os.TempDir(), "hyphae")
}

// VMDir returns the runtime directory of the VM with the given id, without
// creating it. The id must be usable as one path element.
func VMDir(id string) (string, error) {
	if id == "" || id == "." || id == ".." || strings.ContainsAny(id, "/\x00") {
		return "", errcode.New(errcode.InvalidSpec, "id: %q cannot name a runtime directory", id)
	}
	return filepath.Join(RuntimeDir(), id), nil
}

// PrepareDir creates dir (and missing parents) with mode 0700, so that the
// sockets and console log inside are reachable by the owner only. An
// existing directory is accepted and tightened to 0700; a symlink or a
// non-directory is refused.
func PrepareDir(dir string) error {
	if dir == "" {
		return errcode.New(errcode.InvalidSpec, "runtime_dir: empty")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return errcode.Wrap(errcode.SpawnFailed, err, "create runtime dir %s", dir)
	}
	st, err := os.Lstat(dir)
	if err != nil {
		return errcode.Wrap(errcode.SpawnFailed, err, "stat runtime dir %s", dir)
	}
	if !st.IsDir() {
		return errcode.New(errcode.SpawnFailed, "runtime dir %s is not a directory", dir)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return errcode.Wrap(errcode.SpawnFailed, err, "chmod runtime dir %s", dir)
	}
	return nil
}

// RemoveDir removes a runtime directory and everything in it. Removing a
// directory that is already gone is not an error.
func RemoveDir(dir string) error {
	if dir == "" {
		return nil
	}
	if err := os.RemoveAll(dir); err != nil {
		return errcode.Wrap(errcode.StopFailed, err, "remove runtime dir %s", dir)
	}
	return nil
}
