package cli

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/hyphae-run/hyphae/registry"
)

// result is one in-process run of the CLI.
type result struct {
	stdout, stderr string
	code           int
}

// hyphae runs the root command in-process against home, with stdin.
func hyphae(t *testing.T, home string, stdin []byte, args ...string) result {
	t.Helper()
	var out, errOut bytes.Buffer
	env := Env{
		Stdin: bytes.NewReader(stdin), Stdout: &out, Stderr: &errOut,
		Getenv: func(k string) string {
			if k == EnvHome {
				return home
			}
			return os.Getenv(k)
		},
	}
	code := Run(context.Background(), args, env)
	return result{stdout: out.String(), stderr: errOut.String(), code: code}
}

// decode parses r.stdout as one JSON document into v.
func (r result) decode(t *testing.T, v any) {
	t.Helper()
	dec := json.NewDecoder(strings.NewReader(r.stdout))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		t.Fatalf("stdout is not the expected JSON: %v\n%s", err, r.stdout)
	}
	if dec.More() {
		t.Fatalf("stdout holds more than one JSON document:\n%s", r.stdout)
	}
}

type jsonError struct {
	Error struct {
		Code    string `json:"code"`
		Message string `json:"message"`
		Hint    string `json:"hint"`
	} `json:"error"`
}

func TestErrorRendering(t *testing.T) {
	home := t.TempDir()
	tests := []struct {
		name     string
		args     []string
		code     int
		errCode  string
		contains string // in the message
		hint     string // in the hint
	}{
		{"unknown command", []string{"bogus"}, ExitUsage, "E201", `unknown command "bogus"`, "hyphae --help"},
		{"unknown flag", []string{"list", "images", "--bogus"}, ExitUsage, "E201", "unknown flag: --bogus", "hyphae list bundles --help"},
		{"missing argument", []string{"inspect"}, ExitUsage, "E201", "accepts 1 arg(s), received 0", "hyphae inspect --help"},
		{"extra argument", []string{"gc", "now"}, ExitUsage, "E201", "unknown command", ""},
		{"bad flag value", []string{"build", "--size", "big", "."}, ExitUsage, "E201", "invalid argument", ""},
		{"bad log level", []string{"--log-level", "loud", "list", "images"}, ExitUsage, "E201", "invalid --log-level", ""},
		{"build without input", []string{"build"}, ExitUsage, "E201", "either a project directory or --binary", ""},
		{"build with both", []string{"build", ".", "--binary", "x"}, ExitUsage, "E201", "either a project directory or --binary", ""},
		{"bad env", []string{"build", ".", "--env", "NOEQUALS"}, ExitUsage, "E203", `"NOEQUALS" is not KEY=VALUE`, ""},
		{"bad entrypoint", []string{"build", ".", "--entrypoint", `node "x`}, ExitUsage, "E201", "", ""},
		{"not found", []string{"inspect", "nope"}, ExitError, "E501", "no image nope:latest", "hyphae list images"},
		{"bad ref", []string{"inspect", "Bad/Ref"}, ExitError, "E204", `invalid image name "Bad/Ref"`, "lowercase"},
		{"rm not found", []string{"rm", "nope:v1"}, ExitError, "E501", "no image nope:v1", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := hyphae(t, home, nil, tt.args...)
			if r.code != tt.code {
				t.Fatalf("exit %d, want %d\nstdout: %s\nstderr: %s", r.code, tt.code, r.stdout, r.stderr)
			}
			if r.stdout != "" {
				t.Fatalf("text mode printed to stdout: %q", r.stdout)
			}
			lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
			if !strings.HasPrefix(lines[0], "Error: "+tt.errCode+": ") || !strings.Contains(lines[0], tt.contains) {
				t.Fatalf("stderr first line = %q, want Error: %s: …%s…", lines[0], tt.errCode, tt.contains)
			}
			if tt.hint != "" && (len(lines) < 2 || !strings.HasPrefix(lines[1], "Hint: ") || !strings.Contains(lines[1], tt.hint)) {
				t.Fatalf("stderr = %q, want a Hint line with %q", r.stderr, tt.hint)
			}

			// The same failure under --json: one document on stdout,
			// nothing on stderr, same exit code.
			j := hyphae(t, home, nil, append([]string{"--json"}, tt.args...)...)
			if j.code != tt.code || j.stderr != "" {
				t.Fatalf("--json: exit %d, stderr %q", j.code, j.stderr)
			}
			var je jsonError
			j.decode(t, &je)
			if je.Error.Code != tt.errCode || !strings.Contains(je.Error.Message, tt.contains) || strings.HasPrefix(je.Error.Message, "E") {
				t.Fatalf("--json error = %+v", je.Error)
			}
			if tt.hint != "" && !strings.Contains(je.Error.Hint, tt.hint) {
				t.Fatalf("--json hint = %q, want %q", je.Error.Hint, tt.hint)
			}
		})
	}
}

