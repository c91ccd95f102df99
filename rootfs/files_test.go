package rootfs

import (
	"bytes"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
)

// hostile builds, inside a fresh tree, links that try to redirect hyphae's
// writes; outside is a directory next to the tree holding a sentinel file.
type hostile struct {
	name  string
	setup func(t *testing.T, root, outside string)
	// check runs after WriteHyphaeFiles; the common checks always run.
	check func(t *testing.T, root string)
}

func TestWriteHyphaeFilesHostileSymlinks(t *testing.T) {
	cases := []hostile{
		{name: "plain empty tree"},
		{name: "resolv.conf absolute to sentinel", setup: func(t *testing.T, root, outside string) {
			mkdirs(t, root, "etc")
			symlink(t, filepath.Join(outside, "sentinel"), root, "etc/resolv.conf")
		}},
		{name: "resolv.conf relative escape", setup: func(t *testing.T, root, outside string) {
			mkdirs(t, root, "etc")
			symlink(t, "../../outside/sentinel", root, "etc/resolv.conf")
		}},
		{name: "resolv.conf regular kept", setup: func(t *testing.T, root, outside string) {
			writeFile(t, root, "etc/resolv.conf", "nameserver 192.0.2.1\n")
		}, check: func(t *testing.T, root string) {
			wantContent(t, root, "etc/resolv.conf", "nameserver 192.0.2.1\n")
		}},
		{name: "etc/hyphae absolute to outside", setup: func(t *testing.T, root, outside string) {
			mkdirs(t, root, "etc")
			symlink(t, outside, root, "etc/hyphae")
		}},
		{name: "etc/hyphae to another image dir", setup: func(t *testing.T, root, outside string) {
			writeFile(t, root, "usr/bin/entrypoint", "original")
			symlink(t, "../usr/bin", root, "etc/hyphae")
		}, check: func(t *testing.T, root string) {
			wantContent(t, root, "usr/bin/entrypoint", "original")
		}},
		{name: "etc/hyphae is a file", setup: func(t *testing.T, root, outside string) {
			writeFile(t, root, "etc/hyphae", "x")
		}},
		{name: "etc absolute to outside", setup: func(t *testing.T, root, outside string) {
			symlink(t, outside, root, "etc")
		}},
		{name: "etc relative escape", setup: func(t *testing.T, root, outside string) {
			symlink(t, "../../../../../outside", root, "etc")
		}},
		{name: "sbin/init absolute to sentinel", setup: func(t *testing.T, root, outside string) {
			mkdirs(t, root, "sbin")
			symlink(t, filepath.Join(outside, "sentinel"), root, "sbin/init")
		}},
		{name: "sbin/init to busybox inside", setup: func(t *testing.T, root, outside string) {
			writeFile(t, root, "bin/busybox", "busybox")
			mkdirs(t, root, "sbin")
			symlink(t, "/bin/busybox", root, "sbin/init")
		}, check: func(t *testing.T, root string) {
			wantContent(t, root, "bin/busybox", "busybox")
		}},
		{name: "sbin/init hard link shared", setup: func(t *testing.T, root, outside string) {
			writeFile(t, root, "bin/busybox", "busybox")
			mkdirs(t, root, "sbin")
			if err := os.Link(filepath.Join(root, "bin/busybox"), filepath.Join(root, "sbin/init")); err != nil {
				t.Fatal(err)
			}
		}, check: func(t *testing.T, root string) {
			wantContent(t, root, "bin/busybox", "busybox")
		}},
		{name: "sbin/init is a directory", setup: func(t *testing.T, root, outside string) {
			writeFile(t, root, "sbin/init/x", "x")
		}},
		{name: "sbin absolute to outside", setup: func(t *testing.T, root, outside string) {
			symlink(t, outside, root, "sbin")
		}},
		{name: "sbin loop", setup: func(t *testing.T, root, outside string) {
			symlink(t, "sbin2", root, "sbin")
			symlink(t, "sbin", root, "sbin2")
		}},
		{name: "sbin to a file", setup: func(t *testing.T, root, outside string) {
			writeFile(t, root, "bin/sh", "sh")
			symlink(t, "bin/sh", root, "sbin")
		}, check: func(t *testing.T, root string) {
			wantContent(t, root, "bin/sh", "sh")
		}},
		{name: "usr-merged sbin relative", setup: func(t *testing.T, root, outside string) {
			writeFile(t, root, "usr/sbin/ldconfig", "ldconfig")
			symlink(t, "usr/sbin", root, "sbin")
		}, check: func(t *testing.T, root string) {
			wantContent(t, root, "usr/sbin/ldconfig", "ldconfig")
			wantContent(t, root, "usr/sbin/init", "INIT")
			if fi, err := os.Lstat(filepath.Join(root, "sbin")); err != nil || fi.Mode()&fs.ModeSymlink == 0 {
				t.Errorf("the usr-merge symlink /sbin must stay")
			}
		}},
		{name: "usr-merged sbin absolute through a second link", setup: func(t *testing.T, root, outside string) {
			writeFile(t, root, "usr/sbin/ldconfig", "ldconfig")
			symlink(t, "/usr/sbin", root, "sbin")
			symlink(t, "../../../../etc-real", root, "etc") // ".." stops at the root
			mkdirs(t, root, "etc-real")
		}, check: func(t *testing.T, root string) {
			wantContent(t, root, "usr/sbin/init", "INIT")
			wantContent(t, root, "etc-real/hyphae/workdir", "/app\n")
		}},
	}
	f := testFiles(t)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			base := t.TempDir()
			root := filepath.Join(base, "tree", "root")
			outside := filepath.Join(base, "outside")
			mkdirs(t, base, "tree/root", "outside")
			writeFile(t, outside, "sentinel", "SENTINEL")
			if tc.setup != nil {
				tc.setup(t, root, outside)
			}
			if err := WriteHyphaeFiles(root, f); err != nil {
				t.Fatalf("WriteHyphaeFiles: %v", err)
			}
			// Nothing outside the tree changed.
			wantContent(t, outside, "sentinel", "SENTINEL")
			if ents, _ := os.ReadDir(outside); len(ents) != 1 {
				t.Errorf("outside dir holds %d entries, want only the sentinel", len(ents))
			}
			if ents, _ := os.ReadDir(filepath.Join(base, "tree")); len(ents) != 1 {
				t.Errorf("tree's parent holds %d entries, want only the root", len(ents))
			}
			// The guest sees hyphae's files at their paths, as regular files.
			r, err := os.OpenRoot(root)
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			for p, want := range map[string]string{
				"sbin/init":            "INIT",
				"sbin/dimension-agent": "AGENT",
				"etc/hyphae/env":       "A=1\nB=x=y\n",
				"etc/hyphae/workdir":   "/app\n",
			} {
				wantGuestFile(t, root, p, want)
			}
			ep, err := os.ReadFile(guestPath(t, root, "etc/hyphae/entrypoint"))
			if err != nil {
				t.Fatal(err)
			}
			if argv, err := guest.DecodeEntrypoint(ep); err != nil || len(argv) != 3 || argv[2] != "" {
				t.Errorf("entrypoint = %q, %v", argv, err)
			}
			if p := guestPath(t, root, "etc/resolv.conf"); p == "" {
				t.Error("no /etc/resolv.conf")
			} else if fi, err := os.Lstat(p); err != nil || !fi.Mode().IsRegular() {
				t.Errorf("/etc/resolv.conf is not a regular file")
			}
			if fi, err := os.Stat(guestPath(t, root, "sbin/init")); err != nil || fi.Mode().Perm() != 0o755 || !fi.ModTime().Equal(Epoch()) {
				t.Errorf("/sbin/init mode/mtime wrong: %v", fi)
			}
			for _, mnt := range []string{"dev", "proc", "sys", "run", "tmp"} {
				if fi, err := os.Stat(guestPath(t, root, mnt)); err != nil || !fi.IsDir() {
					t.Errorf("mount point /%s missing: %v", mnt, err)
				}
			}
			if tc.check != nil {
				tc.check(t, root)
			}
		})
	}
}

