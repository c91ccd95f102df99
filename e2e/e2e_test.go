// Package e2e runs the real hyphae binary end to end: it builds the
// examples and an imported archive into a temporary home, boots each under
// QEMU (TCG here) with Debian's cloud kernel, and checks output, exit codes,
// environment, stops, detach, logs, reconcile and that nothing is left
// behind. Without QEMU or the test kernel the tests skip, or fail under
// HYPHAE_E2E=require.
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hyphae-run/hyphae/internal/testenv"
	"github.com/hyphae-run/hyphae/kernel/kerneltest"
	"github.com/hyphae-run/hyphae/vmm/vmmproc"
)

// commandTimeout bounds one hyphae command (a boot under TCG on a busy
// 2-core host takes a few seconds).
const commandTimeout = 3 * time.Minute

// env is the shared test installation: binaries, home and runtime dir.
type env struct {
	dir, bin, home, rt string
}

var (
	setupOnce sync.Once
	shared    *env
	setupErr  error
	// tempRoot is removed by TestMain.
	tempRoot string
)

func TestMain(m *testing.M) {
	code := m.Run()
	if tempRoot != "" {
		// A failed test may have left a VM of this run behind: its QEMU's
		// command line names our temp dir, so it is certainly ours.
		for _, pid := range qemuProcesses(tempRoot) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		os.RemoveAll(tempRoot)
	}
	os.Exit(code)
}

// setup checks the prerequisites and, once per package, builds hyphae and
// hyphae-init and registers the test kernel.
func setup(t *testing.T) *env {
	t.Helper()
	testenv.RequiresRoot(t)
	for _, tool := range []string{"qemu-system-x86_64", "qemu-img", "mkfs.ext4", "go"} {
		testenv.RequiresTool(t, tool)
	}
	kern := kerneltest.Path(t)
	setupOnce.Do(func() {
		// A short root keeps the VMs' socket paths well under the limit.
		tempRoot, setupErr = os.MkdirTemp("", "hye2e-")
		if setupErr != nil {
			return
		}
		e := &env{dir: tempRoot, bin: filepath.Join(tempRoot, "bin"), home: filepath.Join(tempRoot, "home"), rt: filepath.Join(tempRoot, "rt")}
		build := exec.Command("go", "build", "-trimpath", "-o", e.bin+"/", "./cmd/hyphae", "./cmd/hyphae-init")
		build.Dir = testenv.ModuleRoot(t)
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := build.CombinedOutput(); err != nil {
			setupErr = fmt.Errorf("build hyphae: %v\n%s", err, out)
			return
		}
		if r := e.hyphae(t, "kernel", "add", kern, "--json"); r.code != 0 {
			setupErr = fmt.Errorf("kernel add: %+v", r)
			return
		}
		shared = e
	})
	if setupErr != nil {
		t.Fatal(setupErr)
	}
	return shared
}

type result struct {
	stdout, stderr string
	code           int
}

func (e *env) command(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, filepath.Join(e.bin, "hyphae"), args...)
	cmd.Env = append(os.Environ(), "HYPHAE_HOME="+e.home, vmmproc.EnvRuntimeDir+"="+e.rt, "PATH="+e.bin+":"+os.Getenv("PATH"))
	cmd.Dir = e.dir
	return cmd
}

// hyphae runs the hyphae binary to completion.
func (e *env) hyphae(t *testing.T, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), commandTimeout)
	defer cancel()
	cmd := e.command(ctx, args...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	r := result{stdout: out.String(), stderr: errOut.String()}
	if ee, ok := err.(*exec.ExitError); ok {
		r.code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("hyphae %v: %v", args, err)
	}
	return r
}

// run is hyphae run IMAGE ARGS... expecting exit code want.
func (e *env) run(t *testing.T, want int, args ...string) result {
	t.Helper()
	r := e.hyphae(t, append([]string{"run"}, args...)...)
	if r.code != want {
		t.Fatalf("hyphae run %v: exit %d, want %d\nstdout:\n%s\nstderr:\n%s", args, r.code, want, r.stdout, r.stderr)
	}
	e.assertNoLeftovers(t)
	return r
}

func (e *env) json(t *testing.T, v any, args ...string) {
	t.Helper()
	r := e.hyphae(t, append(args, "--json")...)
	if r.code != 0 {
		t.Fatalf("hyphae %v: exit %d\n%s%s", args, r.code, r.stdout, r.stderr)
	}
	if err := json.Unmarshal([]byte(r.stdout), v); err != nil {
		t.Fatalf("hyphae %v: %v\n%s", args, err, r.stdout)
	}
}

