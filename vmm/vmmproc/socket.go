package vmmproc

import (
	"context"
	"errors"
	"io/fs"
	"net"
	"os"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
)

// MaxSocketPath is the longest path a Unix socket can be bound at
// (sun_path is 108 bytes including the terminating NUL).
const MaxSocketPath = 107

// pollInterval is how often socket readiness is re-checked.
const pollInterval = 20 * time.Millisecond

// CheckSocketPath refuses a socket path the kernel cannot bind, before a
// VMM fails on it with a less helpful message.
func CheckSocketPath(path string) error {
	if len(path) > MaxSocketPath {
		return errcode.New(errcode.InvalidSpec, "runtime_dir: socket path %s is %d bytes, the limit is %d", path, len(path), MaxSocketPath).
			WithHint("use a shorter runtime directory (set " + EnvRuntimeDir + ")")
	}
	return nil
}

// RemoveStaleSocket removes a socket left at path by an earlier VMM, so
// that a wait for the new one cannot succeed on the old one. A missing path
// is fine; anything at path that is not a socket is refused rather than
// deleted.
func RemoveStaleSocket(path string) error {
	st, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return errcode.Wrap(errcode.SpawnFailed, err, "stat %s", path)
	}
	if st.Mode().Type() != fs.ModeSocket {
		return errcode.New(errcode.SpawnFailed, "%s exists and is not a socket", path)
	}
	if err := os.Remove(path); err != nil {
		return errcode.Wrap(errcode.SpawnFailed, err, "remove stale socket %s", path)
	}
	return nil
}

// WaitForSocket waits until a Unix socket at path accepts a connection, or
// ctx ends (errcode.Timeout).
func WaitForSocket(ctx context.Context, path string) error {
	return waitForSocket(ctx, path, nil)
}

// WaitForSocket is the package WaitForSocket that also gives up as soon as
// the process exits (errcode.BootFailed, with the end of its log).
func (p *Process) WaitForSocket(ctx context.Context, path string) error {
	err := waitForSocket(ctx, path, p.done)
	if errors.Is(err, errExited) {
		return errcode.New(errcode.BootFailed, "%s (pid %d) exited before %s accepted connections; its log ends:\n%s",
			p.id.Binary, p.id.PID, path, p.LogTail(2048))
	}
	return err
}

// errExited reports that the process ended while waitForSocket waited.
var errExited = errors.New("process exited")

func waitForSocket(ctx context.Context, path string, exited <-chan struct{}) error {
	var d net.Dialer
	tick := time.NewTicker(pollInterval)
	defer tick.Stop()
	for {
		conn, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			conn.Close()
			return nil
		}
		select {
		case <-ctx.Done():
			return errcode.Wrap(errcode.Timeout, ctx.Err(), "waiting for socket %s (last error: %v)", path, err)
		case <-exited:
			return errExited
		case <-tick.C:
		}
	}
}