func TestWriteHyphaeFilesRejectsBadInput(t *testing.T) {
	good := testFiles(t)
	tests := []struct {
		name   string
		mutate func(*Files)
	}{
		{"no init", func(f *Files) { f.Init = "" }},
		{"missing init file", func(f *Files) { f.Init = "/nonexistent/hyphae-init" }},
		{"empty entrypoint", func(f *Files) { f.Entrypoint = nil }},
		{"relative workdir", func(f *Files) { f.Workdir = "app" }},
		{"newline in env value", func(f *Files) { f.Env = []guest.EnvVar{{Key: "A", Value: "1\n2"}} }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := good
			tt.mutate(&f)
			err := WriteHyphaeFiles(t.TempDir(), f)
			if err == nil {
				t.Fatal("want an error")
			}
			if errcode.CodeOf(err) == "" {
				t.Errorf("error %v carries no code", err)
			}
		})
	}
}

// guestPath resolves rel as the guest would see it (the tree as "/") and
// returns the host path, or "" when it does not resolve to a directory's
// child.
func guestPath(t *testing.T, root, rel string) string {
	t.Helper()
	r, err := os.OpenRoot(root)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	dir, ok := resolve(r, filepath.Dir(rel))
	if !ok {
		return ""
	}
	return filepath.Join(root, dir, filepath.Base(rel))
}

