package firecracker

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/internal/testenv"
)

// allocated returns the bytes really allocated to path.
func allocated(t testing.TB, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func TestMakeScratch(t *testing.T) {
	testenv.RequiresTool(t, "mkfs.ext4")
	path := filepath.Join(t.TempDir(), "scratch.ext4")
	if err := makeScratch(context.Background(), path, DefaultScratchSize); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() != DefaultScratchSize || st.Mode().Perm() != 0o600 {
		t.Errorf("size %d mode %v", st.Size(), st.Mode())
	}
	if a := allocated(t, path); a > 4<<20 {
		t.Errorf("%d bytes allocated; the layer should be sparse", a)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// The ext2/3/4 superblock starts at 1024; s_magic is at offset 56.
	magic := make([]byte, 2)
	if _, err := f.ReadAt(magic, 1024+56); err != nil {
		t.Fatal(err)
	}
	if binary.LittleEndian.Uint16(magic) != 0xEF53 {
		t.Errorf("no ext4 superblock: magic %x", magic)
	}
	// The journal feature (compat 0x4) must be off: see scratchMkfsArgs.
	compat := make([]byte, 4)
	if _, err := f.ReadAt(compat, 1024+0x5C); err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	if binary.LittleEndian.Uint32(compat)&0x4 != 0 {
		t.Error("scratch layer has a journal")
	}
}

func TestMakeScratchFailures(t *testing.T) {
	testenv.RequiresTool(t, "mkfs.ext4")
	dir := t.TempDir()
	existing := filepath.Join(dir, "taken")
	if err := os.WriteFile(existing, []byte("keep me"), 0o600); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name, path string
		size       int64
		keep       bool
	}{
		{"no directory", filepath.Join(dir, "missing", "s.ext4"), 1 << 20, false},
		{"too small for ext4", filepath.Join(dir, "tiny.ext4"), 4096, false},
		{"path taken", existing, 1 << 20, true},
	}
	for _, c := range cases {
		err := makeScratch(context.Background(), c.path, c.size)
		if !errcode.HasCode(err, errcode.MkfsFailed) {
			t.Errorf("%s: %v", c.name, err)
		}
		_, serr := os.Stat(c.path)
		if exists := serr == nil; exists != c.keep {
			t.Errorf("%s: file exists=%v afterwards, want %v", c.name, exists, c.keep)
		}
	}
	if b, _ := os.ReadFile(existing); string(b) != "keep me" {
		t.Errorf("an existing file was overwritten: %q", b)
	}
}

// BenchmarkWritableLayer measures the per-VM cost of the writable layer
// (a sparse 1 GiB ext4 scratch file) against the alternative the design
// rejected, a private copy of the image (here a 64 MiB image with 16 MiB
// of data, copied as sparse as the copy can be made).
func BenchmarkWritableLayer(b *testing.B) {
	testenv.RequiresTool(b, "mkfs.ext4")
	dir := b.TempDir()
	b.Run("scratch-ext4-1GiB", func(b *testing.B) {
		var alloc int64
		for i := 0; b.Loop(); i++ {
			p := filepath.Join(dir, "s.ext4")
			if err := makeScratch(context.Background(), p, DefaultScratchSize); err != nil {
				b.Fatal(err)
			}
			alloc = allocated(b, p)
			os.Remove(p)
		}
		b.ReportMetric(float64(alloc)/1024, "KiB-allocated")
	})
	b.Run("copy-image-64MiB", func(b *testing.B) {
		img := filepath.Join(dir, "image.ext4")
		f, err := os.Create(img)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := f.Write(make([]byte, 16<<20)); err != nil {
			b.Fatal(err)
		}
		f.Truncate(64 << 20)
		f.Close()
		var alloc int64
		for b.Loop() {
			p := filepath.Join(dir, "copy.ext4")
			src, _ := os.Open(img)
			dst, _ := os.Create(p)
			if _, err := io.Copy(dst, src); err != nil {
				b.Fatal(err)
			}
			src.Close()
			dst.Close()
			alloc = allocated(b, p)
			os.Remove(p)
		}
		b.ReportMetric(float64(alloc)/1024, "KiB-allocated")
	})
}