type vmJSON struct {
	ID         string `json:"id"`
	State      string `json:"state"`
	PID        int    `json:"pid"`
	RuntimeDir string `json:"runtime_dir"`
	Detached   bool   `json:"detached"`
}

// assertNoLeftovers checks that no VM row, runtime dir (with its writable
// layer) or QEMU process of this installation remains.
func (e *env) assertNoLeftovers(t *testing.T) {
	t.Helper()
	entries, _ := os.ReadDir(e.rt)
	for _, d := range entries {
		if d.IsDir() {
			t.Errorf("runtime dir left behind: %s", filepath.Join(e.rt, d.Name()))
		}
	}
	if pids := qemuProcesses(e.rt); len(pids) > 0 {
		t.Errorf("qemu processes of this test still running: %v", pids)
	}
	var vms []vmJSON
	e.json(t, &vms, "list", "vms")
	if len(vms) != 0 {
		t.Errorf("VM rows left: %+v", vms)
	}
}

// qemuProcesses lists live QEMU processes whose command line mentions dir
// (an exited one that nobody reaped has an empty command line).
func qemuProcesses(dir string) []int {
	var pids []int
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil || !bytes.Contains(b, []byte(dir)) {
			continue
		}
		argv0, _, _ := bytes.Cut(b, []byte{0})
		if strings.HasPrefix(filepath.Base(string(argv0)), "qemu-system") {
			var pid int
			fmt.Sscanf(filepath.Base(filepath.Dir(p)), "%d", &pid)
			pids = append(pids, pid)
		}
	}
	return pids
}

func (e *env) imagePath(t *testing.T, ref string) string {
	var img struct {
		Path string `json:"path"`
	}
	e.json(t, &img, "inspect", ref)
	return img.Path
}

// build builds an example into the registry as name.
func (e *env) build(t *testing.T, example, name string) {
	t.Helper()
	r := e.hyphae(t, "build", filepath.Join(testenv.ModuleRoot(t), "examples", example), "--name", name, "-q")
	if r.code != 0 {
		t.Fatalf("build %s: exit %d\n%s%s", example, r.code, r.stdout, r.stderr)
	}
}

func TestExamples(t *testing.T) {
	e := setup(t)
	e.build(t, "hello-go", "hello-go")
	img := e.imagePath(t, "hello-go")
	before := testenv.FileSHA256(t, img)

	t.Run("go", func(t *testing.T) {
		r := e.run(t, 0, "hello-go")
		if r.stdout != "hello from go\n" {
			t.Errorf("stdout %q, want only the program's line (no kernel or init noise)", r.stdout)
		}
	})
	t.Run("go env and exit code", func(t *testing.T) {
		r := e.run(t, 3, "hello-go", "--env", "GREETING=hi there = 100%", "--env", "EXIT_CODE=3")
		if r.stdout != "hello from go\nGREETING=hi there = 100%\n" {
			t.Errorf("stdout %q", r.stdout)
		}
	})
	t.Run("rust", func(t *testing.T) {
		testenv.RequiresTool(t, "cargo")
		e.build(t, "hello-rust", "hello-rust")
		r := e.run(t, 0, "hello-rust", "--env", "GREETING=from-rust")
		if r.stdout != "hello from rust\nGREETING=from-rust\n" {
			t.Errorf("stdout %q", r.stdout)
		}
	})
	t.Run("js", func(t *testing.T) {
		testenv.RequiresTool(t, "node")
		e.build(t, "hello-js", "hello-js")
		r := e.run(t, 5, "hello-js", "--env", "EXIT_CODE=5", "--memory", "512")
		if r.stdout != "hello from js\n" {
			t.Errorf("stdout %q", r.stdout)
		}
	})
	if after := testenv.FileSHA256(t, img); after != before {
		t.Errorf("the registry image changed: sha256 %s, was %s", after, before)
	}
}

// waitOutput reads lines from r until one contains want, returning all it
// read; it fails the test when r ends first.
// startSleeper starts `hyphae run hello-go` with a program that sleeps and
// returns once the program says so, with the reader of the rest of its
// output and what was read so far.
func (e *env) startSleeper(t *testing.T, ctx context.Context) (*exec.Cmd, *bufio.Reader, string) {
	t.Helper()
	cmd := e.command(ctx, "run", "hello-go", "--env", "SLEEP_SECS=300")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(out)
	return cmd, br, waitOutput(t, br, "sleeping 300 s")
}

func waitOutput(t *testing.T, r *bufio.Reader, want string) string {
	t.Helper()
	var got strings.Builder
	for {
		line, err := r.ReadString('\n')
		got.WriteString(line)
		if strings.Contains(line, want) {
			return got.String()
		}
		if err != nil {
			t.Fatalf("output ended (%v) before %q:\n%s", err, want, got.String())
		}
	}
}