func wantGuestFile(t *testing.T, root, rel, want string) {
	t.Helper()
	p := guestPath(t, root, rel)
	fi, err := os.Lstat(p)
	if err != nil || !fi.Mode().IsRegular() {
		t.Errorf("/%s is not a regular file (%v)", rel, err)
		return
	}
	if got, _ := os.ReadFile(p); !bytes.Equal(got, []byte(want)) {
		t.Errorf("/%s = %q, want %q", rel, got, want)
	}
}

func testFiles(t testing.TB) Files {
	dir := t.TempDir()
	writeFile(t, dir, "init", "INIT")
	writeFile(t, dir, "agent", "AGENT")
	return Files{
		Init:       filepath.Join(dir, "init"),
		Agent:      filepath.Join(dir, "agent"),
		Entrypoint: []string{"/app/run", "--flag", ""},
		Env:        []guest.EnvVar{{Key: "A", Value: "1"}, {Key: "B", Value: "x=y"}},
		Workdir:    "/app",
	}
}

func mkdirs(t *testing.T, base string, rels ...string) {
	t.Helper()
	for _, r := range rels {
		if err := os.MkdirAll(filepath.Join(base, r), 0o755); err != nil {
			t.Fatal(err)
		}
	}
}

func writeFile(t testing.TB, base, rel, content string) {
	t.Helper()
	p := filepath.Join(base, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func symlink(t *testing.T, target, base, rel string) {
	t.Helper()
	p := filepath.Join(base, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, p); err != nil {
		t.Fatal(err)
	}
}

func wantContent(t *testing.T, base, rel, want string) {
	t.Helper()
	got, err := os.ReadFile(filepath.Join(base, rel))
	if err != nil || string(got) != want {
		t.Errorf("%s = %q (%v), want %q", rel, got, err, want)
	}
}

// FuzzWriteHyphaeFiles gives the image's /sbin, /etc, /etc/hyphae and
// /etc/resolv.conf arbitrary symlink targets: whatever they say, nothing
// outside the tree may change and the guest must find /sbin/init.
func FuzzWriteHyphaeFiles(f *testing.F) {
	f.Add("usr/sbin", "/etc-real", "../../outside", "/outside/sentinel")
	f.Add("/", "..", "hyphae", "resolv.conf")
	f.Add("../../../outside", "/../outside", "/etc/hyphae", "../etc/resolv.conf")
	files := testFiles(f)
	f.Fuzz(func(t *testing.T, sbin, etc, cfg, resolv string) {
		base := t.TempDir()
		root := filepath.Join(base, "root")
		outside := filepath.Join(base, "outside")
		mkdirs(t, base, "root/usr/sbin", "root/etc-real", "outside")
		writeFile(t, outside, "sentinel", "SENTINEL")
		for rel, target := range map[string]string{"sbin": sbin, "etc": etc, "etc-real/hyphae": cfg, "etc-real/resolv.conf": resolv} {
			if target == "" || strings.ContainsRune(target, 0) {
				continue
			}
			os.Symlink(target, filepath.Join(root, rel))
		}
		if err := WriteHyphaeFiles(root, files); err != nil {
			t.Fatalf("WriteHyphaeFiles: %v", err)
		}
		wantContent(t, outside, "sentinel", "SENTINEL")
		if ents, _ := os.ReadDir(outside); len(ents) != 1 {
			t.Errorf("outside holds %d entries", len(ents))
		}
		wantGuestFile(t, root, "sbin/init", "INIT")
		wantGuestFile(t, root, "etc/hyphae/workdir", "/app\n")
	})
}
