package kernel_test

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
	"github.com/hyphae-run/hyphae/internal/testenv"
	"github.com/hyphae-run/hyphae/kernel"
	"github.com/hyphae-run/hyphae/kernel/kerneltest"
)

// debianModules returns the test kernel and its modules tree.
func debianModules(t *testing.T) (kernelPath, modules string) {
	t.Helper()
	kernelPath = kerneltest.Path(t)
	modules, err := kernel.FindModules(kernelPath)
	if errcode.HasCode(err, errcode.ModulesNotFound) {
		testenv.Unavailable(t, "the test kernel has no modules tree (run scripts/fetch-kernel.sh): "+err.Error())
	}
	if err != nil {
		t.Fatal(err)
	}
	return kernelPath, modules
}

// TestModulesImageDebian packs the NIC drivers of the real Debian cloud
// kernel and reads the image back with debugfs.
func TestModulesImageDebian(t *testing.T) {
	testenv.RequiresTool(t, "mkfs.ext4")
	debugfs := testenv.RequiresTool(t, "debugfs")
	kernelPath, modules := debianModules(t)
	release, err := kernel.Release(kernelPath)
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Base(modules); want != release && want != kernel.ModulesDirName(release) {
		t.Errorf("release %q does not name the modules tree %s", release, modules)
	}
	out := t.TempDir()
	ctx := context.Background()
	start := time.Now()
	path, order, err := kernel.ModulesImage(ctx, modules, []string{"virtio_net", "virtio-pci"}, out)
	if err != nil {
		t.Fatal(err)
	}
	built := time.Since(start)
	before := func(a, b string) {
		t.Helper()
		ia, ib := slices.Index(order, a), slices.Index(order, b)
		if ia < 0 || ib < 0 || ia > ib {
			t.Errorf("order %q: want %s before %s", order, a, b)
		}
	}
	before("failover", "net_failover")
	before("net_failover", "virtio_net")
	before("virtio", "virtio_net")
	before("virtio_ring", "virtio_net")
	before("virtio_pci_modern_dev", "virtio_pci")
	if last := order[len(order)-1]; last != "virtio_pci" {
		t.Errorf("order %q does not end with the last requested module", order)
	}
	for i, m := range order {
		if slices.Index(order, m) != i {
			t.Errorf("order %q lists %s twice", order, m)
		}
	}

	ls, err := exec.Command(debugfs, "-R", "ls -p /", path).Output()
	if err != nil {
		t.Fatalf("debugfs ls: %v", err)
	}
	for _, m := range order {
		if !bytes.Contains(ls, []byte("/"+m+".ko/")) {
			t.Errorf("image lacks %s.ko:\n%s", m, ls)
		}
	}
	load, err := exec.Command(debugfs, "-R", "cat /"+guest.ModulesLoadFile, path).Output()
	if err != nil {
		t.Fatal(err)
	}
	if want := strings.Join(order, ".ko\n") + ".ko\n"; string(load) != want {
		t.Errorf("%s = %q, want %q", guest.ModulesLoadFile, load, want)
	}
	got, err := exec.Command(debugfs, "-R", "cat /virtio_net.ko", path).Output()
	if err != nil {
		t.Fatal(err)
	}
	src, err := os.ReadFile(filepath.Join(modules, "kernel/drivers/net/virtio_net.ko"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, src) {
		t.Error("virtio_net.ko in the image differs from the tree's")
	}

	st, _ := os.Stat(path)
	start = time.Now()
	again, order2, err := kernel.ModulesImage(ctx, modules, []string{"virtio_pci", "virtio_net"}, out)
	cached := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	if again == path {
		t.Error("requesting the modules in another order gave the same image; the load order is part of the content")
	}
	again, order3, err := kernel.ModulesImage(ctx, modules, []string{"virtio_net", "virtio_pci"}, out)
	if err != nil || again != path || !slices.Equal(order3, order) {
		t.Fatalf("same request again = %s %q, %v; want the cached %s", again, order3, err, path)
	}
	if st2, _ := os.Stat(path); !os.SameFile(st, st2) || !st2.ModTime().Equal(st.ModTime()) {
		t.Error("the cached image was rebuilt")
	}
	entries, _ := os.ReadDir(out)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".") {
			t.Errorf("work file %s left in %s", e.Name(), out)
		}
	}
	t.Logf("%d modules %q: image takes %d KiB (sparse file of %d MiB), built in %v; another order %q built in %v",
		len(order), order, du(t, path)/1024, st.Size()>>20, built.Round(time.Millisecond), order2, cached.Round(time.Millisecond))
}

// du is the disk space the file takes (it is sparse).
func du(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func TestFindModules(t *testing.T) {
	kernelPath, _ := debianModules(t)
	release, err := kernel.Release(kernelPath)
	if err != nil {
		t.Fatal(err)
	}
	// A registry stores kernels content-addressed, away from their
	// modules: a search dir holding modules-<release> is found first.
	search := t.TempDir()
	own := filepath.Join(search, kernel.ModulesDirName(release))
	if err := os.Mkdir(own, 0o755); err != nil {
		t.Fatal(err)
	}
	if got, err := kernel.FindModules(kernelPath, search); err != nil || got != own {
		t.Errorf("FindModules = %s, %v; want %s", got, err, own)
	}
	if _, err := kernel.FindModules(filepath.Join(t.TempDir(), "missing")); !errcode.HasCode(err, errcode.KernelNotFound) {
		t.Errorf("FindModules of a missing kernel: %v", err)
	}
	_, _, err = kernel.ModulesImage(context.Background(), t.TempDir(), []string{"virtio_net"}, t.TempDir())
	if !errcode.HasCode(err, errcode.ModulesNotFound) {
		t.Errorf("ModulesImage of an empty tree: %v", err)
	}
}
