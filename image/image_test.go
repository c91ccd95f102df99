package image

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/hyphae-run/hyphae/archive/archivetest"
	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
	"github.com/hyphae-run/hyphae/internal/testenv"
	"github.com/hyphae-run/hyphae/project"
	"github.com/hyphae-run/hyphae/registry"
)

// env is one test's hyphae home, guest binaries and builder.
type env struct {
	reg     *registry.Registry
	b       *Builder
	libexec string
	tmp     string // TMPDIR, to prove staging dirs are removed
}

func newEnv(t *testing.T) *env {
	t.Helper()
	testenv.RequiresTool(t, "debugfs")
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		if _, err := os.Stat("/usr/sbin/mkfs.ext4"); err != nil {
			testenv.Unavailable(t, "mkfs.ext4 not installed")
		}
	}
	libexec := testenv.GuestBinaries(t, "hyphae-init", "dimension-agent")
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp)
	reg, err := registry.Open(context.Background(), t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	return &env{reg: reg, b: &Builder{Store: reg}, libexec: libexec, tmp: tmp}
}

// program writes a static ELF program (a copy of hyphae-init, which is one)
// with extra bytes appended, so that tests can change a shipped file.
func (e *env) program(t *testing.T, name, extra string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	copyFile(t, filepath.Join(e.libexec, "hyphae-init"), p, 0o755)
	appendTo(t, p, extra)
	return p
}

func copyFile(t *testing.T, src, dst string, mode os.FileMode) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, mode); err != nil {
		t.Fatal(err)
	}
}

func appendTo(t *testing.T, p, extra string) {
	t.Helper()
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString(extra); err != nil {
		t.Fatal(err)
	}
}

func inode(t *testing.T, p string) uint64 {
	t.Helper()
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return st.Sys().(*syscall.Stat_t).Ino
}

// assertClean checks that no staging dir, spool file or temp image is left
// and that images/ holds exactly the registered files.
func (e *env) assertClean(t *testing.T) {
	t.Helper()
	ents, _ := os.ReadDir(e.tmp)
	for _, d := range ents {
		// Subtests' t.TempDir directories land in TMPDIR too.
		if !strings.HasPrefix(d.Name(), "Test") {
			t.Errorf("left in TMPDIR: %s", d.Name())
		}
	}
	imgs, err := e.reg.ListImages(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]bool{}
	for _, im := range imgs {
		want[filepath.Base(e.reg.ImagePath(im.Digest))] = true
	}
	ents, _ = os.ReadDir(e.reg.ImagesDir())
	for _, d := range ents {
		if !want[d.Name()] {
			t.Errorf("unregistered file in images/: %s", d.Name())
		}
	}
	if len(ents) != len(want) {
		t.Errorf("images/ holds %d files for %d registered digests", len(ents), len(want))
	}
}

func debugfs(t *testing.T, img, req string) string {
	t.Helper()
	var out, errb bytes.Buffer
	cmd := exec.Command("debugfs", "-R", req, img)
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("debugfs -R %q: %v: %s", req, err, errb.String())
	}
	return out.String()
}

