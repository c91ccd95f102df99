package archive

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/bzip2"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sys/unix"

	"github.com/hyphae-run/hyphae/errcode"
)

// Whiteout names (the AUFS convention that docker and OCI layers use).
const (
	whiteoutPrefix = ".wh."
	whiteoutMeta   = ".wh..wh."
	whiteoutOpaque = ".wh..wh..opq"
)

// maxTrailing bounds what may follow a layer's end-of-archive marker. Tar
// writers pad to a record (10 KiB for GNU tar); anything much larger is not
// a layer.
const maxTrailing = 1 << 20

// progressStep is how many bytes pass between progress callbacks.
const progressStep = 1 << 20

// Unpack applies the layers bottom-up into dest, an existing empty directory
// that the caller owns. progress, when not nil, is called with the archive
// bytes consumed so far and the total layer bytes. On error dest holds a
// partial tree that the caller removes (with RemoveAll); nothing is ever
// written outside it. As root the tree may hold setuid-root programs, so
// dest should be reachable by its owner only (os.MkdirTemp gives 0700).
func (im *Image) Unpack(ctx context.Context, dest string, progress func(doneBytes, totalBytes int64)) error {
	f, err := os.Open(im.path)
	if err != nil {
		return errcode.Wrap(errcode.MalformedArchive, err, "cannot re-open image archive")
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return errcode.Wrap(errcode.MalformedArchive, err, "cannot stat image archive")
	}
	if fi.Size() != im.size || !fi.ModTime().Equal(im.modTime) {
		return errcode.New(errcode.MalformedArchive, "image archive %s changed since it was opened", im.path)
	}
	root, err := os.OpenRoot(dest)
	if err != nil {
		return errcode.Wrap(errcode.StagingFailed, err, "cannot open staging directory")
	}
	defer root.Close()

	a := newApplier(root, im.limits, im.log)
	for _, l := range im.layers {
		a.progress.total += l.size
	}
	a.progress.fn = progress
	for i, l := range im.layers {
		a.layer = i + 1
		r := &countingReader{r: io.NewSectionReader(f, l.offset, l.size), p: &a.progress}
		if err := a.applyLayer(ctx, r, im.diffIDs[i]); err != nil {
			return err
		}
	}
	if err := a.finish(); err != nil {
		return err
	}
	a.progress.report(true)
	return nil
}

// progress rate-limits the caller's callback.
type progress struct {
	fn          func(done, total int64)
	done, total int64
	last        int64
}

func (p *progress) report(final bool) {
	if p.fn != nil && (final || p.done-p.last >= progressStep) {
		p.last = p.done
		p.fn(p.done, p.total)
	}
}

type countingReader struct {
	r io.Reader
	p *progress
}

func (c *countingReader) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.p.done += int64(n)
	return n, err
}

// dirMeta is applied to directories after all layers, deepest first:
// setting a directory's mode early could make it unwritable (as non-root) and
// writing into it later would change its mtime.
type dirMeta struct {
	mode         fs.FileMode
	atime, mtime time.Time
}

// applier holds the state of one Unpack.
type applier struct {
	root     *os.Root
	limits   Limits
	log      *slog.Logger
	asRoot   bool
	dirs     map[string]dirMeta
	layer    int
	entries  int
	total    int64
	created  map[string]struct{} // paths this layer created or replaced
	progress progress
}

func newApplier(root *os.Root, limits Limits, log *slog.Logger) *applier {
	return &applier{root: root, limits: limits, log: log, asRoot: os.Geteuid() == 0, dirs: map[string]dirMeta{}}
}

func (a *applier) errorf(code errcode.Code, name, format string, args ...any) error {
	return errcode.New(code, "layer %d: entry %q: "+format, append([]any{a.layer, name}, args...)...)
}

func (a *applier) wrapf(code errcode.Code, err error, name, format string, args ...any) error {
	return errcode.Wrap(code, err, "layer %d: entry %q: "+format, append([]any{a.layer, name}, args...)...)
}

