package rootfs

import (
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/hyphae-run/hyphae/errcode"
)

// BlockSize is the ext4 block size hyphae uses.
const BlockSize = 4096

// inodeSize is mkfs.ext4's default on-disk inode size.
const inodeSize = 256

const mib = 1 << 20

// Usage is what a tree needs from a filesystem (see the package doc).
type Usage struct {
	// Entries counts files, directories, symlinks and other nodes, the root
	// included; hard links to one inode count once.
	Entries int64
	// DataBlocks counts the 4 KiB blocks of file data, long symlink targets
	// and directory entries.
	DataBlocks int64
	// Bytes is the sum of regular file sizes, for messages.
	Bytes int64
}

// Measure walks dir (without following symlinks) and returns its Usage.
func Measure(ctx context.Context, dir string) (Usage, error) {
	var u Usage
	type inode struct{ dev, ino uint64 }
	seen := map[inode]bool{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Nlink > 1 && !fi.IsDir() {
			k := inode{uint64(st.Dev), st.Ino}
			if seen[k] {
				return nil
			}
			seen[k] = true
		}
		u.Entries++
		switch {
		case fi.Mode().IsRegular():
			u.Bytes += fi.Size()
			u.DataBlocks += ceilDiv(fi.Size(), BlockSize)
		case fi.Mode()&fs.ModeSymlink != 0:
			if fi.Size() >= 60 {
				u.DataBlocks++
			}
		case fi.IsDir():
			blocks, err := dirBlocks(p)
			if err != nil {
				return err
			}
			u.DataBlocks += blocks
		}
		return nil
	})
	if err != nil {
		return Usage{}, errcode.Wrap(errcode.StagingFailed, err, "measure staged tree")
	}
	return u, nil
}

// dirBlocks estimates the blocks of directory p: 8 bytes plus the name
// rounded up to 4 per entry, "." and ".." included, times 1.5 for the slack
// of hashed directories.
func dirBlocks(p string) (int64, error) {
	f, err := os.Open(p)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	names, err := f.Readdirnames(-1)
	if err != nil {
		return 0, err
	}
	bytes := int64(24)
	for _, n := range names {
		bytes += 8 + (int64(len(n))+3)/4*4
	}
	return max(1, ceilDiv(bytes*3/2, BlockSize)), nil
}

// Plan is the filesystem geometry for one tree.
type Plan struct {
	// SizeBytes is the size of the image file.
	SizeBytes int64
	// MinBytes is the smallest size PlanSize accepts for the tree.
	MinBytes int64
	// Inodes is the inode count given to mkfs.ext4 (-N).
	Inodes int64
	// JournalMiB is the journal size given to mkfs.ext4 (-J size=).
	JournalMiB int64
}

// FloorBytes is the smallest image PlanSize makes.
const FloorBytes = 16 * mib

// PlanSize applies the sizing rule of the package doc to u. sizeMiB > 0
// asks for that size instead of the computed one; it must not be below the
// minimum.
func PlanSize(u Usage, sizeMiB int) (Plan, error) {
	if sizeMiB < 0 {
		return Plan{}, errcode.New(errcode.InvalidArgument, "image size %d MiB is negative", sizeMiB)
	}
	p := Plan{Inodes: ceilDiv(u.Entries*5, 4) + 1024}
	data := u.DataBlocks * BlockSize
	switch {
	case data < 256*mib:
		p.JournalMiB = 4
	case data < 1024*mib:
		p.JournalMiB = 16
	default:
		p.JournalMiB = 64
	}
	fixed := p.Inodes*inodeSize + p.JournalMiB*mib
	withOverhead := func(b int64) int64 { return roundUp(b+b/50+4*mib, mib) }
	p.MinBytes = withOverhead(data + data/20 + fixed)
	p.SizeBytes = max(FloorBytes, withOverhead(data+data/5+fixed))
	if sizeMiB > 0 {
		want := int64(sizeMiB) * mib
		if want < p.MinBytes {
			return Plan{}, errcode.New(errcode.SizeLimit, "image size %d MiB is below the %d MiB the tree needs (%d entries, %d MiB of data)",
				sizeMiB, p.MinBytes/mib, u.Entries, ceilDiv(data, mib)).
				WithHint("omit --size to let hyphae size the image, or give at least --size " + strconv.FormatInt(p.MinBytes/mib, 10))
		}
		p.SizeBytes = want
	}
	return p, nil
}

func ceilDiv(a, b int64) int64 { return (a + b - 1) / b }

func roundUp(a, m int64) int64 { return ceilDiv(a, m) * m }
