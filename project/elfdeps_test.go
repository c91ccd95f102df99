package project

import (
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/hyphae-run/hyphae/internal/testenv"
)

func TestResolveNodeClosure(t *testing.T) {
	node, err := findNode("")
	if err != nil {
		testenv.Unavailable(t, "node: "+err.Error())
	}
	c, err := newLibResolver(slog.New(slog.DiscardHandler)).resolve(node)
	if err != nil {
		t.Fatal(err)
	}
	f, err := elf.Open(node)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if want := programInterp(f); c.interp != want || len(c.files) == 0 || c.files[0].image != want {
		t.Fatalf("interp %q, first file %v; want the loader %q first", c.interp, c.files, want)
	}
	needed, _ := f.DynString(elf.DT_NEEDED)
	seen := map[string]bool{}
	var bases []string
	for _, cf := range c.files {
		if !path.IsAbs(cf.image) || path.Clean(cf.image) != cf.image {
			t.Errorf("image path %q is not clean and absolute", cf.image)
		}
		if seen[cf.image] {
			t.Errorf("%s staged twice", cf.image)
		}
		seen[cf.image] = true
		if st, err := os.Lstat(cf.host); err != nil || !st.Mode().IsRegular() {
			t.Errorf("host file %s of %s is not a regular file (%v)", cf.host, cf.image, err)
		}
		bases = append(bases, path.Base(cf.image))
	}
	for _, n := range needed {
		if !slices.Contains(bases, n) {
			t.Errorf("node needs %s, closure has %v", n, bases)
		}
	}
	if !slices.Contains(bases, "libc.so.6") {
		t.Errorf("closure %v lacks libc.so.6", bases)
	}
	t.Logf("node closure: %v", bases)
}

func TestResolveStaticProgram(t *testing.T) {
	exe := buildHelloGo(t, t.TempDir())
	c, err := newLibResolver(slog.New(slog.DiscardHandler)).resolve(exe)
	if err != nil {
		t.Fatal(err)
	}
	if c.interp != "" || len(c.files) != 0 {
		t.Fatalf("static program has closure %+v, want none", c)
	}
}

// buildOriginProgram compiles, with gcc, a program that finds its
// libraries through $ORIGIN: prog (DT_RUNPATH $ORIGIN/lib) needs libhy.so,
// which needs libdep.so through its own DT_RPATH $ORIGIN. It returns the
// program and its lib directory.
func buildOriginProgram(t *testing.T) (prog, libDir string) {
	t.Helper()
	testenv.RequiresTool(t, "gcc")
	dir := t.TempDir()
	libDir = filepath.Join(dir, "lib")
	if err := os.Mkdir(libDir, 0o755); err != nil {
		t.Fatal(err)
	}
	write := func(name, src string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(src), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	gcc := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("gcc", args...).CombinedOutput(); err != nil {
			t.Fatalf("gcc %v: %v\n%s", args, err, out)
		}
	}
	gcc("-shared", "-fPIC", "-o", filepath.Join(libDir, "libdep.so"),
		write("dep.c", `const char *dep(void) { return "hello from a shared library"; }`))
	gcc("-shared", "-fPIC", "-o", filepath.Join(libDir, "libhy.so"),
		write("hy.c", `const char *dep(void); const char *hy(void) { return dep(); }`),
		"-L"+libDir, "-ldep", "-Wl,--disable-new-dtags,-rpath,$ORIGIN")
	prog = filepath.Join(dir, "prog")
	gcc("-o", prog, write("prog.c", `#include <stdio.h>
const char *hy(void);
int main(void) { puts(hy()); return 7; }`), "-L"+libDir, "-lhy", "-Wl,--enable-new-dtags,-rpath,$ORIGIN/lib")
	return prog, libDir
}

func TestResolveOriginPaths(t *testing.T) {
	prog, libDir := buildOriginProgram(t)
	c, err := newLibResolver(slog.New(slog.DiscardHandler)).resolve(prog)
	if err != nil {
		t.Fatal(err)
	}
	var images []string
	for _, f := range c.files {
		images = append(images, f.image)
	}
	for _, want := range []string{filepath.Join(libDir, "libhy.so"), filepath.Join(libDir, "libdep.so")} {
		if !slices.Contains(images, want) {
			t.Errorf("closure %v lacks %s", images, want)
		}
	}
	if !slices.Equal(c.libDirs, []string{libDir}) {
		t.Errorf("libDirs = %v, want [%s]", c.libDirs, libDir)
	}
}

// TestStageDynamicBinaryRunsInChroot stages a dynamically linked program
// and runs it in a chroot of the stage: its loader, libc and its own
// $ORIGIN libraries must all be there, and LD_LIBRARY_PATH from the Result
// must point the loader at the last.
func TestStageDynamicBinaryRunsInChroot(t *testing.T) {
	prog, _ := buildOriginProgram(t)
	testenv.RequiresRoot(t)
	stage := t.TempDir()
	var logs bytes.Buffer
	res, err := StageBinary(context.Background(), prog, stage, Options{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs.String(), "dynamically linked") {
		t.Errorf("no warning about dynamic linking logged; logs:\n%s", logs.String())
	}
	cmd := exec.Command("chroot", append([]string{stage}, res.Entrypoint...)...)
	for _, v := range res.Env {
		cmd.Env = append(cmd.Env, v.String())
	}
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if err != nil && !(errors.As(err, &ee) && ee.ExitCode() == 7) {
		t.Fatalf("chroot %v (env %v): %v\n%s", res.Entrypoint, cmd.Env, err, out)
	}
	if err == nil {
		t.Fatalf("exit code 0, want 7")
	}
	if got := string(out); got != "hello from a shared library\n" {
		t.Fatalf("output %q", got)
	}
}