// applyLayer reads one layer stream and applies it, then checks the
// uncompressed stream against the config's diff ID.
func (a *applier) applyLayer(ctx context.Context, r io.Reader, diffID v1.Hash) error {
	dr, err := decompress(bufio.NewReaderSize(r, 64<<10))
	if err != nil {
		return errcode.Wrap(errcode.MalformedArchive, err, "layer %d", a.layer)
	}
	h := sha256.New()
	rr := &readErr{r: io.TeeReader(dr, h)}
	tr := tar.NewReader(rr)
	a.created = map[string]struct{}{}
	for {
		if err := ctx.Err(); err != nil {
			return errcode.Wrap(errcode.StagingFailed, err, "unpacking cancelled")
		}
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return errcode.Wrap(errcode.MalformedArchive, err, "layer %d is not a valid tar", a.layer)
		}
		a.entries++
		if a.entries > a.limits.MaxEntries {
			return errcode.New(errcode.SizeLimit, "image has more than %d entries", a.limits.MaxEntries)
		}
		if err := a.apply(tr, rr, hdr); err != nil {
			return err
		}
		a.progress.report(false)
	}
	n, err := io.Copy(io.Discard, io.LimitReader(rr, maxTrailing+1))
	if err != nil {
		return errcode.Wrap(errcode.MalformedArchive, err, "layer %d: reading past its end", a.layer)
	}
	if n > maxTrailing {
		return errcode.New(errcode.MalformedArchive, "layer %d: more than %d bytes after the tar's end", a.layer, maxTrailing)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != diffID.Hex {
		return errcode.New(errcode.MalformedArchive, "layer %d: content sha256:%s does not match the config's %s", a.layer, got, diffID)
	}
	return nil
}

// readErr remembers a read error so that a failed copy can be blamed on the
// archive (E405) or on the staging directory (E409).
type readErr struct {
	r   io.Reader
	err error
}

func (r *readErr) Read(b []byte) (int, error) {
	n, err := r.r.Read(b)
	if err != nil && err != io.EOF {
		r.err = err
	}
	return n, err
}

