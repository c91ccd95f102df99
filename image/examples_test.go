package image

import (
	"context"
	"debug/elf"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/hyphae-run/hyphae/guest"
	"github.com/hyphae-run/hyphae/guestbin"
	"github.com/hyphae-run/hyphae/internal/testenv"
	"github.com/hyphae-run/hyphae/internal/testenv/pid1"
	"github.com/hyphae-run/hyphae/project"
)

// TestExamplesBootFromImage is issue 2's acceptance for every example:
// `hyphae build` makes an image, debugfs reads the whole filesystem back
// into a directory (nothing is mounted, so this is what the ext4 holds),
// the tree has /sbin/init, the entrypoint file and the program (for
// JavaScript: node, its loader and libraries), and hyphae-init booted as
// PID 1 of a fresh namespace in that tree runs the program, which prints
// its greeting and the GREETING from the image's env file and exits with
// the image's EXIT_CODE, as init's status line reports.
func TestExamplesBootFromImage(t *testing.T) {
	testenv.RequiresTool(t, "go")
	pid1.Requires(t)
	e := newEnv(t)
	modRoot := testenv.ModuleRoot(t)
	examples := filepath.Join(modRoot, "examples")
	initSum := testenv.FileSHA256(t, filepath.Join(e.libexec, guestbin.Init))

	tests := []struct {
		name string
		tool string // needed besides go
		// opts returns the build's Dir or Binary.
		opts       func(t *testing.T) BuildOptions
		entrypoint []string
		greeting   string
		exit       int
	}{
		{
			name:       "hello-go",
			opts:       func(*testing.T) BuildOptions { return BuildOptions{Dir: filepath.Join(examples, "hello-go")} },
			entrypoint: []string{"/app/hello-go"}, greeting: "hello from go", exit: 5,
		},
		{
			name: "hello-rust", tool: "cargo",
			// A copy, so that cargo's target/ is neither read from nor
			// written to the checkout.
			opts: func(t *testing.T) BuildOptions {
				return BuildOptions{Dir: copyExampleSources(t, filepath.Join(examples, "hello-rust"))}
			},
			entrypoint: []string{"/app/hello-rust"}, greeting: "hello from rust", exit: 6,
		},
		{
			name: "hello-js", tool: "node",
			opts:       func(*testing.T) BuildOptions { return BuildOptions{Dir: filepath.Join(examples, "hello-js")} },
			entrypoint: []string{project.NodePath, project.AppDir + "/index.js"}, greeting: "hello from js", exit: 7,
		},
		{
			name: "prebuilt binary",
			opts: func(t *testing.T) BuildOptions {
				bin := filepath.Join(t.TempDir(), "hello-go")
				cmd := exec.Command("go", "build", "-trimpath", "-o", bin, ".")
				cmd.Dir = filepath.Join(examples, "hello-go")
				cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
				if out, err := cmd.CombinedOutput(); err != nil {
					t.Fatalf("building hello-go: %v\n%s", err, out)
				}
				return BuildOptions{Binary: bin, Name: "hello-bin"}
			},
			entrypoint: []string{"/app/hello-go"}, greeting: "hello from go", exit: 8,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.tool != "" {
				testenv.RequiresTool(t, tt.tool)
			}
			o := tt.opts(t)
			o.Env = []guest.EnvVar{{Key: "GREETING", Value: "from the image"}, {Key: "EXIT_CODE", Value: strconv.Itoa(tt.exit)}}
			r, err := e.b.Build(context.Background(), o)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(r.Entrypoint, tt.entrypoint) {
				t.Errorf("entrypoint %q, want %q", r.Entrypoint, tt.entrypoint)
			}
			root := t.TempDir()
			debugfs(t, r.Path, "rdump / "+root)

			if fi := regular(t, root, guest.InitPath); fi != nil && fi.Mode().Perm() != 0o755 {
				t.Errorf("%s has mode %v, want 0755", guest.InitPath, fi.Mode())
			}
			if sum := testenv.FileSHA256(t, filepath.Join(root, guest.InitPath)); sum != initSum {
				t.Errorf("%s is not the hyphae-init that was built (sha256 %s, want %s)", guest.InitPath, sum, initSum)
			}
			b, err := os.ReadFile(filepath.Join(root, guest.EntrypointPath))
			if err != nil {
				t.Fatal(err)
			}
			if argv, err := guest.DecodeEntrypoint(b); err != nil || !slices.Equal(argv, tt.entrypoint) {
				t.Errorf("%s holds %q (%v), want %q", guest.EntrypointPath, argv, err, tt.entrypoint)
			}
			if fi := regular(t, root, tt.entrypoint[0]); fi != nil && fi.Mode().Perm()&0o111 == 0 {
				t.Errorf("%s is not executable: %v", tt.entrypoint[0], fi.Mode())
			}
			if tt.tool == "node" {
				checkNodeRuntime(t, root, o.Dir)
			} else if err := guestbin.CheckStatic(filepath.Join(root, tt.entrypoint[0])); err != nil {
				t.Errorf("compiled program in the image: %v", err)
			}
			if t.Failed() {
				return
			}

			res := pid1.Boot(t, root, pid1.Options{})
			for _, want := range []string{tt.greeting, "GREETING=from the image"} {
				if !res.Has(want) {
					t.Errorf("console lacks %q", want)
				}
			}
			if st := res.Status(t); st != (guest.Status{ExitCode: tt.exit}) {
				t.Errorf("status %+v, want exit code %d", st, tt.exit)
			}
			if !res.EndedByReboot() {
				t.Errorf("namespace ended with %v, want init killed by reboot(2) (SIGHUP)", res.State)
			}
			if t.Failed() {
				t.Logf("console:\n%s\nstderr:\n%s", strings.Join(res.Lines, "\n"), res.Stderr)
			}
		})
	}
}

