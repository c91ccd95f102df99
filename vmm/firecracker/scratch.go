package firecracker

import (
	"context"
	"errors"
	"os"
	"os/exec"

	"github.com/hyphae-run/hyphae/errcode"
)

// DefaultScratchSize is the apparent size of a VM's writable layer. The
// file is sparse: a fresh one holds about 650 KiB of ext4 metadata, and it
// grows only by what the guest writes.
const DefaultScratchSize = 1 << 30

// scratchMkfsArgs format the layer. No journal: the layer is thrown away
// with the VM, so crash consistency buys nothing, and a journal would be
// 32 MiB written per VM. No reserved blocks: there is no root-only
// headroom to keep on a throwaway disk. mke2fs zeroes the inode tables of
// a sparse file up front (ITABLE_ZEROED), so the guest does no lazy init.
var scratchMkfsArgs = []string{"-q", "-F", "-O", "^has_journal", "-m", "0", "-L", "hyphae-scratch"}

// makeScratch creates path as a sparse file of size bytes holding an empty
// ext4 filesystem. On failure nothing is left at path.
func makeScratch(ctx context.Context, path string, size int64) (err error) {
	mkfs, lerr := exec.LookPath("mkfs.ext4")
	if lerr != nil {
		return errcode.New(errcode.MissingTool, "mkfs.ext4 is not on PATH; the writable layer needs it").
			WithHint("install e2fsprogs")
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return errcode.Wrap(errcode.MkfsFailed, err, "creating the writable layer")
	}
	defer func() {
		if err != nil {
			_ = os.Remove(path)
		}
	}()
	terr := f.Truncate(size)
	if cerr := f.Close(); terr == nil {
		terr = cerr
	}
	if terr != nil {
		return errcode.Wrap(errcode.MkfsFailed, terr, "sizing the writable layer %s", path)
	}
	cmd := exec.CommandContext(ctx, mkfs, append(append([]string(nil), scratchMkfsArgs...), path)...)
	if out, err := cmd.CombinedOutput(); err != nil {
		return errcode.Wrap(errcode.MkfsFailed, errors.Join(err, errors.New(string(out))), "formatting the writable layer %s", path)
	}
	return nil
}