// decompress detects the layer's compression by its magic bytes.
func decompress(br *bufio.Reader) (io.Reader, error) {
	magic, _ := br.Peek(6) // a short layer is left for the tar reader to refuse
	switch {
	case bytes.HasPrefix(magic, []byte{0x1f, 0x8b}):
		return gzip.NewReader(br)
	case bytes.HasPrefix(magic, []byte("BZh")):
		return bzip2.NewReader(br), nil
	case bytes.HasPrefix(magic, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		return nil, errors.New("zstd-compressed layers are not supported")
	case bytes.HasPrefix(magic, []byte{0xfd, '7', 'z', 'X', 'Z', 0}):
		return nil, errors.New("xz-compressed layers are not supported")
	}
	return br, nil
}

// cleanName turns an entry name into a path relative to the root, "." for
// the root itself. ".." components and absolute names are refused.
func cleanName(name string) (string, bool) {
	if name == "" || strings.HasPrefix(name, "/") {
		return "", false
	}
	for strings.HasPrefix(name, "./") {
		name = strings.TrimLeft(name[2:], "/")
	}
	if name == "" {
		return ".", true
	}
	if slices.Contains(strings.Split(name, "/"), "..") {
		return "", false
	}
	return path.Clean(name), true
}

// apply applies one entry.
func (a *applier) apply(tr *tar.Reader, rr *readErr, hdr *tar.Header) error {
	if hdr.Typeflag == tar.TypeXGlobalHeader {
		return nil
	}
	name, ok := cleanName(hdr.Name)
	if !ok {
		return a.errorf(errcode.UnsafeArchiveEntry, hdr.Name, "path leaves the image root")
	}
	// Sizes are checked for every entry, whiteouts too: the tar reader would
	// otherwise read through whatever content an entry declares.
	if hdr.Size > a.limits.MaxEntrySize {
		return a.errorf(errcode.SizeLimit, hdr.Name, "declared size %d is over the limit of %d", hdr.Size, a.limits.MaxEntrySize)
	}
	a.total += hdr.Size
	if a.total > a.limits.MaxTotalSize {
		return a.errorf(errcode.SizeLimit, hdr.Name, "entries add up to more than the limit of %d bytes", a.limits.MaxTotalSize)
	}
	dir, base := path.Split(name)
	if strings.HasPrefix(base, whiteoutPrefix) {
		return a.whiteout(hdr.Name, dir, base)
	}
	if name == "." {
		if hdr.Typeflag != tar.TypeDir {
			return a.errorf(errcode.UnsafeArchiveEntry, hdr.Name, "only a directory may name the image root")
		}
		return a.dir(hdr, name)
	}
	if _, err := a.walkDir(hdr.Name, dir, true); err != nil {
		return err
	}
	var link string
	if hdr.Typeflag == tar.TypeLink {
		var err error
		if link, err = a.linkTarget(hdr, name); err != nil {
			return err
		}
	}
	if fi, err := a.root.Lstat(name); err == nil {
		if !fi.IsDir() || hdr.Typeflag != tar.TypeDir {
			if err := a.removeAll(name, fi.IsDir()); err != nil {
				return a.wrapf(errcode.StagingFailed, err, hdr.Name, "cannot replace")
			}
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return a.wrapf(errcode.StagingFailed, err, hdr.Name, "cannot inspect")
	}
	a.created[name] = struct{}{}
	switch hdr.Typeflag {
	case tar.TypeReg, tar.TypeGNUSparse:
		return a.file(tr, rr, hdr, name)
	case tar.TypeDir:
		return a.dir(hdr, name)
	case tar.TypeSymlink:
		return a.symlink(hdr, name)
	case tar.TypeLink:
		if err := a.root.Link(link, name); err != nil {
			return a.wrapf(errcode.StagingFailed, err, hdr.Name, "cannot create hardlink")
		}
		return nil
	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		return a.node(hdr, name)
	}
	return a.errorf(errcode.MalformedArchive, hdr.Name, "unsupported tar entry type %q", hdr.Typeflag)
}

// walkDir checks that every component of dir is a real directory, not a
// symlink. Missing components are created when create is set; otherwise the
// walk stops there and reports that dir does not exist.
func (a *applier) walkDir(entry, dir string, create bool) (bool, error) {
	dir = strings.TrimSuffix(dir, "/")
	if dir == "" || dir == "." {
		return true, nil
	}
	cur := ""
	for comp := range strings.SplitSeq(dir, "/") {
		cur = path.Join(cur, comp)
		fi, err := a.root.Lstat(cur)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			if !create {
				return false, nil
			}
			if err := a.root.Mkdir(cur, 0o755); err != nil {
				return false, a.wrapf(errcode.StagingFailed, err, entry, "cannot create parent %q", cur)
			}
			a.created[cur] = struct{}{}
		case err != nil:
			return false, a.wrapf(errcode.StagingFailed, err, entry, "cannot inspect parent %q", cur)
		case fi.Mode()&fs.ModeSymlink != 0:
			return false, a.errorf(errcode.UnsafeArchiveEntry, entry, "path goes through the symlink %q", cur)
		case !fi.IsDir():
			return false, a.errorf(errcode.MalformedArchive, entry, "parent %q is not a directory", cur)
		}
	}
	return true, nil
}

// linkTarget validates a hardlink's target: inside the root, reached
// without symlinks, existing, not a directory, not the entry itself.
func (a *applier) linkTarget(hdr *tar.Header, name string) (string, error) {
	target, ok := cleanName(hdr.Linkname)
	if !ok {
		return "", a.errorf(errcode.UnsafeArchiveEntry, hdr.Name, "hardlink target %q leaves the image root", hdr.Linkname)
	}
	if target == "." || target == name {
		return "", a.errorf(errcode.MalformedArchive, hdr.Name, "invalid hardlink target %q", hdr.Linkname)
	}
	exists, err := a.walkDir(hdr.Name, path.Dir(target), false)
	if err != nil {
		return "", err
	}
	var fi fs.FileInfo
	if exists {
		fi, err = a.root.Lstat(target)
	}
	if !exists || errors.Is(err, fs.ErrNotExist) {
		return "", a.errorf(errcode.MalformedArchive, hdr.Name, "hardlink target %q does not exist", hdr.Linkname)
	}
	if err != nil {
		return "", a.wrapf(errcode.StagingFailed, err, hdr.Name, "cannot inspect hardlink target")
	}
	if fi.IsDir() {
		return "", a.errorf(errcode.MalformedArchive, hdr.Name, "hardlink target %q is a directory", hdr.Linkname)
	}
	return target, nil
}

func fileMode(hdr *tar.Header) fs.FileMode {
	return hdr.FileInfo().Mode() & (fs.ModePerm | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky)
}

func times(hdr *tar.Header) (atime, mtime time.Time) {
	if hdr.AccessTime.IsZero() {
		return hdr.ModTime, hdr.ModTime
	}
	return hdr.AccessTime, hdr.ModTime
}

func (a *applier) file(tr *tar.Reader, rr *readErr, hdr *tar.Header, name string) error {
	f, err := a.root.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return a.wrapf(errcode.StagingFailed, err, hdr.Name, "cannot create")
	}
	err = a.fillFile(f, tr, rr, hdr)
	if cerr := f.Close(); err == nil && cerr != nil {
		err = a.wrapf(errcode.StagingFailed, cerr, hdr.Name, "cannot write")
	}
	if err != nil {
		return err
	}
	atime, mtime := times(hdr)
	if err := a.root.Chtimes(name, atime, mtime); err != nil {
		return a.wrapf(errcode.StagingFailed, err, hdr.Name, "cannot set times")
	}
	return nil
}

