package firecracker

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/internal/testenv"
	"github.com/hyphae-run/hyphae/kernel/kerneltest"
	"github.com/hyphae-run/hyphae/vmm"
)

// standinPath is the Firecracker stand-in, built once by TestMain.
var standinPath string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "fc-standin-")
	if err != nil {
		panic(err)
	}
	standinPath = filepath.Join(dir, "firecracker-standin")
	cmd := exec.Command("go", "build", "-o", standinPath, "./internal/standin")
	if out, err := cmd.CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		panic("building the Firecracker stand-in: " + err.Error() + "\n" + string(out))
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// testFiles makes a kernel and a root image for the stand-in, which opens
// them as Firecracker would but boots nothing.
func testSpec(t *testing.T) vmm.Spec {
	t.Helper()
	dir := t.TempDir()
	kernel := filepath.Join(dir, "vmlinux")
	root := filepath.Join(dir, "root.ext4")
	for _, p := range []string{kernel, root} {
		if err := os.WriteFile(p, []byte("not really"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	spec := baseSpec()
	spec.Kernel = kernel
	spec.Drives[0].Path = root
	spec.RuntimeDir = filepath.Join(dir, "run")
	return spec
}

// startMachine starts spec on the stand-in and makes sure the test leaves
// nothing behind.
func startMachine(t *testing.T, spec vmm.Spec, opts Options) *Machine {
	t.Helper()
	opts.Binary = standinPath
	opts.ScratchSize = 64 << 20
	m, err := New(spec, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Cleanup() })
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := m.Start(ctx); err != nil {
		t.Fatal(err)
	}
	return m
}

// assertGone checks that a cleaned-up machine left no process and no
// runtime directory.
func assertGone(t *testing.T, m *Machine) {
	t.Helper()
	info := m.Info()
	if info.PID > 0 {
		if err := syscall.Kill(info.PID, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("process %d still exists (kill 0: %v)", info.PID, err)
		}
	}
	if _, err := os.Stat(info.RuntimeDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("runtime dir %s still exists (%v)", info.RuntimeDir, err)
	}
}

func consoleText(t *testing.T, m *Machine) string {
	t.Helper()
	r, err := m.Console()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	b, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// exitSignal returns the signal that ended the process Wait reported on,
// or 0 for a clean exit.
func exitSignal(t *testing.T, m *Machine) syscall.Signal {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := m.Wait(ctx)
	if err == nil {
		return 0
	}
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		t.Fatalf("Wait: %v", err)
	}
	ws := ee.Sys().(syscall.WaitStatus)
	if !ws.Signaled() {
		t.Fatalf("process exited with status %d, not by a signal", ws.ExitStatus())
	}
	return ws.Signal()
}

func TestLifecycle(t *testing.T) {
	for _, c := range []struct {
		name       string
		configFile bool
		apiVersion string
	}{
		{"api", false, ""},
		{"config-file", true, ""},
		{"api-v1.16.1", false, "v1.16.1"},
		{"config-file-v1.16.1", true, "v1.16.1"},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Setenv("FIRECRACKER_STANDIN_SPEC", c.apiVersion)
			// The guest starts listening a little after boot, so the
			// dialer has to retry.
			t.Setenv("FIRECRACKER_STANDIN_LISTEN_DELAY", "300ms")
			spec := testSpec(t)
			// An interface and an extra drive, so that every kind of
			// body passes the stand-in's validation.
			data := filepath.Join(t.TempDir(), "data.ext4")
			if err := os.WriteFile(data, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			spec.Drives = append(spec.Drives, vmm.Drive{ID: "data", Path: data, ReadOnly: true})
			spec.Network = []vmm.NetworkInterface{{ID: "eth0", TapName: "hyt0", MAC: "06:00:c0:a8:00:02"}}
			m := startMachine(t, spec, Options{UseConfigFile: c.configFile})

			info := m.Info()
			if info.State != vmm.StateRunning || info.PID <= 0 || info.Driver != vmm.Firecracker {
				t.Fatalf("info after start: %+v", info)
			}
			if id, ok := m.Identity(); !ok || id.PID != info.PID || !id.Alive() {
				t.Errorf("identity %+v does not name the live process %d", id, info.PID)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			fi, err := m.client.Describe(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if fi.State != "Running" || fi.ID != spec.ID {
				t.Errorf("GET / = %+v", fi)
			}

			conn, err := m.DialChannel(ctx)
			if err != nil {
				t.Fatal(err)
			}
			msg := "hello through vsock\n"
			if _, err := conn.Write([]byte(msg)); err != nil {
				t.Fatal(err)
			}
			_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			got, err := bufio.NewReader(conn).ReadString('\n')
			if err != nil || got != msg {
				t.Errorf("echo: %q, %v", got, err)
			}
			conn.Close()

			if err := m.Stop(ctx, 10*time.Second); err != nil {
				t.Fatal(err)
			}
			// Exit status 0 means the stand-in left on Ctrl+Alt+Del,
			// not on a signal.
			if sig := exitSignal(t, m); sig != 0 {
				t.Errorf("stopped by %v, want a graceful exit", sig)
			}
			con := consoleText(t, m)
			for _, want := range []string{"booting " + spec.Kernel, "hyphae.overlay=/dev/vdb", "drive data: " + data, "Ctrl+Alt+Del: rebooting"} {
				if !strings.Contains(con, want) {
					t.Errorf("console lacks %q:\n%s", want, con)
				}
			}
			if got := m.Info().State; got != vmm.StateExited {
				t.Errorf("state after stop %q", got)
			}
			if err := m.Cleanup(); err != nil {
				t.Fatal(err)
			}
			if err := m.Cleanup(); err != nil {
				t.Errorf("second Cleanup: %v", err)
			}
			assertGone(t, m)
		})
	}
}

func TestStopEscalation(t *testing.T) {
	for _, c := range []struct {
		name       string
		ignoreTerm bool
		want       syscall.Signal
	}{
		{"sigterm", false, syscall.SIGTERM},
		{"sigkill", true, syscall.SIGKILL},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Setenv("FIRECRACKER_STANDIN_IGNORE_CTRLALTDEL", "1")
			if c.ignoreTerm {
				t.Setenv("FIRECRACKER_STANDIN_IGNORE_SIGTERM", "1")
			}
			m := startMachine(t, testSpec(t), Options{})
			if err := m.Stop(context.Background(), 3*time.Second); err != nil {
				t.Fatal(err)
			}
			if sig := exitSignal(t, m); sig != c.want {
				t.Errorf("ended by %v, want %v", sig, c.want)
			}
			if con := consoleText(t, m); !strings.Contains(con, "Ctrl+Alt+Del ignored") {
				t.Errorf("Ctrl+Alt+Del was not tried first:\n%s", con)
			}
			if err := m.Cleanup(); err != nil {
				t.Fatal(err)
			}
			assertGone(t, m)
		})
	}
}

func TestKill(t *testing.T) {
	t.Setenv("FIRECRACKER_STANDIN_LISTEN_DELAY", "1h")
	m := startMachine(t, testSpec(t), Options{})
	if err := m.Kill(); err != nil {
		t.Fatal(err)
	}
	if sig := exitSignal(t, m); sig != syscall.SIGKILL {
		t.Errorf("ended by %v", sig)
	}
	// The channel of a dead VM fails at once with VMNotRunning, not after
	// the whole deadline.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := m.DialChannel(ctx); !errcode.HasCode(err, errcode.VMNotRunning) {
		t.Errorf("DialChannel after Kill: %v", err)
	}
	if err := m.Kill(); err != nil {
		t.Errorf("second Kill: %v", err)
	}
	if err := m.Stop(context.Background(), time.Second); err != nil {
		t.Errorf("Stop after Kill: %v", err)
	}
	if err := m.Cleanup(); err != nil {
		t.Fatal(err)
	}
	assertGone(t, m)
}

