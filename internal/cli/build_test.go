package cli

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/hyphae-run/hyphae/archive/archivetest"
	"github.com/hyphae-run/hyphae/image"
	"github.com/hyphae-run/hyphae/internal/testenv"
	"github.com/hyphae-run/hyphae/registry"
)

// buildResult decodes a build or import's JSON, which must be exactly
// image.Result's fields.
func buildResult(t *testing.T, r result) image.Result {
	t.Helper()
	if r.code != 0 {
		t.Fatalf("exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
	var keys map[string]json.RawMessage
	if err := json.Unmarshal([]byte(r.stdout), &keys); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, r.stdout)
	}
	for _, k := range []string{"name", "tag", "digest", "path", "size_bytes", "cached", "entrypoint"} {
		if _, ok := keys[k]; !ok {
			t.Fatalf("JSON lacks %q: %s", k, r.stdout)
		}
	}
	var res image.Result
	r.decode(t, &res)
	return res
}

func TestBuildBinary(t *testing.T) {
	testenv.RequiresTool(t, "mkfs.ext4")
	lib := testenv.GuestBinaries(t, "hyphae-init")
	home := t.TempDir()
	// Any static program will do as the prebuilt binary: use hyphae-init.
	prog := filepath.Join(t.TempDir(), "tool")
	b, err := os.ReadFile(filepath.Join(lib, "hyphae-init"))
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(prog, b, 0o755)

	first := buildResult(t, hyphae(t, home, nil, "build", "--binary", prog, "--json", "--env", "MODE=test"))
	if first.Name != "tool" || first.Tag != "latest" || !strings.HasPrefix(first.Digest, "sha256:") || first.Cached ||
		first.SizeBytes <= 0 || !slices.Equal(first.Entrypoint, []string{"/app/tool"}) {
		t.Fatalf("first build = %+v", first)
	}
	if st, err := os.Stat(first.Path); err != nil || filepath.Dir(first.Path) != filepath.Join(home, "images") || st.Size() != first.SizeBytes {
		t.Fatalf("image file %s: %v", first.Path, err)
	}

	again := buildResult(t, hyphae(t, home, nil, "build", "--binary", prog, "--json", "--env", "MODE=test"))
	if !again.Cached || again.Digest != first.Digest {
		t.Fatalf("rebuild = %+v, want cached %s", again, first.Digest)
	}
	// A changed env is a different image, under a new tag; the quiet form
	// prints only the digest.
	q := hyphae(t, home, nil, "build", "--binary", prog, "-q", "--env", "MODE=prod", "--tag", "prod")
	if q.code != 0 || !strings.HasPrefix(q.stdout, "sha256:") || strings.Count(q.stdout, "\n") != 1 || q.stdout == first.Digest+"\n" {
		t.Fatalf("quiet build = %+v", q)
	}
	dry := buildResult(t, hyphae(t, home, nil, "build", "--binary", prog, "--json", "--dry-run", "--name", "dry"))
	if !dry.DryRun {
		t.Fatalf("dry run = %+v", dry)
	}
	txt := hyphae(t, home, nil, "build", "--binary", prog, "--env", "MODE=test", "--entrypoint", `/app/tool "two words"`)
	if txt.code != 0 || !strings.HasPrefix(txt.stdout, "Built tool:latest\n") || !strings.Contains(txt.stdout, `["/app/tool","two words"]`) {
		t.Fatalf("text build = %+v", txt)
	}

	var imgs []registry.Image
	hyphae(t, home, nil, "list", "images", "--json").decode(t, &imgs)
	var refs []string
	for _, img := range imgs {
		refs = append(refs, img.Ref())
	}
	// tool:latest moved to the entrypoint build; the first digest is
	// untagged now; dry-run registered nothing.
	if len(imgs) != 3 || !slices.Contains(refs, "tool:latest") || !slices.Contains(refs, "tool:prod") || !slices.Contains(refs, first.Digest) {
		t.Fatalf("after builds: %v", refs)
	}

	// A project directory without a marker is a coded error.
	r := hyphae(t, home, nil, "build", t.TempDir(), "--json")
	var je jsonError
	r.decode(t, &je)
	if r.code != ExitError || je.Error.Code != "E402" {
		t.Fatalf("empty project: exit %d, %+v", r.code, je)
	}
}