func (a *applier) fillFile(f *os.File, tr *tar.Reader, rr *readErr, hdr *tar.Header) error {
	if _, err := io.Copy(f, tr); err != nil {
		if rr.err != nil || errors.Is(err, io.ErrUnexpectedEOF) {
			return a.wrapf(errcode.MalformedArchive, err, hdr.Name, "truncated or corrupt content")
		}
		return a.wrapf(errcode.StagingFailed, err, hdr.Name, "cannot write")
	}
	// Chown before chmod: chown clears setuid and setgid bits.
	if a.asRoot {
		if err := f.Chown(hdr.Uid, hdr.Gid); err != nil {
			return a.wrapf(errcode.StagingFailed, err, hdr.Name, "cannot set owner")
		}
	}
	if err := f.Chmod(fileMode(hdr)); err != nil {
		return a.wrapf(errcode.StagingFailed, err, hdr.Name, "cannot set mode")
	}
	return nil
}

func (a *applier) dir(hdr *tar.Header, name string) error {
	if name != "." {
		if fi, err := a.root.Lstat(name); err != nil || !fi.IsDir() {
			if err := a.root.Mkdir(name, 0o700); err != nil {
				return a.wrapf(errcode.StagingFailed, err, hdr.Name, "cannot create directory")
			}
		}
	}
	if a.asRoot {
		if err := a.root.Lchown(name, hdr.Uid, hdr.Gid); err != nil {
			return a.wrapf(errcode.StagingFailed, err, hdr.Name, "cannot set owner")
		}
	}
	atime, mtime := times(hdr)
	a.dirs[name] = dirMeta{mode: fileMode(hdr), atime: atime, mtime: mtime}
	return nil
}

func (a *applier) symlink(hdr *tar.Header, name string) error {
	if hdr.Linkname == "" {
		return a.errorf(errcode.MalformedArchive, hdr.Name, "symlink without a target")
	}
	if err := a.root.Symlink(hdr.Linkname, name); err != nil {
		return a.wrapf(errcode.StagingFailed, err, hdr.Name, "cannot create symlink")
	}
	if a.asRoot {
		if err := a.root.Lchown(name, hdr.Uid, hdr.Gid); err != nil {
			return a.wrapf(errcode.StagingFailed, err, hdr.Name, "cannot set owner")
		}
	}
	atime, mtime := times(hdr)
	err := a.inParent(name, func(fd int, base string) error {
		ts := []unix.Timespec{unix.NsecToTimespec(atime.UnixNano()), unix.NsecToTimespec(mtime.UnixNano())}
		return unix.UtimesNanoAt(fd, base, ts, unix.AT_SYMLINK_NOFOLLOW)
	})
	if err != nil {
		return a.wrapf(errcode.StagingFailed, err, hdr.Name, "cannot set symlink times")
	}
	return nil
}

// node creates a FIFO, and skips character and block devices: hyphae-init
// mounts devtmpfs over /dev, so the image needs none, and a device node that
// a hostile image placed in the staging tree (say, the host's disk with mode
// 0666) would be a way into the host for anyone who can reach the tree.
func (a *applier) node(hdr *tar.Header, name string) error {
	if hdr.Typeflag != tar.TypeFifo {
		a.log.Debug("skipping device node", "layer", a.layer, "entry", hdr.Name)
		return nil
	}
	err := a.inParent(name, func(fd int, base string) error { return unix.Mkfifoat(fd, base, 0o600) })
	if err != nil {
		return a.wrapf(errcode.StagingFailed, err, hdr.Name, "cannot create fifo")
	}
	if a.asRoot {
		if err := a.root.Lchown(name, hdr.Uid, hdr.Gid); err != nil {
			return a.wrapf(errcode.StagingFailed, err, hdr.Name, "cannot set owner")
		}
	}
	if err := a.root.Chmod(name, fileMode(hdr)); err != nil {
		return a.wrapf(errcode.StagingFailed, err, hdr.Name, "cannot set mode")
	}
	atime, mtime := times(hdr)
	if err := a.root.Chtimes(name, atime, mtime); err != nil {
		return a.wrapf(errcode.StagingFailed, err, hdr.Name, "cannot set times")
	}
	return nil
}