func TestBuildCacheAndInvalidation(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	prog := e.program(t, "svc", "v1")
	base := BuildOptions{Binary: prog, Name: "svc"}
	first, err := e.b.Build(ctx, base)
	if err != nil {
		t.Fatal(err)
	}
	if first.Cached || first.Name != "svc" || first.Tag != "latest" || first.Path != e.reg.ImagePath(first.Digest) {
		t.Fatalf("first build = %+v", first)
	}
	ino := inode(t, first.Path)

	changedInit := t.TempDir()
	copyFile(t, filepath.Join(e.libexec, "hyphae-init"), filepath.Join(changedInit, "hyphae-init"), 0o755)
	appendTo(t, filepath.Join(changedInit, "hyphae-init"), "changed")
	copyFile(t, filepath.Join(e.libexec, "dimension-agent"), filepath.Join(changedInit, "dimension-agent"), 0o755)

	tests := []struct {
		name    string
		mutate  func(o *BuildOptions)
		setup   func(t *testing.T)
		cached  bool // same digest, served from the cache
		rebuilt bool // same digest, but mkfs ran again
	}{
		{name: "unchanged", cached: true},
		{name: "another tag", mutate: func(o *BuildOptions) { o.Tag = "v2" }, cached: true},
		{name: "shipped file", mutate: func(o *BuildOptions) { o.Binary = e.program(t, "svc", "v2") }},
		{name: "entrypoint", mutate: func(o *BuildOptions) { o.Entrypoint = []string{"/app/svc", "--verbose"} }},
		{name: "env", mutate: func(o *BuildOptions) { o.Env = []guest.EnvVar{{Key: "GREETING", Value: "hi"}} }},
		{name: "size", mutate: func(o *BuildOptions) { o.SizeMiB = 40 }},
		{name: "agent", mutate: func(o *BuildOptions) { o.WithAgent = true }},
		{name: "init binary", setup: func(t *testing.T) { t.Setenv("HYPHAE_LIBEXEC", changedInit) }},
		{name: "force", mutate: func(o *BuildOptions) { o.Force = true }, rebuilt: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := base
			if tt.mutate != nil {
				tt.mutate(&o)
			}
			if tt.setup != nil {
				tt.setup(t)
			}
			before := inode(t, first.Path)
			r, err := e.b.Build(ctx, o)
			if err != nil {
				t.Fatal(err)
			}
			switch {
			case tt.cached:
				if !r.Cached || r.Digest != first.Digest || inode(t, first.Path) != before {
					t.Errorf("want a cache hit on %s without mkfs, got %+v", first.Digest, r)
				}
			case tt.rebuilt:
				if r.Cached || r.Digest != first.Digest || inode(t, first.Path) == ino {
					t.Errorf("want a rebuild of %s into a new file, got %+v", first.Digest, r)
				}
			default:
				if r.Cached || r.Digest == first.Digest {
					t.Errorf("want a new image, got %+v", r)
				}
				if _, err := os.Stat(r.Path); err != nil {
					t.Error(err)
				}
			}
			got, err := e.reg.LookupImage(ctx, r.Name+":"+r.Tag)
			if err != nil || got.Digest != r.Digest {
				t.Errorf("%s:%s → %v (%v), want %s", r.Name, r.Tag, got.Digest, err, r.Digest)
			}
		})
	}
	e.assertClean(t)
}

// TestBuildRuntimeInvalidation is the runtime row of the invalidation table
// above, on a JavaScript project (the table's base is a prebuilt binary,
// which ships no runtime): only the bytes of the Node.js runtime count, not
// the path it was found at.
func TestBuildRuntimeInvalidation(t *testing.T) {
	host := testenv.RequiresTool(t, "node")
	e := newEnv(t)
	ctx := context.Background()
	host, err := filepath.EvalSymlinks(host)
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "rt-js")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, body := range map[string]string{
		"package.json": `{"name":"rt-js","main":"index.js"}`,
		"index.js":     "console.log('hi')\n",
	} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	first, err := e.b.Build(ctx, BuildOptions{Dir: dir, Node: host})
	if err != nil {
		t.Fatal(err)
	}
	hostInfo, err := os.Stat(host)
	if err != nil {
		t.Fatal(err)
	}
	// An ELF with bytes after its last section still runs: a different,
	// working runtime.
	longer := filepath.Join(t.TempDir(), "node")
	copyFile(t, host, longer, 0o755)
	appendTo(t, longer, "\x00")
	if out, err := exec.Command(longer, "-e", "process.stdout.write('ok')").Output(); err != nil || string(out) != "ok" {
		t.Fatalf("the changed node does not run: %q, %v", out, err)
	}
	same := filepath.Join(t.TempDir(), "node")
	copyFile(t, host, same, 0o755)

	tests := []struct {
		name   string
		node   string
		size   int64 // of /usr/bin/node in the image
		cached bool
	}{
		{name: "same runtime", node: host, size: hostInfo.Size(), cached: true},
		{name: "identical copy elsewhere", node: same, size: hostInfo.Size(), cached: true},
		{name: "runtime one byte longer", node: longer, size: hostInfo.Size() + 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := e.b.Build(ctx, BuildOptions{Dir: dir, Node: tt.node})
			if err != nil {
				t.Fatal(err)
			}
			if tt.cached != r.Cached || tt.cached != (r.Digest == first.Digest) {
				t.Errorf("build with node %s = %+v; first digest %s, want cached %v", tt.node, r, first.Digest, tt.cached)
			}
			if st := debugfs(t, r.Path, "stat "+project.NodePath); !strings.Contains(st, "Size: "+strconv.FormatInt(tt.size, 10)+"\n") {
				t.Errorf("%s in %s, want %d bytes:\n%s", project.NodePath, r.Path, tt.size, st)
			}
			if got, err := e.reg.LookupImage(ctx, "rt-js:latest"); err != nil || got.Digest != r.Digest {
				t.Errorf("rt-js:latest → %v (%v), want %s", got.Digest, err, r.Digest)
			}
		})
	}
	e.assertClean(t)
}

