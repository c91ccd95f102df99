package qemu

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
	"github.com/hyphae-run/hyphae/internal/testenv"
	"github.com/hyphae-run/hyphae/kernel"
	"github.com/hyphae-run/hyphae/kernel/kerneltest"
	"github.com/hyphae-run/hyphae/vmm"
	"github.com/hyphae-run/hyphae/vmm/vmmproc"
)

// bootTimeout bounds one guest run under TCG on a busy 2-core host.
const bootTimeout = 3 * time.Minute

// image builds the one root filesystem every boot test shares:
// hyphae-init as /sbin/init and testdata/guestprog as the entrypoint,
// whose behaviour each boot picks with hyphae.env.MODE.
func image(t *testing.T) string {
	t.Helper()
	testenv.RequiresTool(t, "mkfs.ext4")
	libexec := testenv.GuestBinaries(t, "hyphae-init")
	tree := t.TempDir()
	for _, d := range []string{"sbin", "bin", "etc/hyphae", "dev", "proc", "sys", "run", "tmp"} {
		if err := os.MkdirAll(filepath.Join(tree, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	copyFile(t, filepath.Join(libexec, "hyphae-init"), filepath.Join(tree, "sbin", "init"))
	build := exec.Command("go", "build", "-trimpath", "-o", filepath.Join(tree, "bin", "guestprog"), "./testdata/guestprog")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build guestprog: %v\n%s", err, out)
	}
	ep, err := guest.EncodeEntrypoint([]string{"/bin/guestprog"})
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(tree, "etc/hyphae/entrypoint"), ep)
	writeFile(t, filepath.Join(tree, "etc/hyphae/workdir"), []byte("/\n"))
	img := filepath.Join(t.TempDir(), "root.ext4")
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-d", tree, img, "64M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	return img
}

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, 0o755); err != nil {
		t.Fatal(err)
	}
}

func writeFile(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// bootEnv is what every real-boot subtest shares.
type bootEnv struct {
	kernel, image, accel string
	// channel is how guestprog finds the channel: ChannelDevice, or
	// virtio-port:ChannelPortName on a kernel with virtio built in.
	channel string
}

// start boots the shared image with MODE=mode and registers cleanup that
// also checks nothing is left behind.
func (e bootEnv) start(t *testing.T, mode string) *Machine {
	t.Helper()
	return e.startWith(t, mode, nil)
}

// startWith is start with read-only data drives (image paths) after the
// root drive. The guest gets the device the driver says the last one is
// as $DRIVE.
func (e bootEnv) startWith(t *testing.T, mode string, dataDrive []string) *Machine {
	t.Helper()
	env := []guest.EnvVar{{Key: "MODE", Value: mode}, {Key: "CHANNEL", Value: e.channel}}
	spec := vmm.Spec{
		ID: "t-" + mode, VCPUs: 1, MemoryMiB: 256, Kernel: e.kernel,
		Drives:     []vmm.Drive{{ID: "root", Path: e.image, Root: true}},
		RuntimeDir: filepath.Join(t.TempDir(), "rt"),
	}
	for i, p := range dataDrive {
		spec.Drives = append(spec.Drives, vmm.Drive{ID: fmt.Sprintf("data%d", i), Path: p, ReadOnly: true})
	}
	if len(dataDrive) > 0 {
		dev, err := devicesFor(e.kernel, nil, slog.Default())
		if err != nil {
			t.Fatal(err)
		}
		last, _ := guestDrivePath(spec, dev, fmt.Sprintf("data%d", len(dataDrive)-1))
		env = append(env, guest.EnvVar{Key: "DRIVE", Value: last})
	}
	spec.BootArgs = guest.EncodeCmdlineEnv(env)
	m, err := New(spec, Options{Accel: e.accel})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	t0 := time.Now()
	if err := m.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: qemu ready %s after spawn", mode, time.Since(t0).Round(time.Millisecond))
	t.Cleanup(func() {
		if err := m.Cleanup(); err != nil {
			t.Errorf("Cleanup: %v", err)
		}
		assertGone(t, m)
		if err := m.Cleanup(); err != nil {
			t.Errorf("second Cleanup: %v", err)
		}
	})
	return m
}

// assertGone checks that no QEMU process and no runtime dir remain.
func assertGone(t *testing.T, m *Machine) {
	t.Helper()
	if id, ok := m.Identity(); ok && id.Alive() {
		t.Errorf("qemu pid %d still running", id.PID)
	}
	if _, err := os.Stat(m.Info().RuntimeDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("runtime dir %s still there (%v)", m.Info().RuntimeDir, err)
	}
}

// run waits for the guest to finish and returns its console and status.
func run(t *testing.T, m *Machine) (string, guest.Status) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	t0 := time.Now()
	if err := m.Wait(ctx); err != nil {
		t.Fatalf("Wait: %v\nconsole:\n%s", err, console(t, m))
	}
	t.Logf("guest ran %s after QEMU was ready", time.Since(t0).Round(time.Millisecond))
	return status(t, m)
}

