package vm

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
	"github.com/hyphae-run/hyphae/registry"
	"github.com/hyphae-run/hyphae/vmm"
	"github.com/hyphae-run/hyphae/vmm/vmmproc"
)

// newRuntime opens a registry in a temp home with a temp runtime dir.
func newRuntime(t *testing.T) (*Runtime, *registry.Registry, string) {
	t.Helper()
	rtDir := t.TempDir()
	t.Setenv(vmmproc.EnvRuntimeDir, rtDir)
	reg, err := registry.Open(context.Background(), t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	return New(Options{Registry: reg}), reg, rtDir
}

// startSleep starts a `sleep` the test owns and returns its identity.
func startSleep(t *testing.T) vmmproc.Identity {
	t.Helper()
	cmd := exec.Command("sleep", "300")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	ticks, err := vmmproc.StartTicks(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	return vmmproc.Identity{PID: cmd.Process.Pid, StartTicks: ticks, Binary: "sleep"}
}

const digest = "sha256:0000000000000000000000000000000000000000000000000000000000000001"

// putRow records a VM row with a runtime dir carrying this registry's
// owner file, as Start does.
func putRow(t *testing.T, reg *registry.Registry, rtDir, id, state string, vmmID vmmproc.Identity, d Details) string {
	t.Helper()
	dir := filepath.Join(rtDir, id)
	if err := vmmproc.PrepareDir(dir); err != nil {
		t.Fatal(err)
	}
	if err := writeOwner(dir, owner{Home: reg.Home(), ID: id, VMM: vmmID}); err != nil {
		t.Fatal(err)
	}
	d.Binary = vmmID.Binary
	b, _ := json.Marshal(d)
	err := reg.PutVM(context.Background(), registry.VM{ID: id, ImageDigest: digest, Driver: vmm.QEMU, PID: vmmID.PID,
		ProcStartTicks: vmmID.StartTicks, State: state, RuntimeDir: dir, ConsolePath: filepath.Join(dir, "console.log"), Spec: b})
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

// TestReconcileNeverKillsStrangers records VMs whose PIDs belong to a live
// `sleep` under identities that do not match it (wrong start time, another
// binary). Reconcile must clean the rows and directories and leave the
// sleep alone; a row and an orphan whose identity does match are kept and
// killed respectively.
func TestReconcileNeverKillsStrangers(t *testing.T) {
	rt, reg, rtDir := newRuntime(t)
	ctx := context.Background()
	stranger := startSleep(t)
	dead := vmmproc.Identity{PID: 0x3fffff0, Binary: "nobody"}

	wrongTicks := stranger
	wrongTicks.StartTicks++
	wrongBinary := stranger
	wrongBinary.Binary = "qemu-system-x86_64"
	gone := []string{
		putRow(t, reg, rtDir, "wrongticks", registry.VMRunning, wrongTicks, Details{}),
		putRow(t, reg, rtDir, "wrongbin", registry.VMRunning, wrongBinary, Details{}),
		// A start whose hyphae died before it recorded the VMM.
		putRow(t, reg, rtDir, "deadstart", registry.VMCreated, vmmproc.Identity{}, Details{Supervisor: dead}),
	}
	// A start in progress: its supervisor (this test) is alive.
	inProgress := putRow(t, reg, rtDir, "starting", registry.VMCreated, vmmproc.Identity{}, Details{Supervisor: rt.selfID})
	// A running VM whose identity matches a live process is kept.
	ours := startSleep(t)
	kept := putRow(t, reg, rtDir, "running", registry.VMRunning, ours, Details{})

	// Orphans: directories no row owns.
	orphanStranger := filepath.Join(rtDir, "orphan1")
	if err := vmmproc.PrepareDir(orphanStranger); err != nil {
		t.Fatal(err)
	}
	if err := writeOwner(orphanStranger, owner{Home: reg.Home(), ID: "orphan1", VMM: wrongTicks}); err != nil {
		t.Fatal(err)
	}
	orphanVMM := startSleep(t)
	orphanOurs := filepath.Join(rtDir, "orphan2")
	if err := vmmproc.PrepareDir(orphanOurs); err != nil {
		t.Fatal(err)
	}
	if err := writeOwner(orphanOurs, owner{Home: reg.Home(), ID: "orphan2", VMM: orphanVMM}); err != nil {
		t.Fatal(err)
	}
	foreign := filepath.Join(rtDir, "foreign")
	if err := vmmproc.PrepareDir(foreign); err != nil {
		t.Fatal(err)
	}
	if err := writeOwner(foreign, owner{Home: "/another/home", ID: "foreign", VMM: orphanVMM}); err != nil {
		t.Fatal(err)
	}
	unmarked := filepath.Join(rtDir, "unmarked")
	if err := os.Mkdir(unmarked, 0o700); err != nil {
		t.Fatal(err)
	}

	rep, err := rt.Reconcile(ctx)
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(rep.Removed)
	if want := []string{"deadstart", "wrongbin", "wrongticks"}; !slices.Equal(rep.Removed, want) {
		t.Errorf("removed %v, want %v", rep.Removed, want)
	}
	if !stranger.Alive() {
		t.Fatal("reconcile killed a process that only shares a PID with a recorded VMM")
	}
	if !ours.Alive() {
		t.Error("reconcile killed the VMM of a running row")
	}
	if !slices.Equal(rep.Killed, []int{orphanVMM.PID}) {
		t.Errorf("killed %v, want only the orphan's verified VMM %d", rep.Killed, orphanVMM.PID)
	}
	for _, d := range append(gone, orphanStranger, orphanOurs) {
		if _, err := os.Stat(d); !os.IsNotExist(err) {
			t.Errorf("%s still there (%v)", d, err)
		}
	}
	for _, d := range []string{inProgress, kept, foreign, unmarked} {
		if _, err := os.Stat(d); err != nil {
			t.Errorf("%s was removed: %v", d, err)
		}
	}
	rows, err := reg.ListVMs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, r := range rows {
		ids = append(ids, r.ID)
	}
	slices.Sort(ids)
	if want := []string{"running", "starting"}; !slices.Equal(ids, want) {
		t.Errorf("rows left %v, want %v", ids, want)
	}
}

// TestStopDeadVM stops a VM whose VMM is already gone: the row and runtime
// dir go, nothing is signalled.
func TestStopDeadVM(t *testing.T) {
	rt, reg, rtDir := newRuntime(t)
	stranger := startSleep(t)
	wrong := stranger
	wrong.StartTicks++
	// "created" with a live supervisor survives Reconcile, so Stop itself
	// meets the dead identity.
	dir := putRow(t, reg, rtDir, "abc123", registry.VMCreated, wrong, Details{Supervisor: rt.selfID})
	res, err := rt.Stop(context.Background(), "abc", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if res.ID != "abc123" || res.Method != string(vmmproc.StoppedAlready) {
		t.Errorf("stop = %+v", res)
	}
	if !stranger.Alive() {
		t.Fatal("Stop signalled a process that only shares a PID with the VM")
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("runtime dir still there: %v", err)
	}
	if _, err := rt.Get(context.Background(), "abc123"); !errcode.HasCode(err, errcode.VMNotFound) {
		t.Errorf("Get after stop = %v, want VMNotFound", err)
	}
}

// bzImage writes the smallest file kernel.Inspect takes for an x86_64
// bzImage.
func bzImage(t *testing.T) string {
	b := make([]byte, 0x268)
	copy(b[0x202:], "HdrS")
	b[0x206], b[0x207] = 0x0f, 0x02 // boot protocol 2.15
	b[0x211] = 0x01                 // LOADED_HIGH
	b[0x236] = 0x01                 // XLF_KERNEL_64
	p := filepath.Join(t.TempDir(), "bzImage")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestKernels(t *testing.T) {
	rt, reg, _ := newRuntime(t)
	ctx := context.Background()
	bz := bzImage(t)
	// Any x86_64 ELF executable passes as a vmlinux without a PVH note:
	// Firecracker only.
	elfKernel, err := exec.LookPath("true")
	if err != nil {
		t.Skip("no `true` binary")
	}

	if _, err := rt.DefaultKernel(ctx, vmm.QEMU); !errcode.HasCode(err, errcode.KernelNotFound) || errcode.HintOf(err) == "" {
		t.Errorf("default with no kernels = %v, want KernelNotFound with a hint", err)
	}
	qk, err := rt.AddKernel(ctx, bz, "bz")
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(qk.VMMs, []string{vmm.QEMU}) || !slices.Equal(qk.DefaultFor, []string{vmm.QEMU}) || filepath.Dir(qk.Path) != reg.KernelsDir() {
		t.Errorf("added %+v", qk)
	}
	fk, err := rt.AddKernel(ctx, elfKernel, "fc")
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(fk.DefaultFor, []string{vmm.Firecracker}) {
		t.Errorf("fc default for %v", fk.DefaultFor)
	}
	// A newer QEMU kernel becomes QEMU's default.
	time.Sleep(time.Millisecond)
	if _, err := rt.AddKernel(ctx, bz, "bz2"); err != nil {
		t.Fatal(err)
	}
	if k, err := rt.DefaultKernel(ctx, vmm.QEMU); err != nil || k.Name != "bz2" {
		t.Errorf("qemu default = %s, %v; want bz2", k.Name, err)
	}

	for _, tt := range []struct {
		ref, driver string
		code        errcode.Code
		name        string
	}{
		{"", vmm.QEMU, "", "bz2"},
		{"", vmm.Firecracker, "", "fc"},
		{"bz", vmm.QEMU, "", "bz"},
		{bz, vmm.QEMU, "", bz},
		{"bz", vmm.Firecracker, errcode.KernelUnsupported, ""},
		{bz, vmm.Firecracker, errcode.KernelUnsupported, ""},
		{"fc", vmm.QEMU, errcode.KernelUnsupported, ""},
		{"nope", vmm.QEMU, errcode.KernelNotFound, ""},
		{"/etc/hostname", vmm.QEMU, errcode.InvalidKernel, ""},
	} {
		got, err := rt.ResolveKernel(ctx, tt.ref, tt.driver)
		if tt.code != "" {
			if !errcode.HasCode(err, tt.code) {
				t.Errorf("ResolveKernel(%q, %s) = %v, want %s", tt.ref, tt.driver, err, tt.code)
			}
			continue
		}
		if err != nil || got.Name != tt.name {
			t.Errorf("ResolveKernel(%q, %s) = %q, %v; want %q", tt.ref, tt.driver, got.Name, err, tt.name)
		}
	}

	if _, err := rt.AddKernel(ctx, "/etc/hostname", "text"); !errcode.HasCode(err, errcode.InvalidKernel) {
		t.Errorf("adding a text file = %v, want InvalidKernel", err)
	}
	if _, err := rt.AddKernel(ctx, bz, "bad name!"); !errcode.HasCode(err, errcode.InvalidName) {
		t.Errorf("bad name = %v, want InvalidName", err)
	}
	if err := rt.RemoveKernel(ctx, "nope"); !errcode.HasCode(err, errcode.KernelNotFound) {
		t.Errorf("removing a missing kernel = %v", err)
	}
	for _, n := range []string{"bz", "bz2", "fc"} {
		if err := rt.RemoveKernel(ctx, n); err != nil {
			t.Fatal(err)
		}
	}
	left, _ := os.ReadDir(reg.KernelsDir())
	if len(left) != 0 {
		t.Errorf("kernels dir not empty after removing every kernel: %v", left)
	}
}

func TestChooseDriverRefusals(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	rt, _, _ := newRuntime(t)
	ctx := context.Background()
	if _, err := rt.ChooseDriver(ctx, "xen"); !errcode.HasCode(err, errcode.InvalidArgument) {
		t.Errorf("unknown vmm = %v", err)
	}
	for _, want := range []string{Auto, vmm.QEMU, vmm.Firecracker} {
		if _, err := rt.ChooseDriver(ctx, want); !errcode.HasCode(err, errcode.VMMUnavailable) || errcode.HintOf(err) == "" {
			t.Errorf("ChooseDriver(%s) without VMMs = %v, want VMMUnavailable with a hint", want, err)
		}
	}
}

func TestBootArgs(t *testing.T) {
	o := RunOptions{BootArgs: "loglevel=7"}
	if got := bootArgs(o); got != "quiet loglevel=7" {
		t.Errorf("bootArgs = %q", got)
	}
	o.Env = []guest.EnvVar{{Key: "GREETING", Value: "hi there"}}
	if got := bootArgs(o); got != "quiet hyphae.env.GREETING=hi%20there loglevel=7" {
		t.Errorf("bootArgs = %q", got)
	}
}
