package rootfs

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/internal/testenv"
)

func TestPlanSize(t *testing.T) {
	small := Usage{Entries: 10, DataBlocks: 10}
	big := Usage{Entries: 30000, DataBlocks: 30000 + 1000}
	tests := []struct {
		name    string
		u       Usage
		sizeMiB int
		code    errcode.Code
		check   func(t *testing.T, p Plan)
	}{
		{name: "tiny tree gets the floor", u: small, check: func(t *testing.T, p Plan) {
			if p.SizeBytes != FloorBytes || p.Inodes != 10*5/4+1+1024 || p.JournalMiB != 4 {
				t.Errorf("plan = %+v", p)
			}
		}},
		{name: "many files", u: big, check: func(t *testing.T, p Plan) {
			data := big.DataBlocks * BlockSize
			if p.SizeBytes < data*6/5+p.Inodes*256 || p.SizeBytes%mib != 0 || p.MinBytes > p.SizeBytes {
				t.Errorf("plan = %+v for %d bytes of data", p, data)
			}
			if p.Inodes < big.Entries*5/4 {
				t.Errorf("inodes %d for %d entries", p.Inodes, big.Entries)
			}
		}},
		{name: "journal grows", u: Usage{Entries: 5, DataBlocks: 512 * mib / BlockSize}, check: func(t *testing.T, p Plan) {
			if p.JournalMiB != 16 {
				t.Errorf("journal %d MiB", p.JournalMiB)
			}
		}},
		{name: "explicit size kept", u: small, sizeMiB: 100, check: func(t *testing.T, p Plan) {
			if p.SizeBytes != 100*mib {
				t.Errorf("size %d", p.SizeBytes)
			}
		}},
		{name: "explicit size below minimum", u: big, sizeMiB: 20, code: errcode.SizeLimit},
		{name: "negative size", u: small, sizeMiB: -1, code: errcode.InvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := PlanSize(tt.u, tt.sizeMiB)
			if tt.code != "" {
				if !errcode.HasCode(err, tt.code) {
					t.Fatalf("err = %v, want %s", err, tt.code)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tt.check(t, p)
		})
	}
}

// TestMakeExt4Fits proves the sizing rule on trees at both ends: many tiny
// files (inodes and directory blocks dominate) and a few large ones (data
// dominates). mkfs.ext4 must succeed with the computed size, and the files
// must read back.
func TestMakeExt4Fits(t *testing.T) {
	testenv.RequiresTool(t, "debugfs")
	if _, err := MkfsPath(); err != nil {
		testenv.Unavailable(t, err.Error())
	}
	tests := []struct {
		name  string
		build func(t *testing.T, dir string) (probe string, want []byte)
	}{
		{name: "30k small files", build: func(t *testing.T, dir string) (string, []byte) {
			for d := range 30 {
				sub := filepath.Join(dir, "node_modules", fmt.Sprintf("pkg-%02d", d), "lib")
				mkdirs(t, sub, ".")
				for i := range 1000 {
					content := fmt.Sprintf("module.exports = %d; // %s\n", i, strings.Repeat("x", i%200))
					if err := os.WriteFile(filepath.Join(sub, fmt.Sprintf("file-with-a-longish-name-%04d.js", i)), []byte(content), 0o644); err != nil {
						t.Fatal(err)
					}
				}
			}
			return "/node_modules/pkg-29/lib/file-with-a-longish-name-0999.js",
				[]byte(fmt.Sprintf("module.exports = 999; // %s\n", strings.Repeat("x", 999%200)))
		}},
		{name: "3 large random files", build: func(t *testing.T, dir string) (string, []byte) {
			var last []byte
			for i := range 3 {
				b := make([]byte, 40_000_000+i*4097)
				rand.Read(b)
				writeFile(t, dir, fmt.Sprintf("data/blob%d", i), string(b))
				last = b
			}
			return "/data/blob2", last
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			dir := t.TempDir()
			probe, want := tt.build(t, dir)
			if err := WriteHyphaeFiles(dir, testFiles(t)); err != nil {
				t.Fatal(err)
			}
			u, err := Measure(ctx, dir)
			if err != nil {
				t.Fatal(err)
			}
			p, err := PlanSize(u, 0)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("usage %+v → plan %d MiB, %d inodes, journal %d MiB (min %d MiB)", u, p.SizeBytes/mib, p.Inodes, p.JournalMiB, p.MinBytes/mib)
			img := filepath.Join(t.TempDir(), "root.ext4")
			if err := MakeExt4(ctx, dir, img, MkfsOptions{Plan: p, Label: "hyphae", Seed: "test"}); err != nil {
				t.Fatal(err)
			}
			if fi, err := os.Stat(img); err != nil || fi.Size() != p.SizeBytes {
				t.Fatalf("image size %v, want %d", fi, p.SizeBytes)
			}
			got := debugfs(t, img, "cat "+probe)
			if !bytes.Equal(got, want) {
				t.Errorf("%s read back %d bytes (sha %x), want %d (sha %x)", probe, len(got), sha256.Sum256(got), len(want), sha256.Sum256(want))
			}
			if out := debugfs(t, img, "cat /etc/hyphae/workdir"); string(out) != "/app\n" {
				t.Errorf("workdir = %q", out)
			}
			fsck(t, img)

			// The minimum size fits as well: it is what --size may go down to.
			minImg := filepath.Join(t.TempDir(), "min.ext4")
			p.SizeBytes = p.MinBytes
			if err := MakeExt4(ctx, dir, minImg, MkfsOptions{Plan: p, Seed: "test"}); err != nil {
				t.Fatalf("minimum size %d MiB does not fit: %v", p.MinBytes/mib, err)
			}
		})
	}
}

func TestMakeExt4Failure(t *testing.T) {
	// A PATH-shadowing mkfs.ext4 that fails: fault injection for the
	// failure path, which a real mkfs.ext4 reaches on a full disk.
	bin := t.TempDir()
	writeFile(t, bin, "mkfs.ext4", "#!/bin/sh\necho 'mkfs.ext4: Could not allocate block in ext2 filesystem' >&2\nexit 1\n")
	if err := os.Chmod(filepath.Join(bin, "mkfs.ext4"), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", bin+string(os.PathListSeparator)+os.Getenv("PATH"))
	dir, outDir := t.TempDir(), t.TempDir()
	writeFile(t, dir, "a", "a")
	out := filepath.Join(outDir, "x.ext4")
	err := MakeExt4(context.Background(), dir, out, MkfsOptions{Plan: Plan{SizeBytes: FloorBytes, Inodes: 2048, JournalMiB: 4}, Seed: "s"})
	if !errcode.HasCode(err, errcode.MkfsFailed) || !strings.Contains(err.Error(), "Could not allocate block") {
		t.Fatalf("err = %v, want E407 with mkfs's stderr", err)
	}
	if ents, _ := os.ReadDir(outDir); len(ents) != 0 {
		t.Errorf("left behind: %v", ents)
	}

	// An existing out file is never overwritten.
	writeFile(t, outDir, "x.ext4", "keep")
	if err := MakeExt4(context.Background(), dir, out, MkfsOptions{Plan: Plan{SizeBytes: FloorBytes, Inodes: 2048, JournalMiB: 4}}); err == nil {
		t.Fatal("want an error for an existing out file")
	}
	wantContent(t, outDir, "x.ext4", "keep")
}

// TestMakeExt4Reproducible builds the same tree twice, from two copies
// staged at different times, and compares the images: the digest must
// match, and the bytes may differ only where ext4 keeps inode change times,
// which user space cannot set.
func TestMakeExt4Reproducible(t *testing.T) {
	testenv.RequiresTool(t, "debugfs")
	if _, err := MkfsPath(); err != nil {
		testenv.Unavailable(t, err.Error())
	}
	ctx := context.Background()
	var digests []string
	var images [][]byte
	for i := range 2 {
		if i > 0 {
			time.Sleep(1100 * time.Millisecond) // a later second for every inode time the kernel sets
		}
		dir := t.TempDir()
		for i := range 200 {
			writeFile(t, dir, fmt.Sprintf("app/d%d/f%d.txt", i%7, i), strings.Repeat("y", i*50))
		}
		symlink(t, "d0/f0.txt", dir, "app/link")
		if err := WriteHyphaeFiles(dir, testFiles(t)); err != nil {
			t.Fatal(err)
		}
		if err := NormalizeTimes(ctx, dir, Epoch()); err != nil {
			t.Fatal(err)
		}
		u, err := Measure(ctx, dir)
		if err != nil {
			t.Fatal(err)
		}
		p, err := PlanSize(u, 0)
		if err != nil {
			t.Fatal(err)
		}
		o := MkfsOptions{Plan: p, Label: "hyphae"}
		d, err := TreeDigest(ctx, dir, o.Params())
		if err != nil {
			t.Fatal(err)
		}
		o.Seed = d
		img := filepath.Join(t.TempDir(), "img.ext4")
		if err := MakeExt4(ctx, dir, img, o); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(img)
		if err != nil {
			t.Fatal(err)
		}
		digests = append(digests, d)
		images = append(images, b)
	}
	if digests[0] != digests[1] {
		t.Fatalf("digests differ: %s vs %s", digests[0], digests[1])
	}
	if len(images[0]) != len(images[1]) {
		t.Fatalf("image sizes differ")
	}
	var diff int
	for i := range images[0] {
		if images[0][i] != images[1][i] {
			diff++
		}
	}
	t.Logf("images of %d bytes differ in %d bytes", len(images[0]), diff)
	// Every differing byte must be inside an inode's ctime fields: allow
	// 8 bytes (i_ctime + i_ctime_extra) per inode plus the checksums of
	// the inodes and their block groups.
	if limit := 300 * 16; diff > limit {
		t.Errorf("images differ in %d bytes, more than inode times and checksums explain (%d)", diff, limit)
	}
}

func debugfs(t *testing.T, img, req string) []byte {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command("debugfs", "-R", req, img)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("debugfs -R %q: %v\n%s", req, err, stderr.String())
	}
	return stdout.Bytes()
}

func fsck(t *testing.T, img string) {
	t.Helper()
	e2fsck, err := exec.LookPath("e2fsck")
	if err != nil {
		e2fsck = "/usr/sbin/e2fsck"
	}
	if out, err := exec.Command(e2fsck, "-fn", img).CombinedOutput(); err != nil {
		t.Errorf("e2fsck -fn: %v\n%s", err, out)
	}
}