func TestImport(t *testing.T) {
	testenv.RequiresTool(t, "mkfs.ext4")
	testenv.GuestBinaries(t, "hyphae-init")
	home := t.TempDir()
	tarPath := filepath.Join(t.TempDir(), "My_App.tar")
	err := archivetest.Write(tarPath, archivetest.Spec{
		Layout: archivetest.OCI,
		Layers: [][]archivetest.Entry{
			{{Name: "bin/"}, {Name: "bin/app", Body: "#!/bin/sh\necho hi\n", Mode: 0o755}},
			{{Name: "bin/.wh.gone"}, {Name: "etc/"}, {Name: "etc/app.conf", Body: "x=1\n"}},
		},
		Config: v1.Config{Entrypoint: []string{"/bin/app"}, Cmd: []string{"serve"}, Env: []string{"A=1"}, WorkingDir: "/srv"},
	})
	if err != nil {
		t.Fatal(err)
	}
	res := buildResult(t, hyphae(t, home, nil, "import", tarPath, "--json", "--env", "B=2"))
	if res.Name != "my_app" || res.Cached || !slices.Equal(res.Entrypoint, []string{"/bin/app", "serve"}) {
		t.Fatalf("import = %+v", res)
	}
	archiveBytes, err := os.ReadFile(tarPath)
	if err != nil {
		t.Fatal(err)
	}
	fromStdin := buildResult(t, hyphae(t, home, archiveBytes, "import", "-", "--name", "piped", "--env", "B=2", "--json"))
	if fromStdin.Digest != res.Digest || !fromStdin.Cached || fromStdin.Name != "piped" {
		t.Fatalf("import from stdin = %+v, want cached %s", fromStdin, res.Digest)
	}
	var d imageDetail
	hyphae(t, home, nil, "inspect", "piped", "--json").decode(t, &d)
	if !slices.Equal(d.Tags, []string{"my_app:latest", "piped:latest"}) || d.Source != "archive" {
		t.Fatalf("inspect after imports = %+v", d)
	}

	// Stdin without --name, and a file that is not an archive, fail coded
	// and register nothing.
	r := hyphae(t, home, archiveBytes, "import", "-", "--json")
	var je jsonError
	r.decode(t, &je)
	if r.code != ExitError || je.Error.Code != "E204" {
		t.Fatalf("import - without --name: exit %d, %+v", r.code, je)
	}
	junk := filepath.Join(t.TempDir(), "junk.tar")
	os.WriteFile(junk, []byte("not a tar"), 0o644)
	r = hyphae(t, home, nil, "import", junk)
	if r.code != ExitError || !strings.HasPrefix(r.stderr, "Error: E4") {
		t.Fatalf("import junk: %+v", r)
	}
	var imgs []registry.Image
	hyphae(t, home, nil, "list", "images", "--json").decode(t, &imgs)
	if len(imgs) != 2 {
		t.Fatalf("failed imports registered something: %+v", imgs)
	}
	entries, _ := os.ReadDir(filepath.Join(home, "images"))
	if len(entries) != 1 {
		t.Fatalf("images/ holds %d files, want 1", len(entries))
	}
}

// TestBinary builds the real hyphae binary and runs it: `hyphae check
// --json` with and without the guest binaries it needs, and two processes
// building into one home at once.
func TestBinary(t *testing.T) {
	testenv.RequiresTool(t, "mkfs.ext4")
	testenv.RequiresTool(t, "debugfs")
	lib := testenv.GuestBinaries(t, "hyphae-init")
	bin := filepath.Join(t.TempDir(), "hyphae")
	build := exec.Command("go", "build", "-o", bin, "./cmd/hyphae")
	build.Dir = testenv.ModuleRoot(t)
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	t.Run("check", func(t *testing.T) { testBinaryCheck(t, bin, lib) })
	t.Run("concurrent builds", func(t *testing.T) { testConcurrentBuilds(t, bin, lib) })
}

