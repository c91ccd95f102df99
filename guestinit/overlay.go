package guestinit

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
	"golang.org/x/sys/unix"
)

// Layout of the writable layer. The scratch filesystem (a tmpfs or the
// hyphae.overlay device) is mounted on /run, a directory every image has
// even when its root is read-only; after the switch the new root gets a
// fresh /run of its own and the scratch stays reachable only through the
// overlay.
const (
	overlayScratch = "/run"
	overlayUpper   = overlayScratch + "/hyphae-overlay/upper"
	overlayWork    = overlayScratch + "/hyphae-overlay/work"
	overlayRoot    = overlayScratch + "/hyphae-overlay/root"
)

// enterOverlay puts a writable overlayfs over the current root and makes
// it the root, the switch_root way: move the already mounted pseudo
// filesystems into it, MS_MOVE it onto / and chroot. pivot_root is not
// used because it needs the current root to be a mount point, which it is
// not under a chroot (the namespace test harness) and brings nothing here:
// the old root stays busy as the overlay's lower layer anyway.
func enterOverlay(spec string, log *slog.Logger) error {
	bad := func(err error, format string, args ...any) error {
		return errcode.Wrap(errcode.InitFatal, err, "%s=%s: %s", guest.CmdlineOverlay, spec, fmt.Sprintf(format, args...))
	}
	switch {
	case spec == "tmpfs":
		if err := mountOn("tmpfs", overlayScratch, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=0755"); err != nil {
			return bad(err, "cannot mount the tmpfs upper layer on %s", overlayScratch)
		}
	case strings.HasPrefix(spec, "/dev/") && !strings.Contains(spec, ".."):
		if err := mountPseudo(devFS(), log); err != nil {
			return err
		}
		if err := mountOn(spec, overlayScratch, "ext4", unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
			return bad(err, "cannot mount the upper-layer device as ext4 on %s", overlayScratch)
		}
	default:
		return errcode.New(errcode.InitFatal, "%s=%s: want tmpfs or a block device path under /dev/", guest.CmdlineOverlay, spec)
	}
	for _, d := range []string{overlayUpper, overlayWork, overlayRoot} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return bad(err, "cannot create %s", d)
		}
	}
	opts := "lowerdir=/,upperdir=" + overlayUpper + ",workdir=" + overlayWork
	if err := unix.Mount("overlay", overlayRoot, "overlay", 0, opts); err != nil {
		if errors.Is(err, unix.ENODEV) {
			return bad(err, "overlayfs is not available in this kernel (build it with CONFIG_OVERLAY_FS=y, or boot without %s)", guest.CmdlineOverlay)
		}
		return bad(err, "cannot mount the overlay root")
	}
	for _, m := range []string{"/dev", "/proc", "/sys"} {
		if !isMountRoot(m) {
			continue
		}
		dst := filepath.Join(overlayRoot, m)
		if err := os.MkdirAll(dst, 0o755); err != nil {
			return bad(err, "cannot create %s", dst)
		}
		if err := unix.Mount(m, dst, "", unix.MS_MOVE, ""); err != nil {
			return bad(err, "cannot move %s into the overlay root", m)
		}
	}
	if err := unix.Chdir(overlayRoot); err != nil {
		return bad(err, "cannot enter the overlay root")
	}
	if err := unix.Mount(overlayRoot, "/", "", unix.MS_MOVE, ""); err != nil {
		return bad(err, "cannot move the overlay root onto /")
	}
	if err := unix.Chroot("."); err != nil {
		return bad(err, "cannot chroot into the overlay root")
	}
	if err := unix.Chdir("/"); err != nil {
		return bad(err, "cannot enter the new root")
	}
	log.Debug("writable overlay root", "upper", spec)
	return nil
}

// mountOn mounts source on target, creating target when missing.
func mountOn(source, target, fstype string, flags uintptr, data string) error {
	if err := os.MkdirAll(target, 0o755); err != nil {
		return err
	}
	return unix.Mount(source, target, fstype, flags, data)
}