// TestCleanupRunning: Cleanup of a live VM kills it first.
func TestCleanupRunning(t *testing.T) {
	m := startMachine(t, testSpec(t), Options{})
	if err := m.Cleanup(); err != nil {
		t.Fatal(err)
	}
	assertGone(t, m)
	if err := m.Start(context.Background()); !errcode.HasCode(err, errcode.InvalidArgument) {
		t.Errorf("Start after Cleanup: %v", err)
	}
}

func TestDialChannelDeadline(t *testing.T) {
	t.Setenv("FIRECRACKER_STANDIN_LISTEN_DELAY", "1h")
	m := startMachine(t, testSpec(t), Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if _, err := m.DialChannel(ctx); !errcode.HasCode(err, errcode.ChannelFailed) {
		t.Errorf("DialChannel to a guest that never listens: %v", err)
	}
}

func TestStaleSockets(t *testing.T) {
	spec := testSpec(t)
	if err := os.MkdirAll(spec.RuntimeDir, 0o700); err != nil {
		t.Fatal(err)
	}
	// Sockets an earlier VMM left behind: bound, then abandoned. The
	// stand-in, like Firecracker, would refuse to bind over them.
	for _, name := range []string{apiSocketName, vsockSocketName} {
		ln, err := net.Listen("unix", filepath.Join(spec.RuntimeDir, name))
		if err != nil {
			t.Fatal(err)
		}
		ln.(*net.UnixListener).SetUnlinkOnClose(false)
		ln.Close()
	}
	m := startMachine(t, spec, Options{})
	if m.Info().State != vmm.StateRunning {
		t.Fatalf("not running: %+v", m.Info())
	}
}

// TestStartFailures: a start that fails leaves no process and no runtime
// directory, and says why with a coded error.
func TestStartFailures(t *testing.T) {
	cases := []struct {
		name  string
		env   map[string]string
		edit  func(*vmm.Spec, *Options)
		code  errcode.Code
		fault string
	}{
		{"api socket too slow", map[string]string{"FIRECRACKER_STANDIN_SOCKET_DELAY": "1h"},
			func(_ *vmm.Spec, o *Options) { o.StartTimeout = 300 * time.Millisecond }, errcode.Timeout, ""},
		{"kernel missing", nil, func(s *vmm.Spec, _ *Options) { s.Kernel += ".missing" }, errcode.APIError, "Cannot open the kernel image"},
		{"root image missing", nil, func(s *vmm.Spec, _ *Options) { s.Drives[0].Path += ".missing" }, errcode.APIError, "Unable to create the block device"},
		{"config file with missing kernel", nil, func(s *vmm.Spec, o *Options) {
			s.Kernel += ".missing"
			o.UseConfigFile = true
		}, errcode.BootFailed, ""},
		{"no such binary", nil, func(_ *vmm.Spec, o *Options) { o.Binary = "/nonexistent/firecracker" }, errcode.VMMUnavailable, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			for k, v := range c.env {
				t.Setenv(k, v)
			}
			spec := testSpec(t)
			opts := Options{Binary: standinPath, ScratchSize: 64 << 20}
			c.edit(&spec, &opts)
			m, err := New(spec, opts)
			if err != nil {
				t.Fatal(err)
			}
			defer m.Cleanup()
			err = m.Start(context.Background())
			if !errcode.HasCode(err, c.code) {
				t.Fatalf("Start: %v, want code %s", err, c.code)
			}
			if c.fault != "" {
				var fe *FaultError
				if !errors.As(err, &fe) || fe.Status != 400 || !strings.Contains(fe.Fault, c.fault) {
					t.Errorf("want a 400 fault containing %q, got %v", c.fault, err)
				}
			}
			assertGone(t, m)
		})
	}
}

