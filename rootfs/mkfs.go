package rootfs

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/google/uuid"
	"github.com/mattn/go-isatty"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/internal/tailbuf"
)

// FormatVersion names the way this package lays out images. Package image
// puts it into every digest's salt: changing the layout (new hyphae files,
// other mkfs features) must change it so that no stale cached image is
// reused.
const FormatVersion = "hyphae-rootfs/1"

// mke2fsConfig replaces the host's /etc/mke2fs.conf (through MKE2FS_CONFIG)
// so that the image does not depend on how the host configured e2fsprogs.
// The features are those of e2fsprogs 1.46/1.47's ext4 default, which
// kernels since 4.x mount; orphan_file (5.15+) is deliberately absent.
const mke2fsConfig = `[defaults]
	base_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
	default_mntopts = acl,user_xattr
	enable_periodic_fsck = 0
	blocksize = 4096
	inode_size = 256
	inode_ratio = 16384
[fs_types]
	ext4 = {
		features = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
	}
`

// MkfsOptions are the parameters of one mkfs.ext4 run.
type MkfsOptions struct {
	// Plan gives the size, inode count and journal size (see PlanSize).
	Plan
	// Label is the volume label (at most 16 bytes).
	Label string
	// Seed derives the filesystem UUID and the directory hash seed, which
	// mkfs.ext4 would otherwise pick at random; pass the tree digest so
	// that equal trees give equal images.
	Seed string
	// Progress receives a progress line while mkfs runs, when it is a
	// terminal; nil or a non-terminal shows nothing.
	Progress io.Writer
	// Logger logs the command; nil discards.
	Logger *slog.Logger
}

// Params renders every option that shapes the image (not Seed, Progress
// or Logger), for a digest's salt.
func (o MkfsOptions) Params() string {
	conf := sha256.Sum256([]byte(mke2fsConfig))
	return fmt.Sprintf("%s size=%d inodes=%d journal=%dMiB label=%q block=%d conf=%x",
		FormatVersion, o.SizeBytes, o.Inodes, o.JournalMiB, o.Label, BlockSize, conf[:8])
}

// MkfsPath finds mkfs.ext4 on PATH, then in /usr/sbin and /sbin (which a
// non-root user's PATH often lacks).
func MkfsPath() (string, error) {
	if p, err := exec.LookPath("mkfs.ext4"); err == nil {
		return p, nil
	}
	for _, p := range []string{"/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"} {
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
			return p, nil
		}
	}
	return "", errcode.New(errcode.MissingTool, "mkfs.ext4 not found on PATH, in /usr/sbin or /sbin").
		WithHint("install e2fsprogs: apt-get install e2fsprogs")
}

// stderrTail bounds what is kept of mkfs.ext4's output for error messages.
const stderrTail = 4096

