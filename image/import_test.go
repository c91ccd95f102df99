package image

import (
	"archive/tar"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/hyphae-run/hyphae/archive/archivetest"
	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
)

// debianLike is a two-layer image laid out like a usr-merged distribution:
// /sbin and /etc/resolv.conf are symlinks, the second layer deletes a file
// of the first.
func debianLike(layout archivetest.Layout, gz bool) archivetest.Spec {
	return archivetest.Spec{
		Layout: layout,
		Gzip:   gz,
		Layers: [][]archivetest.Entry{
			{
				{Name: "usr/", Type: tar.TypeDir},
				{Name: "usr/sbin/", Type: tar.TypeDir},
				{Name: "usr/sbin/ldconfig", Body: "ldconfig", Mode: 0o755},
				{Name: "sbin", Type: tar.TypeSymlink, Linkname: "usr/sbin"},
				{Name: "etc/", Type: tar.TypeDir},
				{Name: "etc/resolv.conf", Type: tar.TypeSymlink, Linkname: "../run/systemd/resolve/stub-resolv.conf"},
				{Name: "etc/old.conf", Body: "old"},
			},
			{
				{Name: "etc/.wh.old.conf"},
				{Name: "app/", Type: tar.TypeDir},
				{Name: "app/server", Body: "#!/bin/sh\necho hi\n", Mode: 0o755},
			},
		},
		Config: v1.Config{
			Entrypoint: []string{"/app/server"},
			Cmd:        []string{"--port", "80"},
			Env:        []string{"PATH=/usr/bin:/bin", "MODE=prod"},
			WorkingDir: "/app",
		},
	}
}

func TestImport(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	tests := []struct {
		name   string
		layout archivetest.Layout
		gz     bool
	}{
		{"classic", archivetest.Classic, false},
		{"oci gzip", archivetest.OCI, true},
	}
	var digest string // every layout of the same content gives the same image
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "web-app.tar")
			if err := archivetest.Write(path, debianLike(tt.layout, tt.gz)); err != nil {
				t.Fatal(err)
			}
			o := ImportOptions{Archive: path, Env: []guest.EnvVar{{Key: "MODE", Value: "test"}}}
			r, err := e.b.Import(ctx, o)
			if err != nil {
				t.Fatal(err)
			}
			if digest == "" {
				if r.Cached {
					t.Error("first import reported cached")
				}
				digest = r.Digest
			} else if !r.Cached || r.Digest != digest {
				t.Errorf("same content in another layout: %+v, want cached %s", r, digest)
			}
			if r.Name != "web-app" || r.Tag != "latest" || strings.Join(r.Entrypoint, " ") != "/app/server --port 80" {
				t.Fatalf("result %+v", r)
			}
			argv, err := guest.DecodeEntrypoint([]byte(debugfs(t, r.Path, "cat /etc/hyphae/entrypoint")))
			if err != nil || strings.Join(argv, " ") != "/app/server --port 80" {
				t.Errorf("entrypoint in image %q, %v", argv, err)
			}
			if env := debugfs(t, r.Path, "cat /etc/hyphae/env"); env != "PATH=/usr/bin:/bin\nMODE=test\n" {
				t.Errorf("env %q", env)
			}
			if wd := debugfs(t, r.Path, "cat /etc/hyphae/workdir"); wd != "/app\n" {
				t.Errorf("workdir %q", wd)
			}
			// /sbin stays the distribution's symlink; init lands behind it.
			if st := debugfs(t, r.Path, "stat /usr/sbin/init"); !strings.Contains(st, "Type: regular") {
				t.Errorf("/usr/sbin/init:\n%s", st)
			}
			if ld := debugfs(t, r.Path, "cat /usr/sbin/ldconfig"); ld != "ldconfig" {
				t.Errorf("ldconfig %q", ld)
			}
			if st := debugfs(t, r.Path, "stat /etc/resolv.conf"); !strings.Contains(st, "Type: regular") {
				t.Errorf("/etc/resolv.conf must be a real file:\n%s", st)
			}
			if ls := debugfs(t, r.Path, "ls /etc"); strings.Contains(ls, "old.conf") {
				t.Errorf("whiteout not applied: %s", ls)
			}

			again, err := e.b.Import(ctx, ImportOptions{Archive: path, Env: o.Env, Tag: "again"})
			if err != nil || !again.Cached || again.Digest != r.Digest {
				t.Errorf("re-import = %+v, %v; want cached %s", again, err, r.Digest)
			}
			f, err := os.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			piped, err := e.b.Import(ctx, ImportOptions{Archive: "-", Stdin: f, Name: "piped", Env: o.Env})
			if err != nil || !piped.Cached || piped.Digest != r.Digest {
				t.Errorf("import from stdin = %+v, %v; want cached %s", piped, err, r.Digest)
			}
			e.assertClean(t)
		})
	}
}

