package vm

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/internal/testenv"
	"github.com/hyphae-run/hyphae/kernel"
	"github.com/hyphae-run/hyphae/kernel/kerneltest"
	"github.com/hyphae-run/hyphae/network"
	"github.com/hyphae-run/hyphae/registry"
	"github.com/hyphae-run/hyphae/vmm"
	"github.com/hyphae-run/hyphae/vmm/firecracker"
	"github.com/hyphae-run/hyphae/vmm/vmmproc"
)

// netFixture is a runtime whose network manager works in a namespace the
// test made (never the host's), with the real Debian kernel registered, an
// image, and a QEMU stand-in that records its argv and fails at once.
type netFixture struct {
	rt    *Runtime
	reg   *registry.Registry
	rtDir string
	ns    string
	// argv is where the QEMU stand-in writes its arguments.
	argv string
}

func newNetFixture(t *testing.T, pool string) *netFixture {
	t.Helper()
	testenv.RequiresRoot(t)
	testenv.RequiresTool(t, "ip")
	testenv.RequiresTool(t, "nft")
	testenv.RequiresTool(t, "qemu-img")
	kern := kerneltest.Path(t)
	ctx := context.Background()

	f := &netFixture{rtDir: t.TempDir(), ns: fmt.Sprintf("hyvm-%d-%d", os.Getpid(), time.Now().UnixNano()%100000)}
	t.Setenv(vmmproc.EnvRuntimeDir, f.rtDir)
	if out, err := exec.Command("ip", "netns", "add", f.ns).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v\n%s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", f.ns).Run() })

	var err error
	if f.reg, err = registry.Open(ctx, t.TempDir(), nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.reg.Close() })
	mgr, err := network.New(network.Config{Pool: pool, Allocations: f.reg.NetAllocations(), NetNSPath: "/var/run/netns/" + f.ns})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mgr.Close() })

	bin := t.TempDir()
	f.argv = filepath.Join(bin, "argv")
	fake := filepath.Join(bin, "qemu-system-x86_64")
	script := "#!/bin/sh\necho \"$@\" > " + f.argv + "\necho 'qemu stand-in: refusing to run' >&2\nexit 1\n"
	if err := os.WriteFile(fake, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	f.rt = New(Options{Registry: f.reg, QEMUBinary: fake, Network: mgr})
	if _, err := f.rt.AddKernel(ctx, kern, "debian"); err != nil {
		t.Fatal(err)
	}
	// The KVM probe runs the stand-in too (and fails: TCG); its answer is
	// kept for the runtime's life, so afterwards argv only records spawns.
	if _, err := f.rt.ChooseDriver(ctx, vmm.QEMU); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(f.argv); err != nil {
		t.Fatalf("the KVM probe did not run the stand-in: %v", err)
	}
	tmp, err := os.CreateTemp(f.reg.ImagesDir(), registry.TempPrefix)
	if err != nil {
		t.Fatal(err)
	}
	tmp.Close()
	if err := f.reg.PutImage(ctx, registry.Image{Digest: digest, Name: "img", Path: tmp.Name()}); err != nil {
		t.Fatal(err)
	}
	return f
}

// assertClean checks that nothing of a VM is left: no row, runtime dir,
// lease, TAP or hyphae table.
func (f *netFixture) assertClean(t *testing.T) {
	t.Helper()
	ctx := context.Background()
	if rows, err := f.reg.ListVMs(ctx); err != nil || len(rows) != 0 {
		t.Errorf("rows left: %+v (%v)", rows, err)
	}
	if entries, _ := os.ReadDir(f.rtDir); len(entries) > 0 {
		for _, e := range entries {
			if e.IsDir() {
				t.Errorf("runtime dir left: %s", e.Name())
			}
		}
	}
	if list, err := f.reg.NetAllocations().List(ctx); err != nil || len(list) != 0 {
		t.Errorf("leases left: %+v (%v)", list, err)
	}
	links, _ := exec.Command("ip", "-n", f.ns, "-o", "link", "show").CombinedOutput()
	if strings.Contains(string(links), network.TapPrefix) {
		t.Errorf("TAP left in %s:\n%s", f.ns, links)
	}
	tables, _ := exec.Command("ip", "netns", "exec", f.ns, "nft", "list", "tables").CombinedOutput()
	if strings.Contains(string(tables), network.TableName) {
		t.Errorf("nftables table left in %s:\n%s", f.ns, tables)
	}
}