// MakeExt4 creates out, a new file of o.SizeBytes, and fills it with an ext4
// filesystem holding the tree at dir (mkfs.ext4 -d). out must not exist.
// On any failure out is removed. On success out is fsynced.
func MakeExt4(ctx context.Context, dir, out string, o MkfsOptions) (err error) {
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if o.SizeBytes <= 0 || o.Inodes <= 0 || o.JournalMiB <= 0 {
		return errcode.New(errcode.InvalidArgument, "mkfs options need a size, an inode count and a journal size (got %+v)", o.Plan)
	}
	if len(o.Label) > 16 {
		return errcode.New(errcode.InvalidArgument, "volume label %q is longer than 16 bytes", o.Label)
	}
	mkfs, err := MkfsPath()
	if err != nil {
		return err
	}
	fsid := uuid.NewSHA1(uuid.NameSpaceOID, []byte("hyphae:"+o.Seed)).String()

	f, err := os.OpenFile(out, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return errcode.Wrap(errcode.MkfsFailed, err, "create image file")
	}
	defer func() {
		if cerr := f.Close(); err == nil && cerr != nil {
			err = errcode.Wrap(errcode.MkfsFailed, cerr, "close image file")
		}
		if err != nil {
			os.Remove(out)
		}
	}()
	if err := f.Truncate(o.SizeBytes); err != nil {
		return errcode.Wrap(errcode.MkfsFailed, err, "size image file")
	}

	conf, err := os.CreateTemp(filepath.Dir(out), ".mke2fs-*.conf")
	if err != nil {
		return errcode.Wrap(errcode.MkfsFailed, err, "write mke2fs.conf")
	}
	defer os.Remove(conf.Name())
	if _, err := conf.WriteString(mke2fsConfig); err != nil {
		conf.Close()
		return errcode.Wrap(errcode.MkfsFailed, err, "write mke2fs.conf")
	}
	if err := conf.Close(); err != nil {
		return errcode.Wrap(errcode.MkfsFailed, err, "write mke2fs.conf")
	}

	args := []string{
		"-q", "-F", "-t", "ext4", "-b", strconv.Itoa(BlockSize), "-I", strconv.Itoa(inodeSize),
		"-N", strconv.FormatInt(o.Inodes, 10), "-m", "0", "-J", "size=" + strconv.FormatInt(o.JournalMiB, 10),
		"-U", fsid, "-E", "root_owner=0:0,nodiscard,hash_seed=" + fsid,
		"-d", dir,
	}
	if o.Label != "" {
		args = append(args, "-L", o.Label)
	}
	args = append(args, out, strconv.FormatInt(o.SizeBytes/1024, 10)+"k")
	cmd := exec.CommandContext(ctx, mkfs, args...)
	cmd.Env = append(os.Environ(),
		"MKE2FS_CONFIG="+conf.Name(),
		"E2FSPROGS_FAKE_TIME="+strconv.FormatInt(EpochUnix, 10),
	)
	tail := tailbuf.New(stderrTail)
	cmd.Stdout, cmd.Stderr = tail, tail
	log.Debug("mkfs.ext4", "args", args)

	start := time.Now()
	stop := showProgress(o.Progress, f, start)
	err = cmd.Run()
	stop()
	if err != nil {
		if ctx.Err() != nil {
			return errcode.Wrap(errcode.MkfsFailed, ctx.Err(), "mkfs.ext4 interrupted")
		}
		return &errcode.Error{
			Code:    errcode.MkfsFailed,
			Message: fmt.Sprintf("mkfs.ext4 -d %s failed: %s", dir, tail.Lines()),
			Hint:    "if it ran out of space or inodes, pass a larger --size",
			Err:     err,
		}
	}
	if err := f.Sync(); err != nil {
		return errcode.Wrap(errcode.MkfsFailed, err, "sync image file")
	}
	log.Debug("mkfs.ext4 done", "out", out, "elapsed", time.Since(start))
	return nil
}

// showProgress prints, while mkfs runs, how much of the image has been
// written, when w is a terminal. The returned function stops it and clears
// the line.
func showProgress(w io.Writer, img *os.File, start time.Time) func() {
	tty, ok := w.(*os.File)
	if !ok || !isatty.IsTerminal(tty.Fd()) {
		return func() {}
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		tick := time.NewTicker(200 * time.Millisecond)
		defer tick.Stop()
		spin := `|/-\`
		for i := 0; ; i++ {
			select {
			case <-done:
				if i > 0 {
					fmt.Fprint(tty, "\r\033[K")
				}
				return
			case <-tick.C:
				var written int64
				if st, err := img.Stat(); err == nil {
					if sys, ok := st.Sys().(*syscall.Stat_t); ok {
						written = sys.Blocks * 512
					}
				}
				fmt.Fprintf(tty, "\r\033[K%c mkfs.ext4: %d MiB written, %.1fs", spin[i%len(spin)], written/mib, time.Since(start).Seconds())
			}
		}
	})
	return func() { close(done); wg.Wait() }
}