func TestImportFailureLeavesNothing(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	write := func(t *testing.T, spec archivetest.Spec) string {
		p := filepath.Join(t.TempDir(), "x.tar")
		if err := archivetest.Write(p, spec); err != nil {
			t.Fatal(err)
		}
		return p
	}
	escape := debianLike(archivetest.Classic, false)
	escape.Layers = append(escape.Layers, []archivetest.Entry{{Name: "../../escaped", Body: "x"}})
	noEntry := debianLike(archivetest.OCI, false)
	noEntry.Config.Entrypoint, noEntry.Config.Cmd = nil, nil
	badEnv := debianLike(archivetest.OCI, false)
	badEnv.Config.Env = []string{"=nokey"}
	tests := []struct {
		name string
		o    func(t *testing.T) ImportOptions
		code errcode.Code
	}{
		{"path escape", func(t *testing.T) ImportOptions { return ImportOptions{Archive: write(t, escape)} }, errcode.UnsafeArchiveEntry},
		{"no entrypoint", func(t *testing.T) ImportOptions { return ImportOptions{Archive: write(t, noEntry)} }, errcode.NoEntrypoint},
		{"bad config env", func(t *testing.T) ImportOptions { return ImportOptions{Archive: write(t, badEnv)} }, errcode.MalformedArchive},
		{"not an archive", func(t *testing.T) ImportOptions {
			p := filepath.Join(t.TempDir(), "junk.tar")
			os.WriteFile(p, []byte("junk"), 0o644)
			return ImportOptions{Archive: p}
		}, ""},
		{"stdin without name", func(t *testing.T) ImportOptions {
			return ImportOptions{Archive: "-", Stdin: strings.NewReader("")}
		}, errcode.InvalidName},
		{"stdin junk", func(t *testing.T) ImportOptions {
			return ImportOptions{Archive: "-", Name: "x", Stdin: strings.NewReader("junk")}
		}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := tt.o(t)
			_, err := e.b.Import(ctx, o)
			if err == nil {
				t.Fatal("want an error")
			}
			if (tt.code != "" && !errcode.HasCode(err, tt.code)) || errcode.CodeOf(err) == "" {
				t.Errorf("err = %v, want code %q", err, tt.code)
			}
			if imgs, _ := e.reg.ListImages(ctx); len(imgs) != 0 {
				t.Errorf("registered after a failure: %+v", imgs)
			}
			e.assertClean(t)
			if _, err := os.Stat(filepath.Join(filepath.Dir(filepath.Dir(o.Archive)), "escaped")); err == nil {
				t.Error("an entry escaped the staging dir")
			}
		})
	}
}

func TestDefaultName(t *testing.T) {
	tests := []struct{ in, want string }{
		{"examples/hello-go", "hello-go"},
		{"/tmp/x/web-app.tar", "web-app"},
		{"img.tar.gz", "img"},
		{"My App", "my-app"},
		{"./svc/", "svc"},
		{".hidden", "hidden"},
		{"---", ""},
	}
	for _, tt := range tests {
		if got := defaultName(tt.in); got != tt.want {
			t.Errorf("defaultName(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}
