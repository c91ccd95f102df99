package guestinit

import (
	"errors"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/hyphae-run/hyphae/errcode"
	"golang.org/x/sys/unix"
)

// pseudoFS is one filesystem PID 1 mounts.
type pseudoFS struct {
	target, fstype string
	flags          uintptr
	data           string
	// magics are the statfs types that mean "already mounted": the
	// kernel's devtmpfs automount, or whoever started init, may have done it.
	magics []int64
	// optional marks a filesystem whose absence leaves programs runnable,
	// so a kernel without it gets a warning rather than a fatal error.
	optional bool
}

const pseudoFlags = unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC

// procFS comes first: the kernel command line is read from it.
func procFS() pseudoFS {
	return pseudoFS{target: "/proc", fstype: "proc", flags: pseudoFlags, magics: []int64{unix.PROC_SUPER_MAGIC}}
}

// devFS holds the device nodes; devtmpfs reports the tmpfs (or, without
// CONFIG_TMPFS, the ramfs) type.
func devFS() pseudoFS {
	return pseudoFS{target: "/dev", fstype: "devtmpfs", flags: unix.MS_NOSUID, data: "mode=0755",
		magics: []int64{unix.TMPFS_MAGIC, unix.RAMFS_MAGIC}}
}

// pseudoFilesystems lists, in mount order, what every program may expect.
func pseudoFilesystems() []pseudoFS {
	return []pseudoFS{
		devFS(),
		procFS(),
		{target: "/sys", fstype: "sysfs", flags: pseudoFlags, magics: []int64{unix.SYSFS_MAGIC}},
		{target: "/sys/fs/cgroup", fstype: "cgroup2", flags: pseudoFlags, magics: []int64{unix.CGROUP2_SUPER_MAGIC}, optional: true},
		{target: "/run", fstype: "tmpfs", flags: unix.MS_NOSUID | unix.MS_NODEV, data: "mode=0755", magics: []int64{unix.TMPFS_MAGIC}},
		{target: "/tmp", fstype: "tmpfs", flags: unix.MS_NOSUID | unix.MS_NODEV, data: "mode=1777", magics: []int64{unix.TMPFS_MAGIC}},
	}
}

// mountPseudo mounts fs unless it is already there, creating the
// mountpoint when missing. EBUSY counts as already mounted.
func mountPseudo(fs pseudoFS, log *slog.Logger) error {
	if mountedAs(fs.target, fs.magics) {
		log.Debug("already mounted", "target", fs.target)
		return nil
	}
	err := os.MkdirAll(fs.target, 0o755)
	if err == nil {
		err = unix.Mount(fs.fstype, fs.target, fs.fstype, fs.flags, fs.data)
	}
	switch {
	case err == nil, errors.Is(err, unix.EBUSY):
		return nil
	case fs.optional:
		log.Warn("filesystem not mounted; continuing without it", "fstype", fs.fstype, "target", fs.target, "err", err)
		return nil
	}
	return errcode.Wrap(errcode.InitFatal, err, "cannot mount %s on %s", fs.fstype, fs.target)
}

// mountedAs reports whether path is the root of a mount whose filesystem
// type is one of magics. The type alone is not enough: on a tmpfs root
// every directory reports TMPFS_MAGIC.
func mountedAs(path string, magics []int64) bool {
	if !isMountRoot(path) {
		return false
	}
	var st unix.Statfs_t
	if unix.Statfs(path, &st) != nil {
		return false
	}
	for _, m := range magics {
		if st.Type == m {
			return true
		}
	}
	return false
}

// isMountRoot reports whether path is the root of a mount. statx knows
// (STATX_ATTR_MOUNT_ROOT, Linux 5.8); older kernels fall back to comparing
// the device with the parent's, which misses bind mounts of the same
// filesystem but none of the mounts init cares about.
func isMountRoot(path string) bool {
	var stx unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, path, unix.AT_SYMLINK_NOFOLLOW, unix.STATX_BASIC_STATS, &stx); err != nil {
		return false
	}
	if stx.Attributes_mask&unix.STATX_ATTR_MOUNT_ROOT != 0 {
		return stx.Attributes&unix.STATX_ATTR_MOUNT_ROOT != 0
	}
	var parent unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, filepath.Join(path, ".."), 0, unix.STATX_BASIC_STATS, &parent); err != nil {
		return false
	}
	return stx.Dev_major != parent.Dev_major || stx.Dev_minor != parent.Dev_minor
}

// ensureConsole gives init descriptors 0-2 on /dev/console when the kernel
// could not open it before init started, so that the program's output and
// the status line reach the console.
func ensureConsole() error {
	var missing []int
	for fd := 0; fd <= 2; fd++ {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); errors.Is(err, unix.EBADF) {
			missing = append(missing, fd)
		}
	}
	if len(missing) == 0 {
		return nil
	}
	con, err := unix.Open("/dev/console", unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return errcode.Wrap(errcode.InitFatal, err, "no console: cannot open /dev/console")
	}
	for _, fd := range missing {
		if fd == con {
			// Open took the lowest free descriptor; keep it, but inheritable.
			if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFD, 0); err != nil {
				return errcode.Wrap(errcode.InitFatal, err, "console descriptor %d", fd)
			}
			continue
		}
		if err := unix.Dup3(con, fd, 0); err != nil {
			return errcode.Wrap(errcode.InitFatal, err, "console descriptor %d", fd)
		}
	}
	if con > 2 {
		unix.Close(con)
	}
	return nil
}