// TestStartSpawnFailsAfterNetwork: the network is set up before the VMM is
// spawned (the stand-in's argv names the TAP and the NIC's MAC, and the
// modules drive of Debian's kernel), and the failed spawn tears it down
// with everything else.
func TestStartSpawnFailsAfterNetwork(t *testing.T) {
	f := newNetFixture(t, "")
	_, err := f.rt.Start(context.Background(), RunOptions{Image: "img", VMM: vmm.QEMU, Network: true,
		Allow: []network.Allow{{Prefix: mustPrefix(t, "10.1.0.0/16"), Port: 443}}})
	if errcode.CodeOf(err) == "" {
		t.Fatalf("Start with a failing VMM = %v, want a coded error", err)
	}
	argv, rerr := os.ReadFile(f.argv)
	if rerr != nil {
		t.Fatalf("the VMM was never spawned: %v (Start: %v)", rerr, err)
	}
	for _, want := range []string{"ifname=hyphae-tap0", "mac=06:00:ac:10:00:02", "ip=172.16.0.2::172.16.0.1:255.255.255.252::eth0:off", "hyphae.modules="} {
		if !strings.Contains(string(argv), want) {
			t.Errorf("QEMU argv lacks %q:\n%s", want, argv)
		}
	}
	f.assertClean(t)
}

// TestStartSetupFailsSpawnsNothing: with the pool's only lease held by a
// start in progress (a row whose supervisor is alive), a networked start
// fails with E801, spawns nothing and leaves no row; the other VM's lease
// survives the reclaim that precedes Setup.
func TestStartSetupFailsSpawnsNothing(t *testing.T) {
	f := newNetFixture(t, "10.213.9.0/30")
	ctx := context.Background()
	putRow(t, f.reg, f.rtDir, "holder", registry.VMCreated, vmmproc.Identity{}, Details{Supervisor: f.rt.selfID})
	if _, err := f.reg.NetAllocations().Allocate(ctx, "holder", 1); err != nil {
		t.Fatal(err)
	}
	_, err := f.rt.Start(ctx, RunOptions{Image: "img", VMM: vmm.QEMU, Network: true})
	if !errcode.HasCode(err, errcode.PoolExhausted) {
		t.Fatalf("Start in an exhausted pool = %v, want E801", err)
	}
	if _, err := os.Stat(f.argv); err == nil {
		t.Error("the VMM was spawned although the network setup failed")
	}
	rows, _ := f.reg.ListVMs(ctx)
	if len(rows) != 1 || rows[0].ID != "holder" {
		t.Errorf("rows = %+v, want only the holder", rows)
	}
	if list, _ := f.reg.NetAllocations().List(ctx); len(list) != 1 || list[0].VMID != "holder" {
		t.Errorf("leases = %+v, want only the holder's", list)
	}
	// Once the holder's start is gone, Reconcile frees its lease too.
	if err := f.reg.DeleteVM(ctx, "holder"); err != nil {
		t.Fatal(err)
	}
	if _, err := f.rt.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	f.assertClean(t)
}

func mustPrefix(t *testing.T, s string) netip.Prefix {
	t.Helper()
	a, err := network.ParseAllow(s)
	if err != nil {
		t.Fatal(err)
	}
	return a.Prefix
}

// fakeNetwork records teardowns and releases the lease like the real one.
type fakeNetwork struct {
	reg      *registry.Registry
	tornDown []string
}

func (n *fakeNetwork) Setup(context.Context, string, network.Options) (*network.Attachment, error) {
	return nil, errcode.New(errcode.NetlinkFailed, "fake network sets nothing up")
}

func (n *fakeNetwork) Teardown(ctx context.Context, id string) error {
	n.tornDown = append(n.tornDown, id)
	return n.reg.NetAllocations().Release(ctx, id)
}

func (n *fakeNetwork) Reclaim(context.Context, func(string) bool) error { return nil }

