package rootfs

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hyphae-run/hyphae/errcode"
)

func TestTreeDigest(t *testing.T) {
	base := func(t *testing.T, dir string) {
		writeFile(t, dir, "app/main.js", "console.log(1)\n")
		writeFile(t, dir, "app/lib/a.js", "a")
		symlink(t, "main.js", dir, "app/start")
		if err := os.Chtimes(filepath.Join(dir, "app/main.js"), Epoch(), Epoch()); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct {
		name   string
		mutate func(t *testing.T, dir string)
		same   bool
	}{
		{name: "unchanged", mutate: func(*testing.T, string) {}, same: true},
		{name: "directory mtime", same: true, mutate: func(t *testing.T, dir string) {
			if err := os.Chtimes(filepath.Join(dir, "app"), time.Now(), time.Unix(12345, 0)); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "file atime only", same: true, mutate: func(t *testing.T, dir string) {
			if err := os.Chtimes(filepath.Join(dir, "app/main.js"), time.Unix(5, 0), Epoch()); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "content", mutate: func(t *testing.T, dir string) { writeFile(t, dir, "app/lib/a.js", "b") }},
		{name: "content moved between files", mutate: func(t *testing.T, dir string) {
			writeFile(t, dir, "app/lib/a.js", "")
			writeFile(t, dir, "app/main.js", "console.log(1)\na")
		}},
		{name: "file mtime", mutate: func(t *testing.T, dir string) {
			if err := os.Chtimes(filepath.Join(dir, "app/main.js"), Epoch(), time.Unix(1, 0)); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "mode", mutate: func(t *testing.T, dir string) {
			if err := os.Chmod(filepath.Join(dir, "app/main.js"), 0o755); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "setuid", mutate: func(t *testing.T, dir string) {
			if err := os.Chmod(filepath.Join(dir, "app/main.js"), 0o644|os.ModeSetuid); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "symlink target", mutate: func(t *testing.T, dir string) {
			os.Remove(filepath.Join(dir, "app/start"))
			symlink(t, "lib/a.js", dir, "app/start")
		}},
		{name: "new empty file", mutate: func(t *testing.T, dir string) { writeFile(t, dir, "app/empty", "") }},
		{name: "new empty dir", mutate: func(t *testing.T, dir string) { mkdirs(t, dir, "app/empty") }},
		{name: "renamed", mutate: func(t *testing.T, dir string) {
			if err := os.Rename(filepath.Join(dir, "app/lib/a.js"), filepath.Join(dir, "app/lib/b.js")); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "copy becomes hard link", mutate: func(t *testing.T, dir string) {
			writeFile(t, dir, "app/copy", "a")
			if err := os.Link(filepath.Join(dir, "app/lib/a.js"), filepath.Join(dir, "app/copy2")); err != nil {
				t.Fatal(err)
			}
			os.Remove(filepath.Join(dir, "app/copy"))
			if err := os.Rename(filepath.Join(dir, "app/copy2"), filepath.Join(dir, "app/copy")); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "xattr", mutate: func(t *testing.T, dir string) {
			if err := unix.Setxattr(filepath.Join(dir, "app/main.js"), "user.hyphae", []byte("1"), 0); err != nil {
				t.Skipf("no user xattrs here: %v", err)
			}
		}},
	}
	ctx := context.Background()
	ref := t.TempDir()
	base(t, ref)
	writeFile(t, ref, "app/copy", "a") // the hard-link case compares against a plain copy
	want, err := TreeDigest(ctx, ref, "salt")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(want, "sha256:") || len(want) != len("sha256:")+64 {
		t.Fatalf("digest %q", want)
	}
	if other, _ := TreeDigest(ctx, ref, "salt2"); other == want {
		t.Error("salt does not change the digest")
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			base(t, dir)
			writeFile(t, dir, "app/copy", "a")
			tt.mutate(t, dir)
			got, err := TreeDigest(ctx, dir, "salt")
			if err != nil {
				t.Fatal(err)
			}
			if (got == want) != tt.same {
				t.Errorf("digest equal = %v, want %v", got == want, tt.same)
			}
		})
	}
}

func TestNormalizeTimes(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "a/b", "x")
	symlink(t, "/nonexistent", dir, "a/dangling")
	if err := NormalizeTimes(context.Background(), dir, Epoch()); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{".", "a", "a/b", "a/dangling"} {
		fi, err := os.Lstat(filepath.Join(dir, p))
		if err != nil || !fi.ModTime().Equal(Epoch()) {
			t.Errorf("%s mtime %v (%v)", p, fi.ModTime(), err)
		}
	}
}

// TestWalksCancelled: a cancelled walk is a coded error that still matches
// context.Canceled.
func TestWalksCancelled(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "a", "a")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	walks := map[string]func() error{
		"TreeDigest":     func() error { _, err := TreeDigest(ctx, dir, ""); return err },
		"Measure":        func() error { _, err := Measure(ctx, dir); return err },
		"NormalizeTimes": func() error { return NormalizeTimes(ctx, dir, Epoch()) },
	}
	for name, walk := range walks {
		t.Run(name, func(t *testing.T) {
			err := walk()
			if !errcode.HasCode(err, errcode.StagingFailed) || !errors.Is(err, context.Canceled) {
				t.Errorf("err = %v, want %s wrapping context.Canceled", err, errcode.StagingFailed)
			}
		})
	}
}
