package cli

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/vmm/vmmproc"
)

// fakeBzImage writes the smallest file the kernel package takes for an
// x86_64 bzImage (QEMU only).
func fakeBzImage(t *testing.T) string {
	t.Helper()
	b := make([]byte, 0x268)
	copy(b[0x202:], "HdrS")
	b[0x206], b[0x207] = 0x0f, 0x02
	b[0x211], b[0x236] = 0x01, 0x01
	p := filepath.Join(t.TempDir(), "vmlinuz-test")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestKernelCommands(t *testing.T) {
	home := t.TempDir()
	t.Setenv(vmmproc.EnvRuntimeDir, t.TempDir())
	bz := fakeBzImage(t)

	r := hyphae(t, home, nil, "kernel", "add", bz, "--json")
	if r.code != 0 {
		t.Fatalf("kernel add: %+v", r)
	}
	var k struct {
		Name       string   `json:"name"`
		Path       string   `json:"path"`
		SHA256     string   `json:"sha256"`
		Format     string   `json:"format"`
		Arch       string   `json:"arch"`
		SizeBytes  int64    `json:"size_bytes"`
		VMMs       []string `json:"vmms"`
		CreatedAt  string   `json:"created_at"`
		DefaultFor []string `json:"default_for"`
	}
	r.decode(t, &k)
	if k.Name != "vmlinuz-test" || k.Format != "bzimage" || strings.Join(k.VMMs, ",") != "qemu" || strings.Join(k.DefaultFor, ",") != "qemu" ||
		filepath.Dir(k.Path) != filepath.Join(home, "kernels") {
		t.Errorf("kernel add = %+v", k)
	}

	r = hyphae(t, home, nil, "kernel", "list")
	if r.code != 0 || !strings.Contains(r.stdout, "vmlinuz-test") || !strings.Contains(r.stdout, "DEFAULT FOR") {
		t.Errorf("kernel list:\n%s%s", r.stdout, r.stderr)
	}
	// The image is looked up before any kernel or VMM: a missing one is
	// E501 whatever else is wrong.
	r = hyphae(t, home, nil, "run", "img", "--vmm", "firecracker", "--kernel", "vmlinuz-test")
	if r.code != ExitError || !strings.Contains(r.stderr, "E501") {
		t.Errorf("run of a missing image: %+v", r)
	}

	for _, tt := range []struct {
		args []string
		exit int
		code string
	}{
		{[]string{"kernel", "add", "/etc/hostname"}, ExitError, "E701"},
		{[]string{"kernel", "add", "/no/such/kernel"}, ExitError, "E702"},
		{[]string{"kernel", "rm", "nope"}, ExitError, "E702"},
		{[]string{"kernel", "fetch", "https://example.invalid/vmlinux"}, ExitUsage, "E201"},
		{[]string{"kernel", "fetch"}, ExitUsage, "E201"},
		{[]string{"kernel", "fetch", "ftp://x/y", "--sha256", strings.Repeat("0", 64)}, ExitError, "E201"},
	} {
		r := hyphae(t, home, nil, append(tt.args, "--json")...)
		var je jsonError
		r.decode(t, &je)
		if r.code != tt.exit || je.Error.Code != tt.code {
			t.Errorf("%v: exit %d, %+v; want %d %s", tt.args, r.code, je.Error, tt.exit, tt.code)
		}
	}

	r = hyphae(t, home, nil, "kernel", "rm", "vmlinuz-test", "--json")
	if r.code != 0 {
		t.Fatalf("kernel rm: %+v", r)
	}
	if left, _ := os.ReadDir(filepath.Join(home, "kernels")); len(left) != 0 {
		t.Errorf("kernel file left after rm: %v", left)
	}
}

func TestVMCommandsWithoutVMs(t *testing.T) {
	home := t.TempDir()
	t.Setenv(vmmproc.EnvRuntimeDir, t.TempDir())
	if r := hyphae(t, home, nil, "list", "vms", "--json"); r.code != 0 || strings.TrimSpace(r.stdout) != "[]" {
		t.Errorf("list vms = %+v", r)
	}
	for _, args := range [][]string{{"stop", "abc"}, {"logs", "abc"}} {
		r := hyphae(t, home, nil, append(args, "--json")...)
		var je jsonError
		r.decode(t, &je)
		if r.code != ExitError || je.Error.Code != string(errcode.VMNotFound) {
			t.Errorf("%v: exit %d, %+v", args, r.code, je.Error)
		}
	}
	r := hyphae(t, home, nil, "inspect", "abc")
	if r.code != ExitError || !strings.Contains(r.stderr, "E501") {
		t.Errorf("inspect of neither an image nor a VM: %+v", r)
	}
	r = hyphae(t, home, nil, "run", "x", "--timeout", "-1s")
	if r.code != ExitUsage {
		t.Errorf("negative timeout: %+v", r)
	}
}

func TestExitStatusRendering(t *testing.T) {
	var out, errOut bytes.Buffer
	a := &app{env: Env{Stdout: &out, Stderr: &errOut}, started: true}
	code := a.renderError(nil, exitStatus{code: ExitTimeout, err: errcode.New(errcode.Timeout, "the program did not finish within 1s")})
	if code != ExitTimeout || !strings.HasPrefix(errOut.String(), "Error: E302: the program did not finish") || out.Len() != 0 {
		t.Errorf("exit %d, stderr %q, stdout %q", code, errOut.String(), out.String())
	}
	errOut.Reset()
	if code := a.renderError(nil, exitStatus{code: 3}); code != 3 || errOut.Len() != 0 {
		t.Errorf("a plain exit code: %d, stderr %q", code, errOut.String())
	}
}

func TestVMHelpHasExamples(t *testing.T) {
	for _, args := range [][]string{{"run"}, {"logs"}, {"stop"}, {"list", "vms"}, {"kernel"}, {"kernel", "add"}, {"kernel", "fetch"}, {"kernel", "list"}, {"kernel", "rm"}} {
		r := hyphae(t, t.TempDir(), nil, append(args, "--help")...)
		if r.code != 0 || !strings.Contains(r.stdout, "Examples:") || !strings.Contains(r.stdout, "--json") {
			t.Errorf("%v --help: exit %d\n%s", args, r.code, r.stdout)
		}
	}
}