// TestStop covers the ways a long-running program is stopped: --timeout,
// Ctrl-C to hyphae, hyphae stop of a detached VM (while logs -f follows
// it), and a hyphae killed outright, whose VM reconcile then cleans up
// once its VMM is gone too. In each graceful case the program must hear
// SIGTERM (Ctrl-Alt-Del → SIGINT to hyphae-init → SIGTERM to it).
func TestStop(t *testing.T) {
	e := setup(t)
	e.build(t, "hello-go", "hello-go")

	t.Run("timeout", func(t *testing.T) {
		r := e.run(t, 124, "hello-go", "--env", "SLEEP_SECS=300", "--timeout", "4s")
		if !strings.Contains(r.stderr, "E302") {
			t.Errorf("stderr lacks E302:\n%s", r.stderr)
		}
		if !strings.Contains(r.stdout, "got SIGTERM") {
			t.Errorf("the program was not stopped gracefully:\n%s", r.stdout)
		}
	})

	t.Run("ctrl-c", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), commandTimeout)
		defer cancel()
		cmd, br, seen := e.startSleeper(t, ctx)
		if err := cmd.Process.Signal(os.Interrupt); err != nil {
			t.Fatal(err)
		}
		rest, _ := io.ReadAll(br)
		err := cmd.Wait()
		if !strings.Contains(string(rest), "got SIGTERM") {
			t.Errorf("no graceful stop; output:\n%s%s", seen, rest)
		}
		if err != nil {
			t.Errorf("hyphae run after Ctrl-C: %v (the program exits 0 on SIGTERM)", err)
		}
		e.assertNoLeftovers(t)
	})

	t.Run("detach logs stop", func(t *testing.T) {
		var d struct {
			ID  string `json:"id"`
			PID int    `json:"pid"`
		}
		e.json(t, &d, "run", "hello-go", "--env", "SLEEP_SECS=300", "--detach")
		var vms []vmJSON
		e.json(t, &vms, "list", "vms")
		if len(vms) != 1 || vms[0].ID != d.ID || vms[0].State != "running" || !vms[0].Detached || vms[0].PID != d.PID {
			t.Fatalf("list vms = %+v, want the detached VM %s", vms, d.ID)
		}
		var in struct {
			vmJSON
			UptimeSeconds float64 `json:"uptime_seconds"`
			ConsolePath   string  `json:"console_path"`
			Spec          struct {
				VCPUs     int    `json:"vcpus"`
				MemoryMiB int    `json:"memory_mib"`
				BootArgs  string `json:"boot_args"`
			} `json:"spec"`
		}
		e.json(t, &in, "inspect", d.ID)
		if in.ID != d.ID || in.PID != d.PID || in.State != "running" || in.Spec.VCPUs != 1 || in.Spec.MemoryMiB != 256 ||
			!strings.Contains(in.Spec.BootArgs, "hyphae.env.SLEEP_SECS=300") || !strings.HasPrefix(in.ConsolePath, e.rt) {
			t.Errorf("inspect = %+v", in)
		}
		ctx, cancel := context.WithTimeout(context.Background(), commandTimeout)
		defer cancel()
		follow := e.command(ctx, "logs", "-f", d.ID[:6])
		out, err := follow.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := follow.Start(); err != nil {
			t.Fatal(err)
		}
		br := bufio.NewReader(out)
		waitOutput(t, br, "sleeping 300 s")
		if r := e.hyphae(t, "logs", d.ID); r.code != 0 || r.stdout != "hello from go\nsleeping 300 s\n" {
			t.Errorf("logs = %+v", r)
		}
		var stopped []struct {
			Method string `json:"method"`
		}
		e.json(t, &stopped, "stop", d.ID, "--timeout", "30s")
		if len(stopped) != 1 || stopped[0].Method != "graceful" {
			t.Errorf("stop = %+v, want graceful", stopped)
		}
		rest, _ := io.ReadAll(br)
		if err := follow.Wait(); err != nil {
			t.Errorf("logs -f: %v", err)
		}
		if !strings.Contains(string(rest), "got SIGTERM") {
			t.Errorf("logs -f did not follow to the graceful end:\n%s", rest)
		}
		e.assertNoLeftovers(t)
	})

	t.Run("killed hyphae", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), commandTimeout)
		defer cancel()
		cmd, _, _ := e.startSleeper(t, ctx)
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		// The VMM is in its own process group: it runs on, and the list
		// says so.
		var vms []vmJSON
		e.json(t, &vms, "list", "vms")
		if len(vms) != 1 || vms[0].State != "running" {
			t.Fatalf("after killing hyphae: list vms = %+v, want the still running VM", vms)
		}
		if err := syscall.Kill(vms[0].PID, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		// Reconcile (in list vms) removes the row and runtime dir once the
		// VMM is gone.
		deadline := time.Now().Add(30 * time.Second)
		for len(qemuProcesses(e.rt)) > 0 && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		e.json(t, &vms, "list", "vms")
		if len(vms) != 0 {
			t.Errorf("list vms after the VMM died = %+v, want none", vms)
		}
		e.assertNoLeftovers(t)
	})
}