// regular fails t unless rel (an image path) is a regular file in root,
// not a symlink that would resolve on the host; it returns its info.
func regular(t *testing.T, root, rel string) fs.FileInfo {
	t.Helper()
	fi, err := os.Lstat(filepath.Join(root, rel))
	if err != nil {
		t.Errorf("%s missing from the image: %v", rel, err)
		return nil
	}
	if !fi.Mode().IsRegular() {
		t.Errorf("%s in the image is %v, want a regular file", rel, fi.Mode())
		return nil
	}
	return fi
}

// checkNodeRuntime checks that root holds the project at src under
// project.AppDir, the host's node, the ELF interpreter it names and a file
// for each library it needs (that the image's loader finds them is proved
// by the boot).
func checkNodeRuntime(t *testing.T, root, src string) {
	t.Helper()
	host, err := exec.LookPath("node")
	if err == nil {
		host, err = filepath.EvalSymlinks(host)
	}
	if err != nil {
		t.Fatal(err)
	}
	regular(t, root, project.NodePath)
	if a, b := testenv.FileSHA256(t, host), testenv.FileSHA256(t, filepath.Join(root, project.NodePath)); a != b {
		t.Errorf("%s in the image differs from the host's %s", project.NodePath, host)
	}
	f, err := elf.Open(host)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	needed, err := f.ImportedLibraries()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range f.Progs {
		if p.Type != elf.PT_INTERP {
			continue
		}
		b := make([]byte, p.Filesz)
		if _, err := p.ReadAt(b, 0); err != nil {
			t.Fatal(err)
		}
		regular(t, root, string(b[:len(b)-1])) // NUL-terminated
	}
	have := map[string]bool{}
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			have[d.Name()] = true
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, lib := range needed {
		if !have[lib] {
			t.Errorf("node needs %s; the image has no such file", lib)
		}
	}
	for _, name := range []string{"index.js", "package.json"} {
		img := project.AppDir + "/" + name
		regular(t, root, img)
		if a, b := testenv.FileSHA256(t, filepath.Join(src, name)), testenv.FileSHA256(t, filepath.Join(root, img)); a != b {
			t.Errorf("%s in the image differs from the project's", img)
		}
	}
}

// copyExampleSources copies the project at dir, without its target/ (a
// build output), into a fresh directory and returns the copy.
func copyExampleSources(t *testing.T, dir string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), filepath.Base(dir))
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		if d.IsDir() {
			if rel == "target" {
				return filepath.SkipDir
			}
			return os.MkdirAll(filepath.Join(dst, rel), 0o755)
		}
		copyFile(t, p, filepath.Join(dst, rel), 0o644)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return dst
}