// inParent runs fn with a descriptor of name's parent directory (already
// checked to be a real directory inside the root) and name's base, for the
// *at system calls that os.Root does not offer.
func (a *applier) inParent(name string, fn func(fd int, base string) error) error {
	d, err := a.root.OpenFile(path.Dir(name), os.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return err
	}
	defer d.Close()
	rc, err := d.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(int(fd), path.Base(name)) }); err != nil {
		return err
	}
	return ferr
}

// whiteout applies a `.wh.` entry found in dir.
func (a *applier) whiteout(entry, dir, base string) error {
	if base != whiteoutOpaque && strings.HasPrefix(base, whiteoutMeta) {
		a.log.Debug("skipping whiteout metadata", "layer", a.layer, "entry", entry)
		return nil
	}
	victim := strings.TrimPrefix(base, whiteoutPrefix)
	if base != whiteoutOpaque && (victim == "" || victim == "." || victim == "..") {
		return a.errorf(errcode.UnsafeArchiveEntry, entry, "whiteout of %q", victim)
	}
	exists, err := a.walkDir(entry, dir, false)
	if err != nil || !exists {
		return err
	}
	dir = strings.TrimSuffix(dir, "/")
	if base == whiteoutOpaque {
		return a.removeLower(entry, path.Clean("./"+dir))
	}
	target := path.Join(dir, victim)
	if _, ok := a.created[target]; ok {
		return nil // whiteouts hide lower layers, not this one
	}
	fi, err := a.root.Lstat(target)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err == nil {
		err = a.removeAll(target, fi.IsDir())
	}
	if err != nil {
		return a.wrapf(errcode.StagingFailed, err, entry, "cannot apply whiteout")
	}
	return nil
}

// removeLower removes everything under dir that this layer did not create,
// descending into directories it did create (their lower contents are hidden
// too).
func (a *applier) removeLower(entry, dir string) error {
	d, err := a.root.OpenFile(dir, os.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return a.wrapf(errcode.StagingFailed, err, entry, "cannot open opaque directory")
	}
	list, err := d.ReadDir(-1)
	d.Close()
	if err != nil {
		return a.wrapf(errcode.StagingFailed, err, entry, "cannot list opaque directory")
	}
	for _, e := range list {
		p := path.Join(dir, e.Name())
		if _, ok := a.created[p]; ok {
			if e.IsDir() {
				if err := a.removeLower(entry, p); err != nil {
					return err
				}
			}
			continue
		}
		if err := a.removeAll(p, e.IsDir()); err != nil {
			return a.wrapf(errcode.StagingFailed, err, entry, "cannot apply opaque whiteout")
		}
	}
	return nil
}

// removeAll removes p and forgets the directory metadata recorded under it.
func (a *applier) removeAll(p string, isDir bool) error {
	if isDir {
		prefix := p + "/"
		for k := range a.dirs {
			if k == p || strings.HasPrefix(k, prefix) {
				delete(a.dirs, k)
			}
		}
	}
	return a.root.RemoveAll(p)
}

// finish applies directory modes and times, deepest first.
func (a *applier) finish() error {
	names := make([]string, 0, len(a.dirs))
	for k := range a.dirs {
		names = append(names, k)
	}
	depth := func(s string) int {
		if s == "." {
			return -1
		}
		return strings.Count(s, "/")
	}
	slices.SortFunc(names, func(x, y string) int { return depth(y) - depth(x) })
	for _, n := range names {
		m := a.dirs[n]
		if fi, err := a.root.Lstat(n); err != nil || !fi.IsDir() {
			continue
		}
		if err := a.root.Chmod(n, m.mode); err != nil {
			return errcode.Wrap(errcode.StagingFailed, err, "directory %q: cannot set mode", n)
		}
		if err := a.root.Chtimes(n, m.atime, m.mtime); err != nil {
			return errcode.Wrap(errcode.StagingFailed, err, "directory %q: cannot set times", n)
		}
	}
	return nil
}

// RemoveAll removes an unpacked tree. Unpack gives directories their image
// modes, some without write permission, which an unprivileged os.RemoveAll
// cannot get through; RemoveAll first makes every directory writable by its
// owner. Symlinks are not followed.
func RemoveAll(dir string) error {
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			err = os.Chmod(p, 0o700)
		}
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return err
	})
	if err == nil || errors.Is(err, fs.ErrNotExist) {
		err = os.RemoveAll(dir)
	}
	if err != nil {
		return errcode.Wrap(errcode.StagingFailed, err, "cannot remove unpacked tree %s", dir)
	}
	return nil
}