// TestImportedArchive imports a docker-save archive holding a static Go
// program and runs it: plain, killed by a signal, and with an entrypoint
// hyphae-init cannot start (a coded fatal error).
func TestImportedArchive(t *testing.T) {
	e := setup(t)
	prog := filepath.Join(t.TempDir(), "prog")
	build := exec.Command("go", "build", "-trimpath", "-o", prog, "./e2e/testdata/prog")
	build.Dir = testenv.ModuleRoot(t)
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build prog: %v\n%s", err, out)
	}
	archive(t, e, prog, "prog", []string{"/app/prog", "--flag"})

	t.Run("hello", func(t *testing.T) {
		r := e.run(t, 0, "prog")
		if r.stdout != "prog: hello from an imported archive (args [\"--flag\"])\n" {
			t.Errorf("stdout %q", r.stdout)
		}
	})
	t.Run("killed by a signal", func(t *testing.T) {
		r := e.run(t, 137, "prog", "--env", "MODE=kill")
		if r.stdout != "prog: killing myself\n" {
			t.Errorf("stdout %q", r.stdout)
		}
	})
	t.Run("fatal init", func(t *testing.T) {
		archive(t, e, prog, "broken", []string{"/app/missing"})
		r := e.run(t, 1, "broken")
		if !strings.Contains(r.stderr, "E304") || !strings.Contains(r.stderr, "/app/missing") {
			t.Errorf("stderr lacks the coded init failure:\n%s", r.stderr)
		}
	})
}

// TestRefusals checks that bad runs are refused before anything boots, and
// leave nothing behind.
func TestRefusals(t *testing.T) {
	e := setup(t)
	e.build(t, "hello-go", "hello-go")
	var kernels []struct {
		Name string `json:"name"`
	}
	e.json(t, &kernels, "kernel", "list")
	if len(kernels) == 0 {
		t.Fatal("no kernel registered")
	}
	for _, tt := range []struct {
		args []string
		code string
	}{
		{[]string{"hello-go", "--vmm", "firecracker", "--kernel", kernels[0].Name}, "E703"},
		{[]string{"no-such-image"}, "E501"},
		{[]string{"hello-go", "--vcpus", "3"}, "E202"},
		{[]string{"hello-go", "--kernel", "/etc/hostname"}, "E701"},
		{[]string{"hello-go", "--vmm", "xen"}, "E201"},
	} {
		r := e.hyphae(t, append([]string{"run", "--json"}, tt.args...)...)
		var doc struct {
			Error struct {
				Code string `json:"code"`
			} `json:"error"`
		}
		if err := json.Unmarshal([]byte(r.stdout), &doc); err != nil || r.code != 1 || doc.Error.Code != tt.code {
			t.Errorf("run %v: exit %d, %s%s; want %s", tt.args, r.code, r.stdout, r.stderr, tt.code)
		}
		e.assertNoLeftovers(t)
	}
}

func TestCheck(t *testing.T) {
	e := setup(t)
	var rep struct {
		Checks []struct {
			Name, Status, Detail string
		} `json:"checks"`
	}
	r := e.hyphae(t, "check", "--json")
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
		t.Fatalf("check --json: %v\n%s", err, r.stdout)
	}
	got := map[string]string{}
	for _, c := range rep.Checks {
		got[c.Name] = c.Status + ": " + c.Detail
	}
	for name, want := range map[string]string{"vmm (auto)": "ok: auto picks qemu", "kernel (qemu)": "ok: default", "qemu-system-x86_64": "ok",
		"nftables": "ok: netlink works", "/dev/net/tun": "ok: opens"} {
		if !strings.HasPrefix(got[name], want) {
			t.Errorf("check %q = %q, want %q…", name, got[name], want)
		}
	}
	for _, name := range []string{"kvm", "jailer", "jail user", "cgroups", "chroot base"} {
		if _, ok := got[name]; !ok {
			t.Errorf("check has no %q entry", name)
		}
	}
}