func TestBuildExampleReadBack(t *testing.T) {
	testenv.RequiresTool(t, "go")
	e := newEnv(t)
	ctx := context.Background()
	dir := filepath.Join(testenv.ModuleRoot(t), "examples", "hello-go")
	r, err := e.b.Build(ctx, BuildOptions{Dir: dir, Env: []guest.EnvVar{{Key: "GREETING", Value: "hello"}}})
	if err != nil {
		t.Fatal(err)
	}
	if r.Name != "hello-go" || len(r.Entrypoint) == 0 {
		t.Fatalf("result %+v", r)
	}
	argv, err := guest.DecodeEntrypoint([]byte(debugfs(t, r.Path, "cat /etc/hyphae/entrypoint")))
	if err != nil || strings.Join(argv, " ") != strings.Join(r.Entrypoint, " ") {
		t.Errorf("entrypoint in image %q (%v), result says %q", argv, err, r.Entrypoint)
	}
	if env := debugfs(t, r.Path, "cat /etc/hyphae/env"); !strings.Contains(env, "GREETING=hello\n") {
		t.Errorf("env file %q", env)
	}
	if ls := debugfs(t, r.Path, "ls -l "+filepath.Dir(r.Entrypoint[0])); !strings.Contains(ls, filepath.Base(r.Entrypoint[0])) {
		t.Errorf("program missing from image:\n%s", ls)
	}
	initInfo, err := os.Stat(filepath.Join(e.libexec, "hyphae-init"))
	if err != nil {
		t.Fatal(err)
	}
	st := debugfs(t, r.Path, "stat /sbin/init")
	if !strings.Contains(st, "Type: regular") || !strings.Contains(st, "Mode:  0755") || !strings.Contains(st, "Size: "+strconv.FormatInt(initInfo.Size(), 10)) {
		t.Errorf("/sbin/init in image:\n%s", st)
	}
	if root := debugfs(t, r.Path, "stat /"); !strings.Contains(root, "Mode:  0755") || !strings.Contains(root, "User:     0   Group:     0") {
		t.Errorf("root directory in image:\n%s", root)
	}
	e.assertClean(t)
}

// failingStore is the real registry with PutImage failing, as when the disk
// fills up or another process holds the lock too long.
type failingStore struct{ *registry.Registry }

func (failingStore) PutImage(context.Context, registry.Image) error {
	return errcode.New(errcode.RegistryError, "injected failure")
}