// TestReconcileTearsDownNetworks: leases of removed rows and of VMs with no
// row go; those of a live VM and of a start in progress stay; VMs without
// a lease never reach the network backend.
func TestReconcileTearsDownNetworks(t *testing.T) {
	_, reg, rtDir := newRuntime(t)
	n := &fakeNetwork{reg: reg}
	rt := New(Options{Registry: reg, Network: n})
	ctx := context.Background()
	dead := vmmproc.Identity{PID: 0x3fffff0, Binary: "nobody"}
	live := startSleep(t)
	putRow(t, reg, rtDir, "gone", registry.VMRunning, dead, Details{})
	putRow(t, reg, rtDir, "plain", registry.VMRunning, dead, Details{})
	putRow(t, reg, rtDir, "alive", registry.VMRunning, live, Details{})
	putRow(t, reg, rtDir, "starting", registry.VMCreated, vmmproc.Identity{}, Details{Supervisor: rt.selfID})
	for _, id := range []string{"gone", "alive", "starting", "rowless"} {
		if _, err := reg.NetAllocations().Allocate(ctx, id, 16); err != nil {
			t.Fatal(err)
		}
	}
	rep, err := rt.Reconcile(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Removed) != 2 {
		t.Errorf("removed %v, want gone and plain", rep.Removed)
	}
	got := strings.Join(n.tornDown, ",")
	if got != "gone,rowless" && got != "rowless,gone" {
		t.Errorf("torn down %q, want gone and rowless only", got)
	}
	list, _ := reg.NetAllocations().List(ctx)
	kept := map[string]bool{}
	for _, a := range list {
		kept[a.VMID] = true
	}
	if len(kept) != 2 || !kept["alive"] || !kept["starting"] {
		t.Errorf("leases kept %v, want alive and starting", kept)
	}
}

