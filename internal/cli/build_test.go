package cli

import (
	"bytes"
	"database/sql"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	_ "modernc.org/sqlite" // the registry's driver, to check the database directly

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
// building and importing into one home at once.
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
	t.Run("concurrent builds and imports", func(t *testing.T) { testConcurrentBuildsAndImports(t, bin, lib) })
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

// testConcurrentBuildsAndImports runs two hyphae processes that each build
// and import several images into one home at the same time, both moving
// one shared tag with builds and imports alike. Afterwards the database
// passes SQLite's integrity and foreign-key checks, and every tag points at
// the image of its own content: a serial rerun of each command is a cache
// hit on the very digest the tag holds.
func testConcurrentBuildsAndImports(t *testing.T, bin, lib string) {
	home := t.TempDir()
	prog := filepath.Join(t.TempDir(), "prog")
	b, err := os.ReadFile(filepath.Join(lib, "hyphae-init"))
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(prog, b, 0o755)
	archives := t.TempDir()
	const perProcess = 4
	// cmds[p][i] are process p's commands of round i: its own build, its
	// own import, and the same two again under the shared name (cache
	// hits that only move shared:latest).
	type command struct {
		args []string
		ref  string // the tag it sets, "" for shared:latest
	}
	var rounds [2][perProcess][]command
	var scripts [2]strings.Builder
	for p := range 2 {
		for i := range perProcess {
			tarPath := filepath.Join(archives, fmt.Sprintf("a%d-%d.tar", p, i))
			err := archivetest.Write(tarPath, archivetest.Spec{
				Layout: archivetest.Layout(i % 2), Gzip: p == 1,
				Layers: [][]archivetest.Entry{
					{{Name: "bin/"}, {Name: "bin/app", Body: "#!/bin/sh\necho hi\n", Mode: 0o755}},
					{{Name: "etc/"}, {Name: "etc/id", Body: fmt.Sprintf("%d-%d\n", p, i)}},
				},
				Config: v1.Config{Entrypoint: []string{"/bin/app"}, Env: []string{fmt.Sprintf("N=%d-%d", p, i)}},
			})
			if err != nil {
				t.Fatal(err)
			}
			name := fmt.Sprint("p", p)
			build := []string{"build", "--binary", prog, "--env", fmt.Sprintf("N=%d-%d", p, i)}
			imp := []string{"import", tarPath}
			own := []command{
				{append(slices.Clone(build), "--name", name, "--tag", fmt.Sprint("b", i)), fmt.Sprintf("%s:b%d", name, i)},
				{append(slices.Clone(imp), "--name", name, "--tag", fmt.Sprint("i", i)), fmt.Sprintf("%s:i%d", name, i)},
			}
			if p == 1 { // imports in one process meet builds in the other
				own[0], own[1] = own[1], own[0]
			}
			shared := []command{{append(slices.Clone(build), "--name", "shared"), ""}, {append(slices.Clone(imp), "--name", "shared"), ""}}
			rounds[p][i] = append(own, shared...)
			for _, c := range rounds[p][i] {
				fmt.Fprintf(&scripts[p], "%q", bin)
				for _, a := range c.args {
					fmt.Fprintf(&scripts[p], " %q", a)
				}
				scripts[p].WriteString(" -q || exit 1\n")
			}
		}
	}
	var cmds []*exec.Cmd
	var outs []*bytes.Buffer
	for p := range 2 {
		// Each process runs its commands one after another in a shell
		// loop, so the two processes overlap for the whole run.
		cmd := exec.Command("sh", "-c", scripts[p].String())
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

	// Check the database itself before anything opens it through the
	// registry, which would move a damaged one aside.
	db, err := sql.Open("sqlite", "file:"+filepath.Join(home, registry.DBFile)+"?_pragma=busy_timeout(5000)")
	if err != nil {
		t.Fatal(err)
	}
	var integrity string
	if err := db.QueryRow("PRAGMA integrity_check").Scan(&integrity); err != nil || integrity != "ok" {
		t.Fatalf("integrity_check = %q, %v", integrity, err)
	}
	rows, err := db.Query("PRAGMA foreign_key_check")
	if err != nil {
		t.Fatal(err)
	}
	if rows.Next() {
		t.Error("foreign_key_check reports dangling rows")
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("foreign_key_check: %v", err)
	}
	rows.Close()
	db.Close()

	var imgs []registry.Image
	hyphae(t, home, nil, "list", "images", "--json").decode(t, &imgs)
	tags := map[string]string{}
	sizes := map[string]int64{}
	for _, img := range imgs {
		sizes[img.Digest] = img.SizeBytes
		if img.Name != "" {
			tags[img.Ref()] = img.Digest
		}
	}
	// 2×2×perProcess distinct images (the shared ones reuse them, cached),
	// each with its own tag, plus shared:latest.
	if len(sizes) != 4*perProcess || len(tags) != 4*perProcess+1 || tags["shared:latest"] == "" {
		t.Fatalf("after concurrent builds and imports: %d digests, tags %v", len(sizes), tags)
	}
	for p := range 2 {
		for i := range perProcess {
			for _, c := range rounds[p][i] {
				if c.ref == "" {
					continue
				}
				again := buildResult(t, hyphae(t, home, nil, append(slices.Clone(c.args), "--json")...))
				if !again.Cached || again.Digest != tags[c.ref] {
					t.Errorf("%s → %s, but a serial rerun of %v gives %+v", c.ref, tags[c.ref], c.args, again)
				}
			}
		}
	}
	for d, size := range sizes {
		st, err := os.Stat(filepath.Join(home, "images", strings.Replace(d, ":", "-", 1)+".ext4"))
		if err != nil || st.Size() != size {
			t.Fatalf("image file of %s (registered size %d): %v", d, size, err)
		}
	}
	if entries, _ := os.ReadDir(filepath.Join(home, "images")); len(entries) != len(sizes) {
		t.Fatalf("images/ holds %d files, want %d (temp files left?)", len(entries), len(sizes))
	}
	if aside, _ := filepath.Glob(filepath.Join(home, registry.DBFile+".corrupt-*")); len(aside) != 0 {
		t.Fatalf("registry was damaged by concurrent builds and imports: %v", aside)
	}
}