func testBinaryCheck(t *testing.T, bin, lib string) {
	home := filepath.Join(t.TempDir(), "home")
	check := func(libexec string) (checkReport, int) {
		cmd := exec.Command(bin, "check", "--json")
		cmd.Env = append(os.Environ(), "HYPHAE_HOME="+home, "HYPHAE_LIBEXEC="+libexec)
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		if stderr.Len() != 0 {
			t.Fatalf("check --json wrote to stderr: %s", stderr.String())
		}
		var rep checkReport
		if err := json.Unmarshal(stdout.Bytes(), &rep); err != nil {
			t.Fatalf("check --json: %v\n%s", err, stdout.String())
		}
		return rep, code
	}
	status := func(rep checkReport, name string) checkResult {
		for _, c := range rep.Checks {
			if c.Name == name {
				return c
			}
		}
		t.Fatalf("no check %q in %+v", name, rep)
		return checkResult{}
	}

	rep, code := check(lib)
	if code != 0 || !rep.OK {
		t.Fatalf("check with everything installed: exit %d, %+v", code, rep)
	}
	for _, name := range []string{"mkfs.ext4", "debugfs", "hyphae-init", "home"} {
		if c := status(rep, name); c.Status != "ok" || !c.Required || c.Detail == "" {
			t.Fatalf("%s = %+v", name, c)
		}
	}
	if c := status(rep, "hyphae-init"); c.Detail != filepath.Join(lib, "hyphae-init") {
		t.Fatalf("hyphae-init found at %q, want %q", c.Detail, filepath.Join(lib, "hyphae-init"))
	}
	if _, err := os.Stat(home); !os.IsNotExist(err) {
		t.Fatal("check created the home directory")
	}

	rep, code = check(t.TempDir()) // no hyphae-init there, nor next to bin
	if code != ExitError || rep.OK {
		t.Fatalf("check without hyphae-init: exit %d, ok %v", code, rep.OK)
	}
	if c := status(rep, "hyphae-init"); c.Status != "missing" || c.Hint == "" {
		t.Fatalf("hyphae-init = %+v, want missing with a hint", c)
	}
}

// testConcurrentBuilds runs two hyphae processes that each build and tag
// several images into one home at the same time, moving one shared tag too.
func testConcurrentBuilds(t *testing.T, bin, lib string) {
	home := t.TempDir()
	prog := filepath.Join(t.TempDir(), "prog")
	b, err := os.ReadFile(filepath.Join(lib, "hyphae-init"))
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(prog, b, 0o755)
	const perProcess = 4
	// Each process runs its builds one after another in a shell loop, so
	// the two processes overlap for the whole run.
	var script strings.Builder
	for i := range perProcess {
		fmt.Fprintf(&script, "%q build --binary %q --name p$1 --tag t%d --env N=$1-%d -q || exit 1\n", bin, prog, i, i)
		fmt.Fprintf(&script, "%q build --binary %q --name shared --env N=$1-%d -q || exit 1\n", bin, prog, i)
	}
	var cmds []*exec.Cmd
	var outs []*bytes.Buffer
	for p := range 2 {
		cmd := exec.Command("sh", "-c", script.String(), "sh", fmt.Sprint(p))
		cmd.Env = append(os.Environ(), "HYPHAE_HOME="+home, "HYPHAE_LIBEXEC="+lib)
		out := &bytes.Buffer{}
		cmd.Stdout, cmd.Stderr = out, out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		cmds, outs = append(cmds, cmd), append(outs, out)
	}
	for p, cmd := range cmds {
		if err := cmd.Wait(); err != nil {
			t.Fatalf("process %d: %v\n%s", p, err, outs[p])
		}
	}
	var imgs []registry.Image
	hyphae(t, home, nil, "list", "images", "--json").decode(t, &imgs)
	tags := map[string]string{}
	digests := map[string]bool{}
	for _, img := range imgs {
		digests[img.Digest] = true
		if img.Name != "" {
			tags[img.Ref()] = img.Digest
		}
	}
	// 2×perProcess distinct images (the shared builds reuse them, cached),
	// 2×perProcess own tags plus shared:latest.
	if len(digests) != 2*perProcess || len(tags) != 2*perProcess+1 || tags["shared:latest"] == "" {
		t.Fatalf("after concurrent builds: %d digests, tags %v", len(digests), tags)
	}
	for d := range digests {
		if _, err := os.Stat(filepath.Join(home, "images", strings.Replace(d, ":", "-", 1)+".ext4")); err != nil {
			t.Fatalf("image file of %s: %v", d, err)
		}
	}
	if entries, _ := os.ReadDir(filepath.Join(home, "images")); len(entries) != 2*perProcess {
		t.Fatalf("images/ holds %d files, want %d (temp files left?)", len(entries), 2*perProcess)
	}
	// Opening the registry (done by list above) would have moved a damaged
	// database aside.
	if aside, _ := filepath.Glob(filepath.Join(home, registry.DBFile+".corrupt-*")); len(aside) != 0 {
		t.Fatalf("registry was damaged by concurrent builds: %v", aside)
	}
}