// fakeBzImage writes dir/vmlinuz-<release>: a bzImage header that
// kernel.Inspect accepts and kernel.Release reads, and nothing else.
func fakeBzImage(t *testing.T, dir, release string) string {
	t.Helper()
	kern := filepath.Join(dir, "vmlinuz-"+release)
	b := make([]byte, 0x400)
	copy(b[0x202:], "HdrS")
	b[0x206], b[0x207] = 0x0f, 0x02
	b[0x211] = 0x01
	b[0x236] = 0x01
	binary.LittleEndian.PutUint16(b[0x20e:], 0x100) // kernel_version at 0x200+0x100
	copy(b[0x300:], release+" (builder@host) #1 SMP\x00")
	if err := os.WriteFile(kern, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return kern
}

// TestAddKernelKeepsConfig: the config beside an added kernel is kept
// where the qemu driver finds it for the stored copy, which lives under a
// content name away from it.
func TestAddKernelKeepsConfig(t *testing.T) {
	rt, _, _ := newRuntime(t)
	ctx := context.Background()
	const release = "6.1.0-98-test-amd64"
	src := t.TempDir()
	kern := fakeBzImage(t, src, release)
	cfg := "CONFIG_VIRTIO_MMIO=y\nCONFIG_VIRTIO_BLK=y\n"
	if err := os.WriteFile(filepath.Join(src, "config-"+release), []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	k, err := rt.AddKernel(ctx, kern, "")
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := kernel.FindConfig(k.Path); !errcode.HasCode(err, errcode.ConfigNotFound) {
		t.Fatalf("the stored copy alone: %v, want ConfigNotFound (else this test proves nothing)", err)
	}
	c, from, err := kernel.FindConfig(k.Path, rt.kernelSearch(k.Path)...)
	if err != nil || !c.Builtin("VIRTIO_BLK") || filepath.Dir(from.Path) != rt.kernelConfigsDir() {
		t.Errorf("FindConfig of the stored kernel = %v from %s, %v", c, from, err)
	}
	// A kernel without any config adds fine and records none.
	plain := fakeBzImage(t, t.TempDir(), "6.1.0-97-test-amd64")
	if k, err = rt.AddKernel(ctx, plain, ""); err != nil {
		t.Fatal(err)
	}
	if _, _, err := kernel.FindConfig(k.Path, rt.kernelSearch(k.Path)...); !errcode.HasCode(err, errcode.ConfigNotFound) {
		t.Errorf("kernel without config: %v", err)
	}
}

// TestAddKernelRecordsModules: a bzImage added from a directory holding
// its modules-<release> tree gets the tree recorded, and networked QEMU
// runs search the tree's directory; a kernel without a tree records none.
func TestAddKernelRecordsModules(t *testing.T) {
	rt, reg, _ := newRuntime(t)
	ctx := context.Background()
	const release = "6.1.0-99-test-amd64"
	src := t.TempDir()
	kern := fakeBzImage(t, src, release)
	if err := os.Symlink(filepath.Base(kern), filepath.Join(src, kernel.CurrentLink)); err != nil {
		t.Fatal(err)
	}
	k, err := rt.AddKernel(ctx, filepath.Join(src, kernel.CurrentLink), "")
	if err != nil {
		t.Fatal(err)
	}
	if got := rt.modulesSearch(k.Path); len(got) != 0 {
		t.Errorf("modules search without a tree = %v", got)
	}
	if err := os.MkdirAll(filepath.Join(src, kernel.ModulesDirName(release), "kernel"), 0o755); err != nil {
		t.Fatal(err)
	}
	if k, err = rt.AddKernel(ctx, filepath.Join(src, kernel.CurrentLink), ""); err != nil {
		t.Fatal(err)
	}
	if got := rt.modulesSearch(k.Path); len(got) != 1 || got[0] != src {
		t.Errorf("modules search = %v, want [%s]", got, src)
	}
	if filepath.Dir(k.Path) != reg.KernelsDir() {
		t.Errorf("kernel stored at %s", k.Path)
	}
	// GC keeps the recorded tree: it lives in a directory.
	if _, err := reg.GC(ctx); err != nil {
		t.Fatal(err)
	}
	if got := rt.modulesSearch(k.Path); len(got) != 1 {
		t.Errorf("after gc: modules search = %v", got)
	}
}

// TestJailedVMStopAndCleanup: stopping a jailed Firecracker VM started by
// another process sends Ctrl-Alt-Del to the API socket inside its jail and
// removes the jail; Reconcile removes the jail of an orphaned runtime
// directory. A stand-in API server plays Firecracker (the jailer cannot
// run here); a `sleep` plays its process.
func TestJailedVMStopAndCleanup(t *testing.T) {
	rt, reg, rtDir := newRuntime(t)
	ctx := context.Background()
	fcBin, err := exec.LookPath("true") // any binary: the jail is named after it
	if err != nil {
		t.Skip("no `true` binary")
	}
	jail := &JailDetails{ChrootBaseDir: t.TempDir(), CgroupVersion: 2, UID: 4242, GID: 4242, Firecracker: fcBin}
	vmmID := startSleep(t)

	const id = "jailed1"
	sock, err := firecracker.JailAPISocket(jail.options(), fcBin, id)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Dir(sock), 0o755); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var mu sync.Mutex
	var calls []string
	go http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		calls = append(calls, r.Method+" "+r.URL.Path+" "+string(b))
		mu.Unlock()
		// The guest reacts to Ctrl-Alt-Del by ending, and Firecracker
		// with it.
		_ = syscall.Kill(vmmID.PID, syscall.SIGKILL)
		w.WriteHeader(http.StatusNoContent)
	}))

	putRow(t, reg, rtDir, id, registry.VMRunning, vmmID, Details{Jail: jail, Detached: true})
	if err := reg.UpdateVM(ctx, id, func(r *registry.VM) error { r.Driver = vmm.Firecracker; return nil }); err != nil {
		t.Fatal(err)
	}
	res, err := rt.Stop(ctx, id, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	got := strings.Join(calls, "\n")
	mu.Unlock()
	if res.Method != string(vmmproc.StoppedGraceful) || !strings.Contains(got, "PUT /actions") || !strings.Contains(got, "SendCtrlAltDel") {
		t.Errorf("stop = %+v, API calls %q; want a graceful stop through the jail's socket", res, got)
	}
	instance := filepath.Join(jail.ChrootBaseDir, filepath.Base(mustReal(t, fcBin)))
	if _, err := os.Stat(filepath.Join(instance, id)); !os.IsNotExist(err) {
		t.Errorf("jail of the stopped VM still there: %v", err)
	}

	// An orphaned runtime dir whose owner file names a jail.
	const orphan = "jailed2"
	dir := filepath.Join(rtDir, orphan)
	if err := vmmproc.PrepareDir(dir); err != nil {
		t.Fatal(err)
	}
	if err := writeOwner(dir, owner{Home: reg.Home(), ID: orphan, Jail: jail}); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(instance, orphan, "root"), 0o700); err != nil {
		t.Fatal(err)
	}
	rep, err := rt.Reconcile(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Orphans) != 1 {
		t.Errorf("orphans = %v", rep.Orphans)
	}
	if _, err := os.Stat(filepath.Join(instance, orphan)); !os.IsNotExist(err) {
		t.Errorf("jail of the orphan still there: %v", err)
	}
}

func mustReal(t *testing.T, p string) string {
	t.Helper()
	r, err := filepath.EvalSymlinks(p)
	if err != nil {
		t.Fatal(err)
	}
	return r
}