func TestDefaultHome(t *testing.T) {
	tests := []struct {
		env  map[string]string
		want string
	}{
		{map[string]string{"HYPHAE_HOME": "/h", "XDG_DATA_HOME": "/x", "HOME": "/home/u"}, "/h"},
		{map[string]string{"XDG_DATA_HOME": "/x", "HOME": "/home/u"}, "/x/hyphae"},
		{map[string]string{"HOME": "/home/u"}, "/home/u/.local/share/hyphae"},
		{map[string]string{}, ""},
	}
	for _, tt := range tests {
		got, err := DefaultHome(func(k string) string { return tt.env[k] })
		if got != tt.want || (tt.want == "") != (err != nil) {
			t.Errorf("DefaultHome(%v) = %q, %v; want %q", tt.env, got, err, tt.want)
		}
	}
}

func digestOf(s string) string {
	sum := sha256.Sum256([]byte(s))
	return "sha256:" + hex.EncodeToString(sum[:])
}

// seed registers images through the registry API, as a build would.
func seed(t *testing.T, home string, fn func(ctx context.Context, r *registry.Registry)) {
	t.Helper()
	ctx := context.Background()
	r, err := registry.Open(ctx, home, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	fn(ctx, r)
}

func putImage(t *testing.T, ctx context.Context, r *registry.Registry, content, name, tag string) registry.Image {
	t.Helper()
	img := registry.Image{Digest: digestOf(content), Name: name, Tag: tag, SizeBytes: int64(len(content)),
		Source: "test", Entrypoint: []string{"/app/run", "--flag", ""}, VCPUs: 2, MemoryMiB: 256}
	if err := os.WriteFile(r.ImagePath(img.Digest), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := r.PutImage(ctx, img); err != nil {
		t.Fatal(err)
	}
	img.Path = r.ImagePath(img.Digest)
	return img
}

func TestImageCommands(t *testing.T) {
	home := t.TempDir()
	var app1, other registry.Image
	seed(t, home, func(ctx context.Context, r *registry.Registry) {
		app1 = putImage(t, ctx, r, "app content", "app", "v1")
		putImage(t, ctx, r, "app content", "app", "v2")
		other = putImage(t, ctx, r, "other content", "other", "")
	})

	// list, as JSON, text and quiet.
	var imgs []registry.Image
	hyphae(t, home, nil, "list", "images", "--json").decode(t, &imgs)
	var refs []string
	for _, img := range imgs {
		refs = append(refs, img.Ref())
	}
	if !slices.Equal(refs, []string{"app:v1", "app:v2", "other:latest"}) {
		t.Fatalf("list refs = %v", refs)
	}
	if imgs[0].Digest != app1.Digest || imgs[0].Path != app1.Path || imgs[0].SizeBytes != int64(len("app content")) ||
		!slices.Equal(imgs[0].Entrypoint, app1.Entrypoint) || imgs[0].VCPUs != 2 || imgs[0].MemoryMiB != 256 || imgs[0].CreatedAt.IsZero() {
		t.Fatalf("list entry = %+v", imgs[0])
	}
	text := hyphae(t, home, nil, "list", "bundles")
	if text.code != 0 || !strings.HasPrefix(text.stdout, "NAME") || !strings.Contains(text.stdout, shortDigest(app1.Digest)) ||
		strings.Contains(text.stdout, app1.Digest) {
		t.Fatalf("list text = %q", text.stdout)
	}
	if q := hyphae(t, home, nil, "list", "images", "-q"); q.stdout != "app:v1\napp:v2\nother:latest\n" {
		t.Fatalf("list -q = %q", q.stdout)
	}

	// inspect by tag, digest and prefix.
	for _, ref := range []string{"app:v1", app1.Digest, shortDigest(app1.Digest)} {
		var d imageDetail
		hyphae(t, home, nil, "inspect", ref, "--json").decode(t, &d)
		if d.Digest != app1.Digest || !slices.Equal(d.Tags, []string{"app:v1", "app:v2"}) || d.Path != app1.Path {
			t.Fatalf("inspect %s = %+v", ref, d)
		}
	}
	if r := hyphae(t, home, nil, "inspect", "other"); r.code != 0 || !strings.Contains(r.stdout, other.Digest) ||
		!strings.Contains(r.stdout, `["/app/run","--flag",""]`) {
		t.Fatalf("inspect text = %q", r.stdout)
	}

	// rm is refused while a VM runs the image.
	seed(t, home, func(ctx context.Context, r *registry.Registry) {
		if err := r.PutVM(ctx, registry.VM{ID: "vm-1", ImageDigest: other.Digest, State: registry.VMRunning}); err != nil {
			t.Fatal(err)
		}
	})
	r := hyphae(t, home, nil, "rm", "other", "--json")
	var je jsonError
	r.decode(t, &je)
	if r.code != ExitError || je.Error.Code != "E502" || !strings.Contains(je.Error.Message, "vm-1") || je.Error.Hint == "" {
		t.Fatalf("rm while running: exit %d, %+v", r.code, je)
	}
	if _, err := os.Stat(other.Path); err != nil {
		t.Fatalf("refused rm touched the file: %v", err)
	}

	// rm of one tag keeps the file; rm of the last removes it.
	var rm struct {
		Removed []string `json:"removed"`
	}
	hyphae(t, home, nil, "rm", "app:v1", "--json").decode(t, &rm)
	if !slices.Equal(rm.Removed, []string{"app:v1"}) {
		t.Fatalf("rm = %+v", rm)
	}
	if _, err := os.Stat(app1.Path); err != nil {
		t.Fatal("file removed while app:v2 still names it")
	}
	if r := hyphae(t, home, nil, "rm", "app:v2"); r.code != 0 || r.stdout != "Removed app:v2\n" {
		t.Fatalf("rm text = %+v", r)
	}
	if _, err := os.Stat(app1.Path); !os.IsNotExist(err) {
		t.Fatal("file kept after its last tag")
	}

	// gc removes only what nothing points to.
	stray := filepath.Join(home, "images", "sha256-"+strings.Repeat("a", 64)+".ext4")
	os.WriteFile(stray, []byte("x"), 0o644)
	var gc struct {
		Removed []string `json:"removed"`
	}
	hyphae(t, home, nil, "gc", "--json").decode(t, &gc)
	if !slices.Equal(gc.Removed, []string{stray}) {
		t.Fatalf("gc removed %v, want [%s]", gc.Removed, stray)
	}
	if _, err := os.Stat(other.Path); err != nil {
		t.Fatal("gc removed a registered image")
	}
	if r := hyphae(t, home, nil, "gc"); r.code != 0 || r.stdout != "0 files removed\n" {
		t.Fatalf("second gc = %+v", r)
	}
	if r := hyphae(t, home, nil, "gc", "-q"); r.code != 0 || r.stdout != "" {
		t.Fatalf("gc -q = %+v", r)
	}
}

func TestEmptyListIsAnArray(t *testing.T) {
	r := hyphae(t, t.TempDir(), nil, "list", "images", "--json")
	if r.code != 0 || strings.TrimSpace(r.stdout) != "[]" {
		t.Fatalf("empty list = %+v", r)
	}
}

func TestHelpHasExamples(t *testing.T) {
	for _, args := range [][]string{{"build"}, {"import"}, {"check"}, {"list", "bundles"}, {"inspect"}, {"rm"}, {"gc"}} {
		r := hyphae(t, t.TempDir(), nil, append(args, "--help")...)
		if r.code != 0 || !strings.Contains(r.stdout, "Examples:") || !strings.Contains(r.stdout, "--json") {
			t.Errorf("%v --help: exit %d\n%s", args, r.code, r.stdout)
		}
	}
}