func console(t *testing.T, m *Machine) string {
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

func status(t *testing.T, m *Machine) (string, guest.Status) {
	t.Helper()
	out := console(t, m)
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		if st, ok := guest.ParseStatusLine(sc.Text()); ok {
			return out, st
		}
	}
	t.Fatalf("no hyphae-init status line on the console:\n%s", out)
	return "", guest.Status{}
}

// waitConsole waits until the console shows marker.
func waitConsole(t *testing.T, m *Machine, marker string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	for !strings.Contains(console(t, m), marker) {
		select {
		case <-ctx.Done():
			t.Fatalf("console never showed %q:\n%s", marker, console(t, m))
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// TestBoot boots real guests under QEMU (TCG here), hyphae-init as PID 1
// and a test program, on two kernels: Debian's cloud kernel (NVMe drives,
// the second UART as the channel) and a Firecracker-style kernel built
// from Firecracker's CI guest config (virtio-blk drives and a
// virtio-serial channel on virtio-mmio; no NVMe, one UART).
func TestBoot(t *testing.T) {
	testenv.RequiresRoot(t)
	testenv.RequiresTool(t, DefaultBinary)
	testenv.RequiresTool(t, "qemu-img")
	img := image(t)
	t.Run("debian", func(t *testing.T) {
		testBoot(t, bootEnv{kernel: kerneltest.Path(t), image: img, accel: AccelTCG, channel: ChannelDevice})
	})
	t.Run("firecracker-config", func(t *testing.T) {
		k := kerneltest.FirecrackerPath(t)
		if d, err := devicesFor(k, nil, slog.Default()); err != nil || !d.virtioBlk || !d.virtioPort {
			t.Fatalf("devices for %s: %+v, %v; want virtio-blk and a virtio port", k, d, err)
		}
		testBoot(t, bootEnv{kernel: k, image: img, accel: AccelTCG, channel: "virtio-port:" + ChannelPortName})
	})
}

func testBoot(t *testing.T, env bootEnv) {
	imageSum := testenv.FileSHA256(t, env.image)

	for _, tt := range []struct {
		mode, output string
		code, signal int
	}{
		{"hello", "guestprog: hello from the guest", 0, 0},
		{"exit3", "guestprog: exiting with 3", 3, 0},
		{"kill", "guestprog: killing myself", 137, 9},
	} {
		t.Run("exit/"+tt.mode, func(t *testing.T) {
			m := env.start(t, tt.mode)
			out, st := run(t, m)
			if !strings.Contains(out, tt.output) {
				t.Errorf("console lacks %q:\n%s", tt.output, out)
			}
			if st.ExitCode != tt.code || st.Signal != tt.signal {
				t.Errorf("status %+v, want code=%d signal=%d", st, tt.code, tt.signal)
			}
			if info := m.Info(); info.State != vmm.StateExited {
				t.Errorf("state %s after the guest ended", info.State)
			}
		})
	}

	t.Run("writes stay out of the image", func(t *testing.T) {
		m := env.start(t, "write")
		out, st := run(t, m)
		if st.ExitCode != 0 || !strings.Contains(out, "guestprog: wrote to /") {
			t.Fatalf("status %+v, console:\n%s", st, out)
		}
		if got := testenv.FileSHA256(t, env.image); got != imageSum {
			t.Errorf("image changed: sha256 %s, was %s", got, imageSum)
		}
		ov, err := os.Stat(filepath.Join(m.Info().RuntimeDir, OverlayFile))
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("per-run writable layer after writing 1 MiB: %d KiB qcow2", ov.Size()>>10)
	})

	t.Run("drives in the order the driver names them", func(t *testing.T) {
		// Two data drives after the root: the guest must see the last one
		// where guestDrivePath says, with its id as the serial.
		blank := filepath.Join(t.TempDir(), "blank.img")
		if err := os.WriteFile(blank, make([]byte, 1<<20), 0o644); err != nil {
			t.Fatal(err)
		}
		m := env.startWith(t, "drive", []string{blank, blank})
		out, st := run(t, m)
		if st.ExitCode != 0 || !strings.Contains(out, `guestprog: drive serial "data1"`) {
			t.Errorf("status %+v, console:\n%s", st, out)
		}
	})

	t.Run("channel both ways", func(t *testing.T) {
		m := env.start(t, "channel")
		ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
		defer cancel()
		conn, err := m.DialChannel(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(bootTimeout))
		r := bufio.NewReader(conn)
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("reading the guest's greeting: %v\nconsole:\n%s", err, console(t, m))
		}
		if line != "hello-from-guest\n" {
			t.Errorf("guest said %q", line)
		}
		if _, err := conn.Write([]byte("ping 123\n")); err != nil {
			t.Fatal(err)
		}
		echo, err := r.ReadString('\n')
		if err != nil || echo != "echo:ping 123\n" {
			t.Errorf("echo %q, %v", echo, err)
		}
		out, st := run(t, m)
		if st.ExitCode != 0 || !strings.Contains(out, `host said "ping 123"`) {
			t.Errorf("status %+v, console:\n%s", st, out)
		}
	})

	t.Run("stop a long-running guest", func(t *testing.T) {
		m := env.start(t, "wait")
		waitConsole(t, m, "guestprog: waiting for a signal")
		const timeout = 20 * time.Second
		if err := m.Stop(context.Background(), timeout); err != nil {
			t.Fatal(err)
		}
		id, _ := m.Identity()
		if id.Alive() {
			t.Errorf("qemu pid %d alive after Stop", id.PID)
		}
		// Graceful means the program itself saw the request: Ctrl-Alt-Del
		// reaches hyphae-init as SIGINT, which it forwards as SIGTERM.
		out, st := status(t, m)
		if !strings.Contains(out, "guestprog: got terminated") || st.ExitCode != 0 {
			t.Errorf("program did not end on a forwarded SIGTERM: status %+v, console tail:\n%s", st, vmmproc.Tail(m.Info().ConsolePath, 300))
		}
	})
}

func TestStartFailureLeavesNothing(t *testing.T) {
	kern := fakeKernel(t)
	img := filepath.Join(t.TempDir(), "root.ext4")
	writeFile(t, img, make([]byte, 4096))
	rt := filepath.Join(t.TempDir(), "rt")
	spec := vmm.Spec{ID: "bad", VCPUs: 1, MemoryMiB: 64, Kernel: kern, RuntimeDir: rt,
		Drives: []vmm.Drive{{ID: "root", Path: img, Root: true, ReadOnly: true}}}
	// A "QEMU" that exits at once: Start must notice, report the log and
	// leave no runtime dir.
	m, err := New(spec, Options{Binary: "false", Accel: AccelTCG})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := m.Start(ctx); !errcode.HasCode(err, errcode.BootFailed) {
		t.Fatalf("Start = %v, want BootFailed", err)
	}
	if _, err := os.Stat(rt); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("runtime dir left after a failed start: %v", err)
	}
	if err := m.Stop(ctx, time.Second); !errcode.HasCode(err, errcode.VMNotRunning) {
		t.Errorf("Stop of a never-started VM = %v, want VMNotRunning", err)
	}
}

func TestNewRefuses(t *testing.T) {
	kern := fakeKernel(t)
	img := filepath.Join(t.TempDir(), "root.ext4")
	writeFile(t, img, nil)
	elfNoPVH := filepath.Join(t.TempDir(), "vmlinux")
	// An x86_64 ELF executable without a PVH note: Firecracker could boot
	// it, QEMU cannot.
	hdr := make([]byte, 64)
	copy(hdr, "\x7fELF\x02\x01\x01")
	hdr[16], hdr[18], hdr[20], hdr[52], hdr[54], hdr[58] = 2, 62, 1, 64, 56, 64
	writeFile(t, elfNoPVH, hdr)
	good := vmm.Spec{ID: "vm", VCPUs: 1, MemoryMiB: 64, Kernel: kern, Drives: []vmm.Drive{{ID: "root", Path: img, Root: true}}}
	// Configs for the fake kernel, found by its file name in a search dir.
	configFor := func(cfg string) []string {
		dir := t.TempDir()
		writeFile(t, filepath.Join(dir, kernel.ConfigFileName(kern)), []byte(cfg))
		return []string{dir}
	}
	virtioKernel := configFor("CONFIG_ACPI=y\nCONFIG_VIRTIO_MMIO=y\nCONFIG_VIRTIO_BLK=y\nCONFIG_VIRTIO_CONSOLE=y\n")
	manyDrives := func(n int) func(*vmm.Spec) {
		return func(s *vmm.Spec) {
			for i := 1; i < n; i++ {
				s.Drives = append(s.Drives, vmm.Drive{ID: fmt.Sprintf("d%d", i), Path: img, ReadOnly: true})
			}
		}
	}
	tests := []struct {
		name string
		mut  func(*vmm.Spec)
		opts Options
		code errcode.Code
	}{
		{"invalid spec", func(s *vmm.Spec) { s.VCPUs = 3 }, Options{}, errcode.InvalidSpec},
		{"bad accel", func(*vmm.Spec) {}, Options{Accel: "hvf"}, errcode.InvalidArgument},
		{"not a kernel", func(s *vmm.Spec) { s.Kernel = img }, Options{}, errcode.InvalidKernel},
		{"ELF without PVH", func(s *vmm.Spec) { s.Kernel = elfNoPVH }, Options{}, errcode.KernelUnsupported},
		{"missing drive", func(s *vmm.Spec) { s.Drives[0].Path = img + ".gone" }, Options{}, errcode.NotFound},
		{"socket path too long", func(s *vmm.Spec) { s.RuntimeDir = "/" + strings.Repeat("r", 120) }, Options{}, errcode.InvalidSpec},
		{"no disk driver in the kernel", func(*vmm.Spec) {}, Options{KernelSearch: configFor("CONFIG_SERIAL_8250=y\n")}, errcode.KernelUnsupported},
		// 24 virtio-mmio slots, one of them the channel port's.
		{"more virtio drives than slots", manyDrives(24), Options{KernelSearch: virtioKernel}, errcode.InvalidSpec},
	}
	// The most that fit is accepted.
	s := good
	s.Drives = append([]vmm.Drive(nil), good.Drives...)
	manyDrives(23)(&s)
	if _, err := New(s, Options{KernelSearch: virtioKernel}); err != nil {
		t.Errorf("23 virtio drives: %v", err)
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := good
			s.Drives = append([]vmm.Drive(nil), good.Drives...)
			tt.mut(&s)
			if _, err := New(s, tt.opts); !errcode.HasCode(err, tt.code) {
				t.Errorf("New = %v, want %s", err, tt.code)
			}
		})
	}
}

// fakeKernel writes a minimal bzImage setup header: enough for New's
// checks, not for booting.
func fakeKernel(t *testing.T) string {
	t.Helper()
	b := make([]byte, 4096)
	copy(b[0x202:], "HdrS")
	b[0x206], b[0x207] = 0x0f, 0x02
	b[0x211] = 1
	b[0x236] = 1
	p := filepath.Join(t.TempDir(), "bzImage")
	writeFile(t, p, b)
	return p
}

func TestProbeKVM(t *testing.T) {
	testenv.RequiresTool(t, DefaultBinary)
	kern := kerneltest.Path(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	t0 := time.Now()
	ok, reason := ProbeKVM(ctx, "", kern)
	t.Logf("KVM usable: %v (%s) in %s", ok, reason, time.Since(t0).Round(time.Millisecond))
	if reason == "" {
		t.Error("no reason given")
	}
	if _, err := os.Stat("/dev/kvm"); err != nil && ok {
		t.Error("KVM reported usable without /dev/kvm")
	}
	left, _ := filepath.Glob(filepath.Join(os.TempDir(), "hyphae-kvm-probe-*"))
	if len(left) > 0 {
		t.Errorf("probe left %v", left)
	}
}