func TestBuildFailureLeavesNothing(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	prog := e.program(t, "svc", "x")
	noMarker := t.TempDir()
	if err := os.WriteFile(filepath.Join(noMarker, "README"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	fakeMkfs := t.TempDir()
	if err := os.WriteFile(filepath.Join(fakeMkfs, "mkfs.ext4"), []byte("#!/bin/sh\necho 'mkfs.ext4: No space left on device' >&2\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	noLibexec := t.TempDir()
	tests := []struct {
		name  string
		o     BuildOptions
		setup func(t *testing.T, b *Builder)
		code  errcode.Code
	}{
		{name: "no project marker", o: BuildOptions{Dir: noMarker}, code: errcode.NoProjectMarker},
		{name: "missing binary", o: BuildOptions{Binary: filepath.Join(noMarker, "nope")}},
		{name: "invalid name", o: BuildOptions{Binary: prog, Name: "Bad Name"}, code: errcode.InvalidName},
		{name: "invalid tag", o: BuildOptions{Binary: prog, Tag: "-x"}, code: errcode.InvalidName},
		{name: "size too small", o: BuildOptions{Binary: prog, SizeMiB: 1}, code: errcode.SizeLimit},
		{name: "dir and binary", o: BuildOptions{Binary: prog, Dir: noMarker}, code: errcode.InvalidArgument},
		{name: "no init", o: BuildOptions{Binary: prog}, code: errcode.GuestBinaryMissing, setup: func(t *testing.T, _ *Builder) {
			t.Setenv("HYPHAE_LIBEXEC", noLibexec)
		}},
		{name: "mkfs fails", o: BuildOptions{Binary: prog}, code: errcode.MkfsFailed, setup: func(t *testing.T, _ *Builder) {
			t.Setenv("PATH", fakeMkfs+string(os.PathListSeparator)+os.Getenv("PATH"))
		}},
		{name: "registration fails", o: BuildOptions{Binary: prog}, code: errcode.RegistryError, setup: func(t *testing.T, b *Builder) {
			b.Store = failingStore{e.reg}
		}},
		{name: "cancelled", o: BuildOptions{Binary: prog}, setup: func(t *testing.T, b *Builder) {}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := *e.b
			if tt.setup != nil {
				tt.setup(t, &b)
			}
			c := ctx
			if tt.name == "cancelled" {
				cc, cancel := context.WithCancel(ctx)
				cancel()
				c = cc
			}
			_, err := b.Build(c, tt.o)
			if err == nil {
				t.Fatal("want an error")
			}
			if tt.code != "" && !errcode.HasCode(err, tt.code) {
				t.Errorf("err = %v, want %s", err, tt.code)
			}
			if errcode.CodeOf(err) == "" && !errors.Is(err, context.Canceled) {
				t.Errorf("error without a code: %v", err)
			}
			if imgs, _ := e.reg.ListImages(ctx); len(imgs) != 0 {
				t.Errorf("registered after a failure: %+v", imgs)
			}
			e.assertClean(t)
		})
	}
}

// TestFailedRebuildKeepsTag rebuilds an existing name:tag in every way that
// can fail late (the project's own build, mkfs, registration, a hostile
// archive imported under the same name, cancellation): the tag stays on its
// old digest, the old image file is untouched and no file is added.
func TestFailedRebuildKeepsTag(t *testing.T) {
	testenv.RequiresTool(t, "go")
	e := newEnv(t)
	ctx := context.Background()
	old, err := e.b.Build(ctx, BuildOptions{Binary: e.program(t, "svc", "v1"), Name: "svc"})
	if err != nil {
		t.Fatal(err)
	}
	oldIno := inode(t, old.Path)
	changed := e.program(t, "svc", "v2")

	broken := t.TempDir()
	for name, body := range map[string]string{
		"go.mod":  "module example.com/svc\n\ngo 1.22\n",
		"main.go": "package main\n\nfunc main() { undefined() }\n",
	} {
		if err := os.WriteFile(filepath.Join(broken, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	fakeMkfs := t.TempDir()
	if err := os.WriteFile(filepath.Join(fakeMkfs, "mkfs.ext4"), []byte("#!/bin/sh\necho 'mkfs.ext4: No space left on device' >&2\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	failMkfs := func(t *testing.T) { t.Setenv("PATH", fakeMkfs+string(os.PathListSeparator)+os.Getenv("PATH")) }
	hostile := filepath.Join(t.TempDir(), "svc.tar")
	spec := debianLike(archivetest.OCI, false)
	spec.Layers = append(spec.Layers, []archivetest.Entry{{Name: "../../escaped", Body: "x"}})
	if err := archivetest.Write(hostile, spec); err != nil {
		t.Fatal(err)
	}
	build := func(o BuildOptions) func(context.Context, *Builder) error {
		return func(ctx context.Context, b *Builder) error { _, err := b.Build(ctx, o); return err }
	}

	tests := []struct {
		name   string
		run    func(context.Context, *Builder) error
		setup  func(t *testing.T, b *Builder)
		cancel bool
		code   errcode.Code
	}{
		{name: "project build fails", run: build(BuildOptions{Dir: broken, Name: "svc"}), code: errcode.ProjectBuildFailed},
		{name: "mkfs fails", run: build(BuildOptions{Binary: changed, Name: "svc"}), setup: func(t *testing.T, _ *Builder) { failMkfs(t) }, code: errcode.MkfsFailed},
		{name: "forced rebuild, mkfs fails", run: build(BuildOptions{Binary: e.program(t, "svc", "v1"), Name: "svc", Force: true}),
			setup: func(t *testing.T, _ *Builder) { failMkfs(t) }, code: errcode.MkfsFailed},
		{name: "registration fails", run: build(BuildOptions{Binary: changed, Name: "svc"}),
			setup: func(t *testing.T, b *Builder) { b.Store = failingStore{e.reg} }, code: errcode.RegistryError},
		{name: "size too small", run: build(BuildOptions{Binary: changed, Name: "svc", SizeMiB: 1}), code: errcode.SizeLimit},
		{name: "cancelled", run: build(BuildOptions{Binary: changed, Name: "svc"}), cancel: true},
		{name: "hostile import", run: func(ctx context.Context, b *Builder) error {
			_, err := b.Import(ctx, ImportOptions{Archive: hostile})
			return err
		}, code: errcode.UnsafeArchiveEntry},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := *e.b
			if tt.setup != nil {
				tt.setup(t, &b)
			}
			c := ctx
			if tt.cancel {
				cc, cancel := context.WithCancel(ctx)
				cancel()
				c = cc
			}
			err := tt.run(c, &b)
			if err == nil {
				t.Fatal("want an error")
			}
			if tt.code != "" && !errcode.HasCode(err, tt.code) {
				t.Errorf("err = %v, want %s", err, tt.code)
			}
			if got, err := e.reg.LookupImage(ctx, "svc:latest"); err != nil || got.Digest != old.Digest {
				t.Errorf("svc:latest → %v (%v) after a failed rebuild, want %s", got.Digest, err, old.Digest)
			}
			if imgs, _ := e.reg.ListImages(ctx); len(imgs) != 1 {
				t.Errorf("registry holds %d images, want only the old one: %+v", len(imgs), imgs)
			}
			if ino := inode(t, old.Path); ino != oldIno {
				t.Errorf("the old image file was replaced (inode %d → %d)", oldIno, ino)
			}
			e.assertClean(t)
		})
	}
}

func TestDryRun(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	o := BuildOptions{Binary: e.program(t, "svc", "x"), DryRun: true}
	dry, err := e.b.Build(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	if !dry.DryRun || dry.Cached || dry.SizeBytes <= 0 {
		t.Errorf("dry run = %+v", dry)
	}
	if _, err := os.Stat(dry.Path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("dry run made %s", dry.Path)
	}
	e.assertClean(t)
	o.DryRun = false
	real, err := e.b.Build(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	if real.Digest != dry.Digest {
		t.Errorf("dry run predicted %s, build made %s", dry.Digest, real.Digest)
	}
	o.DryRun = true
	if again, err := e.b.Build(ctx, o); err != nil || !again.Cached {
		t.Errorf("dry run after the build = %+v, %v; want cached", again, err)
	}
}

// TestBuildReproducible rebuilds one input with Force and compares the two
// image files byte by byte.
func TestBuildReproducible(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	o := BuildOptions{Binary: e.program(t, "svc", "x")}
	r1, err := e.b.Build(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	b1, err := os.ReadFile(r1.Path)
	if err != nil {
		t.Fatal(err)
	}
	o.Force = true
	r2, err := e.b.Build(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	b2, err := os.ReadFile(r2.Path)
	if err != nil {
		t.Fatal(err)
	}
	if r1.Digest != r2.Digest || len(b1) != len(b2) {
		t.Fatalf("digests %s / %s, sizes %d / %d", r1.Digest, r2.Digest, len(b1), len(b2))
	}
	diff := 0
	for i := range b1 {
		if b1[i] != b2[i] {
			diff++
		}
	}
	t.Logf("two builds of %s: %d of %d bytes differ (inode change times)", r1.Digest, diff, len(b1))
}

// TestConcurrentBuildsOfOneInput runs two builders (as two hyphae
// processes would) on the same input at once: both succeed with the same
// digest, one file stays, and both tags point at it.
func TestConcurrentBuildsOfOneInput(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	prog := e.program(t, "svc", "x")
	reg2, err := registry.Open(ctx, e.reg.Home(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer reg2.Close()
	builders := []*Builder{e.b, {Store: reg2}}
	results := make([]Result, len(builders))
	errs := make([]error, len(builders))
	done := make(chan int)
	for i, b := range builders {
		go func() {
			results[i], errs[i] = b.Build(ctx, BuildOptions{Binary: prog, Tag: "t" + strconv.Itoa(i)})
			done <- i
		}()
	}
	for range builders {
		<-done
	}
	for i := range builders {
		if errs[i] != nil {
			t.Fatalf("builder %d: %v", i, errs[i])
		}
	}
	if results[0].Digest != results[1].Digest {
		t.Fatalf("digests differ: %s, %s", results[0].Digest, results[1].Digest)
	}
	for i := range builders {
		if got, err := e.reg.LookupImage(ctx, "svc:t"+strconv.Itoa(i)); err != nil || got.Digest != results[0].Digest {
			t.Errorf("svc:t%d → %v, %v", i, got.Digest, err)
		}
	}
	e.assertClean(t)
}
