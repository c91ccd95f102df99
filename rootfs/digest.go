package rootfs

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"hash"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hyphae-run/hyphae/errcode"
)

// Entry type tags in the digest stream.
const (
	tagFile    = 'f'
	tagLink    = 'h' // hard link to an earlier path
	tagDir     = 'd'
	tagSymlink = 'l'
	tagDevice  = 'c'
	tagOther   = 'o' // fifo, socket
)

// TreeDigest returns "sha256:<hex>" naming the tree at dir together with
// salt. The package doc lists what it covers. Symlinks are not followed.
func TreeDigest(ctx context.Context, dir, salt string) (string, error) {
	d := digester{h: sha256.New(), links: map[[2]uint64]string{}}
	d.str("hyphae-tree-digest/1")
	d.str(salt)
	err := filepath.WalkDir(dir, func(p string, de fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		return d.entry(p, filepath.ToSlash(rel))
	})
	if err != nil {
		return "", errcode.Wrap(errcode.StagingFailed, err, "digest staged tree")
	}
	return "sha256:" + hex.EncodeToString(d.h.Sum(nil)), nil
}

// digester writes an unambiguous stream (every variable field is length
// prefixed) into h.
type digester struct {
	h     hash.Hash
	links map[[2]uint64]string // (dev, ino) of multiply-linked files → first path
	buf   []byte
}

func (d *digester) num(v uint64) {
	d.h.Write(binary.BigEndian.AppendUint64(d.buf[:0], v))
}

func (d *digester) str(s string) {
	d.num(uint64(len(s)))
	io.WriteString(d.h, s)
}

func (d *digester) entry(p, rel string) error {
	fi, err := os.Lstat(p)
	if err != nil {
		return err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return &fs.PathError{Op: "digest", Path: p, Err: syscall.ENOTSUP}
	}
	mode := fi.Mode()
	if !mode.IsDir() && st.Nlink > 1 {
		k := [2]uint64{uint64(st.Dev), st.Ino}
		if first, ok := d.links[k]; ok {
			d.num(tagLink)
			d.str(rel)
			d.str(first)
			return nil
		}
		d.links[k] = rel
	}
	switch {
	case mode.IsRegular():
		d.num(tagFile)
	case mode.IsDir():
		d.num(tagDir)
	case mode&fs.ModeSymlink != 0:
		d.num(tagSymlink)
	case mode&fs.ModeDevice != 0:
		d.num(tagDevice)
	default:
		d.num(tagOther)
	}
	d.str(rel)
	d.num(uint64(st.Mode &^ syscall.S_IFMT)) // permissions with setuid, setgid, sticky
	d.num(uint64(st.Uid))
	d.num(uint64(st.Gid))
	if err := d.xattrs(p); err != nil {
		return err
	}
	switch {
	case mode.IsRegular():
		d.num(uint64(fi.Size()))
		d.num(uint64(fi.ModTime().Unix()))
		return d.content(p)
	case mode&fs.ModeSymlink != 0:
		target, err := os.Readlink(p)
		if err != nil {
			return err
		}
		d.str(target)
	case mode&fs.ModeDevice != 0:
		d.num(st.Rdev)
		if mode&fs.ModeCharDevice != 0 {
			d.num(1)
		} else {
			d.num(0)
		}
	case !mode.IsDir():
		d.num(uint64(mode.Type()))
	}
	return nil
}

// content hashes the file's bytes separately, then adds that hash, so that
// the stream stays length-prefixed without reading the file twice.
func (d *digester) content(p string) error {
	// O_NOATIME keeps the read from changing the atime that mkfs.ext4
	// copies into the image; only the owner (or root) may use it.
	f, err := os.OpenFile(p, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NOATIME, 0)
	if err != nil {
		f, err = os.OpenFile(p, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	}
	if err != nil {
		return err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return err
	}
	d.h.Write(h.Sum(nil))
	return nil
}

// xattrs adds the entry's extended attributes in name order; mkfs.ext4 -d
// copies them into the image.
func (d *digester) xattrs(p string) error {
	names, err := listXattrs(p)
	if err != nil {
		return err
	}
	sort.Strings(names)
	d.num(uint64(len(names)))
	for _, n := range names {
		v, err := getXattr(p, n)
		if err != nil {
			return err
		}
		d.str(n)
		d.str(string(v))
	}
	return nil
}

func listXattrs(p string) ([]string, error) {
	size, err := unix.Llistxattr(p, nil)
	if err != nil || size == 0 {
		if err == unix.ENOTSUP {
			err = nil
		}
		return nil, err
	}
	buf := make([]byte, size)
	size, err = unix.Llistxattr(p, buf)
	if err != nil {
		return nil, err
	}
	var names []string
	for start, i := 0, 0; i < size; i++ {
		if buf[i] == 0 {
			if i > start {
				names = append(names, string(buf[start:i]))
			}
			start = i + 1
		}
	}
	return names, nil
}

func getXattr(p, name string) ([]byte, error) {
	size, err := unix.Lgetxattr(p, name, nil)
	if err != nil || size == 0 {
		return nil, err
	}
	buf := make([]byte, size)
	size, err = unix.Lgetxattr(p, name, buf)
	return buf[:size], err
}

// NormalizeTimes sets the access and modification times of every entry of
// the tree at dir (symlinks themselves, not their targets) to t. Package
// image does this for project builds, whose staged files carry the time of
// the build, so that their images can be cached and reproduced.
func NormalizeTimes(ctx context.Context, dir string, t time.Time) error {
	ts := []unix.Timespec{unix.NsecToTimespec(t.UnixNano()), unix.NsecToTimespec(t.UnixNano())}
	err := filepath.WalkDir(dir, func(p string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		return unix.UtimesNanoAt(unix.AT_FDCWD, p, ts, unix.AT_SYMLINK_NOFOLLOW)
	})
	if err != nil {
		return errcode.Wrap(errcode.StagingFailed, err, "set times in staged tree")
	}
	return nil
}
