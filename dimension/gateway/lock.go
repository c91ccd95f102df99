package gateway

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/hyphae-run/hyphae/errcode"
)

// lockFile is the file in the data directory a running dimension-server
// holds an exclusive flock on.
const lockFile = "dimension.lock"

// lockDataDir takes the data directory for this process, so that a second
// dimension-server on it (a mistake, an overlapping restart) is refused
// before it reaps anything: reaping treats the data dir's runs, upload
// jobs and VMs as a dead predecessor's. The lock goes with the process
// (the kernel drops it when the file is closed, also on a crash); release
// closes it earlier.
func lockDataDir(dir string) (release func(), err error) {
	path := filepath.Join(dir, lockFile)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, errcode.Wrap(errcode.InvalidArgument, err, "opening %s", path)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		holder, _ := os.ReadFile(path)
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			e := errcode.New(errcode.InUse, "the data directory %s is in use by another dimension-server (pid %s)", dir, strings.TrimSpace(string(holder)))
			return nil, e.WithHint("stop that server first, or give this one its own DIMENSION_DATA_DIR")
		}
		return nil, errcode.Wrap(errcode.InvalidArgument, err, "locking %s", path)
	}
	// The holder's pid, for the message a second server prints.
	if err := f.Truncate(0); err == nil {
		_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return func() { f.Close() }, nil
}
