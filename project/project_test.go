package project

import (
	"bytes"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
	"github.com/hyphae-run/hyphae/guestbin"
	"github.com/hyphae-run/hyphae/internal/testenv"
)

// example returns the path of examples/<name> in the checkout.
func example(t *testing.T, name string) string {
	t.Helper()
	return filepath.Join(testenv.ModuleRoot(t), "examples", name)
}

// copyExample copies examples/<name> into a fresh directory, so that
// builds (cargo's target/, Cargo.lock) never write into the checkout, and
// returns the copy.
func copyExample(t *testing.T, name string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), name)
	if err := os.CopyFS(dst, os.DirFS(example(t, name))); err != nil {
		t.Fatal(err)
	}
	return dst
}

// writeTree creates files (path → content; a trailing "/" makes a
// directory) under dir.
func writeTree(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	for name, content := range files {
		p := filepath.Join(dir, name)
		if strings.HasSuffix(name, "/") {
			if err := os.MkdirAll(p, 0o755); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// buildHelloGo builds examples/hello-go statically into dir.
func buildHelloGo(t *testing.T, dir string, env ...string) string {
	t.Helper()
	out := filepath.Join(dir, "hello-go")
	cmd := exec.Command("go", "build", "-trimpath", "-o", out, ".")
	cmd.Dir = example(t, "hello-go")
	cmd.Env = append(append(os.Environ(), "CGO_ENABLED=0"), env...)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, b)
	}
	return out
}

// treeDigest describes every entry of a staged tree by type, mode and
// content hash (or link target), leaving mtimes out.
func treeDigest(t *testing.T, root string) map[string]string {
	t.Helper()
	d := map[string]string{}
	err := filepath.WalkDir(root, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		info, err := e.Info()
		if err != nil {
			return err
		}
		switch {
		case e.Type()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			d[rel] = "link " + target
		case e.Type().IsRegular():
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			sum := sha256.Sum256(b)
			d[rel] = fmt.Sprintf("file %v %s", info.Mode(), hex.EncodeToString(sum[:]))
		default:
			d[rel] = fmt.Sprintf("dir %v", info.Mode())
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// run runs argv with exactly env and returns its combined output and exit
// code.
func run(t *testing.T, env []string, argv ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = env
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return string(out), ee.ExitCode()
	}
	if err != nil {
		t.Fatalf("%v: %v\n%s", argv, err, out)
	}
	return string(out), 0
}

func TestDetect(t *testing.T) {
	tests := []struct {
		name     string
		files    map[string]string
		want     Kind
		wantCode errcode.Code
		wantMsg  string
	}{
		{name: "javascript", files: map[string]string{"package.json": "{}"}, want: KindJavaScript},
		{name: "rust", files: map[string]string{"Cargo.toml": ""}, want: KindRust},
		{name: "go", files: map[string]string{"go.mod": "module x"}, want: KindGo},
		{name: "none", files: map[string]string{"README": ""}, wantCode: errcode.NoProjectMarker,
			wantMsg: "no project marker found in DIR (looked for package.json, Cargo.toml, go.mod)"},
		{name: "marker is a directory", files: map[string]string{"go.mod/": ""}, wantCode: errcode.NoProjectMarker},
		{name: "two", files: map[string]string{"package.json": "{}", "go.mod": "module x"}, wantCode: errcode.AmbiguousProject,
			wantMsg: "ambiguous project in DIR: found package.json and go.mod"},
		{name: "three", files: map[string]string{"package.json": "{}", "Cargo.toml": "", "go.mod": ""}, wantCode: errcode.AmbiguousProject,
			wantMsg: "found package.json and Cargo.toml and go.mod"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			writeTree(t, dir, tt.files)
			got, err := Detect(dir)
			if tt.wantCode != "" {
				if !errcode.HasCode(err, tt.wantCode) {
					t.Fatalf("Detect = %q, %v; want code %s", got, err, tt.wantCode)
				}
				if want := strings.ReplaceAll(tt.wantMsg, "DIR", dir); !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not contain %q", err, want)
				}
				if errcode.HintOf(err) == "" {
					t.Errorf("error %q has no hint", err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("Detect = %q, %v; want %q", got, err, tt.want)
			}
		})
	}
	t.Run("not a directory", func(t *testing.T) {
		f := filepath.Join(t.TempDir(), "file")
		writeTree(t, filepath.Dir(f), map[string]string{"file": "x"})
		for _, dir := range []string{f, filepath.Join(f, "missing")} {
			if _, err := Detect(dir); !errcode.HasCode(err, errcode.InvalidArgument) {
				t.Errorf("Detect(%s) = %v, want %s", dir, err, errcode.InvalidArgument)
			}
		}
	})
}

// TestStageExamples stages every example and checks the tree and the
// Result; the compiled programs must be static and behave as documented
// when run on the host.
func TestStageExamples(t *testing.T) {
	tests := []struct {
		example    string
		kind       Kind
		entrypoint []string
		env        []guest.EnvVar
		files      []string // besides the example's own files for JS
		progress   string
		greeting   string // first output line, for compiled programs
	}{
		{example: "hello-js", kind: KindJavaScript, entrypoint: []string{"/usr/bin/node", "/app/index.js"},
			env:   []guest.EnvVar{{Key: "NODE_ENV", Value: "production"}},
			files: []string{"app/index.js", "app/package.json", "usr/bin/node", "lib64/ld-linux-x86-64.so.2"}, progress: "copying node runtime"},
		{example: "hello-rust", kind: KindRust, entrypoint: []string{"/app/hello-rust"},
			files: []string{"app/hello-rust"}, progress: "cargo build --release", greeting: "hello from rust"},
		{example: "hello-go", kind: KindGo, entrypoint: []string{"/app/hello-go"},
			files: []string{"app/hello-go"}, progress: "go build -trimpath", greeting: "hello from go"},
	}
	for _, tt := range tests {
		t.Run(tt.example, func(t *testing.T) {
			if tt.kind == KindRust {
				testenv.RequiresTool(t, "cargo")
			}
			if tt.kind == KindJavaScript {
				testenv.RequiresTool(t, "node")
			}
			src := copyExample(t, tt.example)
			stage := t.TempDir()
			var progress bytes.Buffer
			res, err := Stage(context.Background(), src, stage, Options{Progress: &progress})
			if err != nil {
				t.Fatal(err)
			}
			if res.Kind != tt.kind || !slices.Equal(res.Entrypoint, tt.entrypoint) || res.Workdir != "/app" || !slices.Equal(res.Env, tt.env) {
				t.Errorf("Result = %+v, want kind %s, entrypoint %q, workdir /app, env %v", res, tt.kind, tt.entrypoint, tt.env)
			}
			if !strings.Contains(progress.String(), tt.progress) {
				t.Errorf("progress output lacks %q:\n%s", tt.progress, progress.String())
			}
			tree := treeDigest(t, stage)
			for _, f := range tt.files {
				if !strings.HasPrefix(tree[f], "file ") {
					t.Errorf("%s missing from the stage (%q)", f, tree[f])
				}
			}
			if tt.kind == KindJavaScript {
				checkJSTree(t, src, stage, tree)
				return
			}
			// A compiled program's image holds it alone.
			if want := map[string]bool{"app": true, tt.files[0]: true, ".": true}; len(tree) != len(want) {
				t.Errorf("stage holds %v, want only %s", tree, tt.files[0])
			}
			prog := filepath.Join(stage, tt.files[0])
			if err := guestbin.CheckStatic(prog); err != nil {
				t.Errorf("%s is not static: %v", prog, err)
			}
			out, code := run(t, []string{"GREETING=from the test", "EXIT_CODE=5"}, prog)
			if want := tt.greeting + "\nGREETING=from the test\n"; out != want || code != 5 {
				t.Errorf("%s printed %q and exited %d, want %q and 5", prog, out, code, want)
			}
		})
	}
}

// checkJSTree checks the runtime part of a staged JavaScript tree and that
// the project's files came over exactly.
func checkJSTree(t *testing.T, src, stage string, tree map[string]string) {
	t.Helper()
	var libc bool
	for p, d := range tree {
		libc = libc || (filepath.Base(p) == "libc.so.6" && strings.HasPrefix(d, "file "))
	}
	if !libc {
		t.Errorf("no libc.so.6 in the stage: %v", tree)
	}
	if st, err := os.Stat(filepath.Join(stage, "usr/bin/node")); err != nil || st.Mode()&0o111 == 0 {
		t.Errorf("usr/bin/node not executable: %v", err)
	}
	for _, name := range []string{"index.js", "package.json"} {
		s, err1 := os.Stat(filepath.Join(src, name))
		d, err2 := os.Stat(filepath.Join(stage, "app", name))
		if err1 != nil || err2 != nil {
			t.Fatal(err1, err2)
		}
		if s.Mode() != d.Mode() || !s.ModTime().Equal(d.ModTime()) {
			t.Errorf("%s: staged mode %v mtime %v, source %v %v", name, d.Mode(), d.ModTime(), s.Mode(), s.ModTime())
		}
		a, _ := os.ReadFile(filepath.Join(src, name))
		b, _ := os.ReadFile(filepath.Join(stage, "app", name))
		if !bytes.Equal(a, b) {
			t.Errorf("%s: staged content differs", name)
		}
	}
}

// TestNodeRunsInChroot proves that the staged node runs with nothing but
// what was staged: no host /lib, no /etc, no shell.
func TestNodeRunsInChroot(t *testing.T) {
	testenv.RequiresTool(t, "node")
	testenv.RequiresRoot(t)
	stage := t.TempDir()
	res, err := Stage(context.Background(), example(t, "hello-js"), stage, Options{})
	if err != nil {
		t.Fatal(err)
	}
	out, code := run(t, []string{"GREETING=inside", "EXIT_CODE=3"}, append([]string{"chroot", stage}, res.Entrypoint...)...)
	if want := "hello from js\nGREETING=inside\n"; out != want || code != 3 {
		t.Fatalf("chroot %s %v printed %q and exited %d, want %q and 3", stage, res.Entrypoint, out, code, want)
	}
}

// TestStageReproducible stages each example from two copies at different
// paths: the trees (contents and modes) must be identical, so building
// twice gives byte-identical programs and the image cache can trust them.
func TestStageReproducible(t *testing.T) {
	for _, name := range []string{"hello-js", "hello-rust", "hello-go"} {
		t.Run(name, func(t *testing.T) {
			tool := map[string]string{"hello-js": "node", "hello-rust": "cargo", "hello-go": "go"}[name]
			testenv.RequiresTool(t, tool)
			var digests []map[string]string
			for range 2 {
				stage := t.TempDir()
				if _, err := Stage(context.Background(), copyExample(t, name), stage, Options{}); err != nil {
					t.Fatal(err)
				}
				digests = append(digests, treeDigest(t, stage))
			}
			for p, d := range digests[0] {
				if digests[1][p] != d {
					t.Errorf("%s: %q then %q", p, d, digests[1][p])
				}
			}
			if len(digests[0]) != len(digests[1]) {
				t.Errorf("trees differ: %d vs %d entries", len(digests[0]), len(digests[1]))
			}
		})
	}
}

// TestJavaScriptCopy checks the exclusion list, that modes survive and
// that symlinks are copied as links — including ones pointing outside the
// project, which must never be followed.
func TestJavaScriptCopy(t *testing.T) {
	testenv.RequiresTool(t, "node")
	outside := t.TempDir()
	writeTree(t, outside, map[string]string{"secret/key.txt": "do not copy"})
	src := t.TempDir()
	writeTree(t, src, map[string]string{
		"package.json":                   `{"scripts":{"start":"node index.js"}}`,
		"index.js":                       "",
		".git/HEAD":                      "ref",
		".npm/_cacache/x":                "",
		".cache/x":                       "",
		".yarn/cache/pkg.zip":            "",
		".yarn/releases/yarn.cjs":        "kept",
		".next/cache/x":                  "",
		".next/server/page.js":           "kept",
		"coverage/lcov.info":             "",
		"node_modules/.cache/babel/x":    "",
		"node_modules/coverage/index.js": "kept: a package called coverage",
		"node_modules/dep/index.js":      "kept",
		"node_modules/dep/.git/HEAD":     "kept: only the root .git is left out",
		"bin/run":                        "#!/usr/bin/env node",
		"empty/":                         "",
	})
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.Chmod(filepath.Join(src, "bin/run"), 0o751))
	must(os.MkdirAll(filepath.Join(src, "node_modules/.bin"), 0o755))
	must(os.Symlink("../dep/index.js", filepath.Join(src, "node_modules/.bin/dep")))
	must(os.Symlink(filepath.Join(outside, "secret"), filepath.Join(src, "outside")))
	must(os.Symlink("../../"+filepath.Base(outside)+"/secret/key.txt", filepath.Join(src, "relative-outside")))
	must(os.Chmod(filepath.Join(src, "empty"), 0o700))

	stage := t.TempDir()
	if _, err := Stage(context.Background(), src, stage, Options{}); err != nil {
		t.Fatal(err)
	}
	tree := treeDigest(t, stage)
	for _, p := range ExcludedPaths() {
		if _, ok := tree[filepath.Join("app", p)]; ok {
			t.Errorf("excluded %s was copied", p)
		}
	}
	for _, p := range []string{".yarn/releases/yarn.cjs", ".next/server/page.js", "node_modules/coverage/index.js", "node_modules/dep/index.js", "node_modules/dep/.git/HEAD", "index.js"} {
		if !strings.HasPrefix(tree[filepath.Join("app", p)], "file ") {
			t.Errorf("%s was not copied", p)
		}
	}
	if d := tree["app/bin/run"]; !strings.HasPrefix(d, "file -rwxr-x--x ") {
		t.Errorf("bin/run staged as %q, want mode -rwxr-x--x", d)
	}
	if d := tree["app/empty"]; d != "dir drwx------" {
		t.Errorf("empty staged as %q, want dir drwx------", d)
	}
	links := map[string]string{
		"app/node_modules/.bin/dep": "../dep/index.js",
		"app/outside":               filepath.Join(outside, "secret"),
		"app/relative-outside":      "../../" + filepath.Base(outside) + "/secret/key.txt",
	}
	for p, target := range links {
		if tree[p] != "link "+target {
			t.Errorf("%s staged as %q, want link %s", p, tree[p], target)
		}
	}
	for p := range tree {
		if strings.Contains(p, "key.txt") || strings.Contains(p, "secret") {
			t.Errorf("followed a symlink out of the project: %s", p)
		}
	}
}

// TestStageInsideProject: a stage inside the project is not copied into
// itself.
func TestStageInsideProject(t *testing.T) {
	testenv.RequiresTool(t, "node")
	src := t.TempDir()
	writeTree(t, src, map[string]string{"package.json": "{}", "index.js": "", "stage/": ""})
	stage := filepath.Join(src, "stage")
	if _, err := Stage(context.Background(), src, stage, Options{}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(filepath.Join(stage, "app", "stage")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the stage was copied into itself: %v", err)
	}
}

// TestJavaScriptEntrypointSymlinkOutside: an entry script that is a
// symlink leaving the project does not count as being in the project.
func TestJavaScriptEntrypointSymlinkOutside(t *testing.T) {
	outside := t.TempDir()
	writeTree(t, outside, map[string]string{"evil.js": "console.log('outside')"})
	src := t.TempDir()
	writeTree(t, src, map[string]string{"package.json": `{"main":"evil.js"}`})
	if err := os.Symlink(filepath.Join(outside, "evil.js"), filepath.Join(src, "evil.js")); err != nil {
		t.Fatal(err)
	}
	stage := t.TempDir()
	if _, err := Stage(context.Background(), src, stage, Options{}); !errcode.HasCode(err, errcode.NoEntrypoint) {
		t.Fatalf("Stage = %v, want %s", err, errcode.NoEntrypoint)
	}
	assertEmpty(t, stage)
}

func assertEmpty(t *testing.T, dir string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil || len(entries) != 0 {
		t.Errorf("stage %s not empty after a failure: %v %v", dir, entries, err)
	}
}

// TestStageFailures covers projects that cannot be staged: the error must
// carry the right code (and for builds the compiler's words), and the
// stage must be left empty.
func TestStageFailures(t *testing.T) {
	cargo := `[package]
name = "NAME"
version = "0.1.0"
edition = "2021"
`
	tests := []struct {
		name     string
		tool     string
		files    map[string]string
		opts     Options
		wantCode errcode.Code
		wantMsg  string
	}{
		{name: "rust two bins without default-run", tool: "cargo", files: map[string]string{
			"Cargo.toml":       strings.Replace(cargo, "NAME", "two", 1),
			"src/bin/alpha.rs": "fn main() {}",
			"src/bin/beta.rs":  "fn main() {}",
		}, wantCode: errcode.AmbiguousProject, wantMsg: "alpha, beta"},
		{name: "rust library only", tool: "cargo", files: map[string]string{
			"Cargo.toml": strings.Replace(cargo, "NAME", "lib", 1), "src/lib.rs": "",
		}, wantCode: errcode.NoEntrypoint},
		{name: "rust compile error", tool: "cargo", files: map[string]string{
			"Cargo.toml": strings.Replace(cargo, "NAME", "broken", 1), "src/main.rs": "fn main() { nope_nothing(); }",
		}, wantCode: errcode.ProjectBuildFailed, wantMsg: "nope_nothing"},
		{name: "rust bad manifest", tool: "cargo", files: map[string]string{"Cargo.toml": "[package"},
			wantCode: errcode.InvalidManifest},
		{name: "go compile error", tool: "go", files: map[string]string{
			"go.mod": "module example.com/broken\n\ngo 1.22\n", "main.go": "package main\n\nfunc main() { nopeNothing() }\n",
		}, wantCode: errcode.ProjectBuildFailed, wantMsg: "undefined: nopeNothing"},
		{name: "go library without cmd", tool: "go", files: map[string]string{
			"go.mod": "module example.com/lib\n\ngo 1.22\n", "lib.go": "package lib\n",
		}, wantCode: errcode.NoEntrypoint},
		{name: "go two commands", tool: "go", files: map[string]string{
			"go.mod": "module example.com/two\n\ngo 1.22\n", "lib.go": "package two\n",
			"cmd/a/main.go": "package main\n\nfunc main() {}\n", "cmd/b/main.go": "package main\n\nfunc main() {}\n",
		}, wantCode: errcode.AmbiguousProject, wantMsg: "a, b"},
		{name: "js node missing", tool: "node", files: map[string]string{"package.json": "{}", "index.js": ""},
			opts: Options{Node: "/nonexistent/node"}, wantCode: errcode.RuntimeNotFound},
		{name: "js node is a script", tool: "node", files: map[string]string{"package.json": "{}", "index.js": "", "fake-node": "#!/bin/sh\n"},
			opts: Options{Node: "fake-node"}, wantCode: errcode.RuntimeNotFound, wantMsg: "not an ELF"},
		{name: "js needs a shell", tool: "node", files: map[string]string{"package.json": `{"scripts":{"start":"tsc && node dist/index.js"}}`},
			wantCode: errcode.NoEntrypoint, wantMsg: "cannot run without a shell"},
		{name: "js bad package.json", tool: "node", files: map[string]string{"package.json": "{"},
			wantCode: errcode.InvalidManifest},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			testenv.RequiresTool(t, tt.tool)
			src := t.TempDir()
			writeTree(t, src, tt.files)
			if tt.opts.Node != "" && !filepath.IsAbs(tt.opts.Node) {
				tt.opts.Node = filepath.Join(src, tt.opts.Node)
			}
			stage := t.TempDir()
			_, err := Stage(context.Background(), src, stage, tt.opts)
			if !errcode.HasCode(err, tt.wantCode) {
				t.Fatalf("Stage = %v, want code %s", err, tt.wantCode)
			}
			if !strings.Contains(err.Error(), tt.wantMsg) {
				t.Errorf("error %q lacks %q", err, tt.wantMsg)
			}
			var ee *exec.ExitError
			if tt.wantCode == errcode.ProjectBuildFailed && !errors.As(err, &ee) {
				t.Errorf("build error %q does not keep the tool's exit status as its cause", err)
			}
			assertEmpty(t, stage)
		})
	}
}

// TestRustDefaultRun: with two binaries, default-run picks one.
func TestRustDefaultRun(t *testing.T) {
	testenv.RequiresTool(t, "cargo")
	src := t.TempDir()
	writeTree(t, src, map[string]string{
		"Cargo.toml":       "[package]\nname = \"two\"\nversion = \"0.1.0\"\nedition = \"2021\"\ndefault-run = \"beta\"\n",
		"src/bin/alpha.rs": "fn main() {}",
		"src/bin/beta.rs":  "fn main() {}",
	})
	_, bin, err := cargoSelect(context.Background(), src)
	if err != nil || bin != (cargoBin{pkg: "two", name: "beta"}) {
		t.Fatalf("cargoSelect = %+v, %v; want beta of two", bin, err)
	}
}

// TestGoCmdLayout: a module whose root is a library and which has one
// command under cmd/ builds that command under its own name.
func TestGoCmdLayout(t *testing.T) {
	src := t.TempDir()
	writeTree(t, src, map[string]string{
		"go.mod":              "module example.com/tool/v2\n\ngo 1.22\n",
		"lib.go":              "package tool\n\nconst Greeting = \"hello from cmd\"\n",
		"cmd/toolctl/main.go": "package main\n\nimport (\n\t\"fmt\"\n\n\ttool \"example.com/tool/v2\"\n)\n\nfunc main() { fmt.Println(tool.Greeting) }\n",
	})
	stage := t.TempDir()
	res, err := Stage(context.Background(), src, stage, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(res.Entrypoint, []string{"/app/toolctl"}) {
		t.Fatalf("entrypoint %q, want [/app/toolctl]", res.Entrypoint)
	}
	if out, code := run(t, nil, filepath.Join(stage, "app/toolctl")); out != "hello from cmd\n" || code != 0 {
		t.Fatalf("toolctl printed %q, exit %d", out, code)
	}
}

func TestProgramName(t *testing.T) {
	for in, want := range map[string]string{
		"example.com/hello-go": "hello-go", "example.com/x/v2": "x", "hello": "hello", "v2": "v2", "example.com/x/v2x": "v2x",
	} {
		if got := programName(in); got != want {
			t.Errorf("programName(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestStageBinary(t *testing.T) {
	dir := t.TempDir()
	static := buildHelloGo(t, dir)
	armDir := filepath.Join(dir, "arm")
	if err := os.Mkdir(armDir, 0o755); err != nil {
		t.Fatal(err)
	}
	foreign := buildHelloGo(t, armDir, "GOARCH=arm64")
	if hostMachine() == elf.EM_AARCH64 {
		foreign = buildHelloGo(t, armDir, "GOARCH=amd64")
	}
	writeTree(t, dir, map[string]string{"script.sh": "#!/bin/sh\necho hi\n", "data.bin": "\x7fELF garbage"})
	for _, f := range []string{"script.sh", "data.bin"} {
		if err := os.Chmod(filepath.Join(dir, f), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	writeTree(t, dir, map[string]string{"notexec": "x"})

	tests := []struct {
		name     string
		file     string
		wantCode errcode.Code
		wantMsg  string
	}{
		{name: "shell script", file: filepath.Join(dir, "script.sh"), wantCode: errcode.InvalidArgument, wantMsg: "not an ELF"},
		{name: "broken ELF", file: filepath.Join(dir, "data.bin"), wantCode: errcode.InvalidArgument, wantMsg: "not an ELF"},
		{name: "not executable", file: filepath.Join(dir, "notexec"), wantCode: errcode.InvalidArgument, wantMsg: "not executable"},
		{name: "directory", file: dir, wantCode: errcode.InvalidArgument},
		{name: "missing", file: filepath.Join(dir, "missing"), wantCode: errcode.InvalidArgument},
		{name: "other architecture", file: foreign, wantCode: errcode.InvalidArgument, wantMsg: "built for"},
		{name: "static go program", file: static},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			stage := t.TempDir()
			res, err := StageBinary(context.Background(), tt.file, stage, Options{})
			if tt.wantCode != "" {
				if !errcode.HasCode(err, tt.wantCode) || !strings.Contains(err.Error(), tt.wantMsg) {
					t.Fatalf("StageBinary = %v, want code %s with %q", err, tt.wantCode, tt.wantMsg)
				}
				assertEmpty(t, stage)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			want := Result{Kind: KindBinary, Entrypoint: []string{"/app/hello-go"}, Workdir: "/app"}
			if res.Kind != want.Kind || !slices.Equal(res.Entrypoint, want.Entrypoint) || res.Workdir != want.Workdir || len(res.Env) != 0 {
				t.Errorf("Result = %+v, want %+v", res, want)
			}
			tree := treeDigest(t, stage)
			if len(tree) != 3 || !strings.HasPrefix(tree["app/hello-go"], "file -rwx") {
				t.Errorf("stage = %v, want only app/hello-go", tree)
			}
			if out, code := run(t, []string{"EXIT_CODE=9"}, filepath.Join(stage, "app/hello-go")); out != "hello from go\n" || code != 9 {
				t.Errorf("staged program printed %q, exit %d", out, code)
			}
		})
	}
}

func TestStageRefusesNonEmptyStage(t *testing.T) {
	stage := t.TempDir()
	writeTree(t, stage, map[string]string{"keep": "mine"})
	_, err := Stage(context.Background(), example(t, "hello-go"), stage, Options{})
	if !errcode.HasCode(err, errcode.StagingFailed) {
		t.Fatalf("Stage into a non-empty dir = %v, want %s", err, errcode.StagingFailed)
	}
	if b, err := os.ReadFile(filepath.Join(stage, "keep")); err != nil || string(b) != "mine" {
		t.Fatalf("stage content touched: %q %v", b, err)
	}
}

func TestStageCanceled(t *testing.T) {
	testenv.RequiresTool(t, "node")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	stage := t.TempDir()
	if _, err := Stage(ctx, example(t, "hello-js"), stage, Options{}); !errors.Is(err, context.Canceled) {
		t.Fatalf("Stage with a canceled context = %v, want context.Canceled", err)
	}
	assertEmpty(t, stage)
}