func TestNewRejects(t *testing.T) {
	spec := testSpec(t)
	spec.RuntimeDir = "/" + strings.Repeat("d", 100)
	if _, err := New(spec, Options{}); !errcode.HasCode(err, errcode.InvalidSpec) {
		t.Errorf("over-long socket path: %v", err)
	}
	spec = testSpec(t)
	spec.VCPUs = 0
	if _, err := New(spec, Options{}); !errcode.HasCode(err, errcode.InvalidSpec) {
		t.Errorf("bad spec: %v", err)
	}
}

// TestRealFirecracker boots a hyphae image under a real Firecracker where
// its binary and a KVM that really runs guests exist, on the
// Firecracker-style test kernel (kerneltest.FirecrackerPath): hyphae-init
// as PID 1 runs a program whose output and exit line reach the console.
func TestRealFirecracker(t *testing.T) {
	kernel := realFirecrackerKernel(t)
	dir := t.TempDir()
	spec := vmm.Spec{
		ID: "fc-real", VCPUs: 1, MemoryMiB: 128, Kernel: kernel,
		Drives:     []vmm.Drive{{ID: "rootfs", Path: realRoot(t), Root: true}},
		RuntimeDir: filepath.Join(dir, "run"),
	}
	m, err := New(spec, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Cleanup()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := m.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := m.Wait(ctx); err != nil {
		t.Logf("firecracker ended: %v", err)
	}
	checkRealConsole(t, consoleText(t, m))
	if err := m.Cleanup(); err != nil {
		t.Fatal(err)
	}
	assertGone(t, m)
}

// realFirecrackerKernel skips (optionally: these cannot exist on CI's
// hosts) unless the firecracker binary, the jailer when withJailer, and a
// KVM that runs a guest (ProbeKVM) are there, and returns the
// Firecracker-style test kernel.
func realFirecrackerKernel(t *testing.T, withJailer ...bool) string {
	t.Helper()
	need := []string{"firecracker"}
	if len(withJailer) > 0 && withJailer[0] {
		need = append(need, "jailer")
	}
	for _, bin := range need {
		if _, err := exec.LookPath(bin); err != nil {
			testenv.Optional(t, bin+" is not on PATH")
		}
	}
	if ok, reason := ProbeKVM(context.Background()); !ok {
		testenv.Optional(t, "KVM does not run guests here: "+reason)
	}
	return kerneltest.FirecrackerPath(t)
}

// realRoot builds a root filesystem with hyphae-init as /sbin/init and a
// static program that prints realGreeting as its entrypoint.
func realRoot(t *testing.T) string {
	t.Helper()
	testenv.RequiresTool(t, "mkfs.ext4")
	testenv.RequiresTool(t, "go")
	libexec := testenv.GuestBinaries(t, "hyphae-init")
	tree, src := t.TempDir(), t.TempDir()
	for _, d := range []string{"sbin", "bin", "etc/hyphae", "dev", "proc", "sys", "run", "tmp"} {
		if err := os.MkdirAll(filepath.Join(tree, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	init, err := os.ReadFile(filepath.Join(libexec, "hyphae-init"))
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{
		filepath.Join(tree, "sbin", "init"):          init,
		filepath.Join(src, "go.mod"):                 []byte("module hello\n"),
		filepath.Join(src, "main.go"):                []byte("package main\n\nimport \"fmt\"\n\nfunc main() { fmt.Println(\"" + realGreeting + "\") }\n"),
		filepath.Join(tree, "etc/hyphae/entrypoint"): []byte("/bin/hello\x00"),
		filepath.Join(tree, "etc/hyphae/workdir"):    []byte("/\n"),
	}
	for p, b := range files {
		if err := os.WriteFile(p, b, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	build := exec.Command("go", "build", "-trimpath", "-o", filepath.Join(tree, "bin", "hello"), ".")
	build.Dir = src
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	root := filepath.Join(t.TempDir(), "root.ext4")
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-d", tree, root, "64M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	// Readable by a jail user too.
	if err := os.Chmod(root, 0o644); err != nil {
		t.Fatal(err)
	}
	return root
}

// realGreeting is what realRoot's program prints.
const realGreeting = "hello from a real firecracker"

// checkRealConsole asserts that realRoot's program ran and hyphae-init
// reported its exit.
func checkRealConsole(t *testing.T, con string) {
	t.Helper()
	if !strings.Contains(con, realGreeting) || !strings.Contains(con, "hyphae-init: exit code=0") {
		t.Errorf("the program's output and exit line are not on the console:\n%s", con)
	}
}

// TestKillDuringStart: a start stuck waiting for the API can be killed
// from another goroutine, and then fails at once instead of running out
// its timeout.
func TestKillDuringStart(t *testing.T) {
	t.Setenv("FIRECRACKER_STANDIN_SOCKET_DELAY", "1h")
	m, err := New(testSpec(t), Options{Binary: standinPath, ScratchSize: 64 << 20, StartTimeout: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Cleanup()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- m.Start(ctx) }()
	for m.Info().PID == 0 {
		select {
		case err := <-done:
			t.Fatalf("Start returned before spawning: %v", err)
		case <-time.After(10 * time.Millisecond):
		}
	}
	if err := m.Kill(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; !errcode.HasCode(err, errcode.BootFailed) {
		t.Errorf("Start after Kill: %v", err)
	}
	assertGone(t, m)
}
