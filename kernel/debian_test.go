package kernel_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hyphae-run/hyphae/internal/testenv"
	"github.com/hyphae-run/hyphae/kernel"
	"github.com/hyphae-run/hyphae/kernel/kerneltest"
	"github.com/hyphae-run/hyphae/vmm"
)

// TestFetchDebian runs the recipe CI uses to get its kernel, for real.
func TestFetchDebian(t *testing.T) {
	if testing.Short() {
		t.Skip("downloads a kernel package (-short)")
	}
	testenv.RequiresRoot(t)
	testenv.RequiresTool(t, "apt-get")
	testenv.RequiresTool(t, "dpkg")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	dir := t.TempDir()
	path, err := kernel.FetchDebian(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	info, err := kernel.Inspect(path)
	if err != nil {
		t.Fatal(err)
	}
	if info.Format != kernel.FormatBzImage || info.Arch != kernel.ArchX86_64 {
		t.Errorf("Debian cloud kernel inspected as %+v, want an x86_64 bzImage", info)
	}
	if err := kernel.CheckBootable(info, vmm.QEMU); err != nil {
		t.Error(err)
	}
	if err := kernel.CheckBootable(info, vmm.Firecracker); err == nil {
		t.Error("Firecracker accepted a bzImage")
	}
	if target, err := os.Readlink(filepath.Join(dir, kernel.CurrentLink)); err != nil || target != filepath.Base(path) {
		t.Errorf("%s link = %q, %v", kernel.CurrentLink, target, err)
	}
	version := strings.TrimPrefix(filepath.Base(path), "vmlinuz-")
	modules := filepath.Join(dir, kernel.ModulesDirName(version))
	if target, err := os.Readlink(filepath.Join(dir, kernel.ModulesLink)); err != nil || target != filepath.Base(modules) {
		t.Errorf("%s link = %q, %v", kernel.ModulesLink, target, err)
	}
	if _, err := os.Stat(filepath.Join(modules, "kernel", "drivers", "net", "virtio_net.ko")); err != nil {
		t.Errorf("modules tree lacks virtio_net: %v", err)
	}
	st, _ := os.Stat(path)
	mst, _ := os.Stat(modules)
	again, err := kernel.FetchDebian(ctx, dir)
	if err != nil || again != path {
		t.Fatalf("second FetchDebian = %s, %v", again, err)
	}
	if st2, _ := os.Stat(path); !st2.ModTime().Equal(st.ModTime()) {
		t.Error("second FetchDebian replaced the cached kernel")
	}
	if mst2, _ := os.Stat(modules); !os.SameFile(mst, mst2) {
		t.Error("second FetchDebian replaced the cached modules")
	}
	// A cache from before modules were kept gets them, and keeps its kernel.
	if err := os.RemoveAll(modules); err != nil {
		t.Fatal(err)
	}
	if again, err := kernel.FetchDebian(ctx, dir); err != nil || again != path {
		t.Fatalf("FetchDebian without modules = %s, %v", again, err)
	}
	if _, err := os.Stat(filepath.Join(modules, "modules.order")); err != nil {
		t.Errorf("modules not fetched again: %v", err)
	}
	if st2, _ := os.Stat(path); !os.SameFile(st, st2) {
		t.Error("fetching the modules replaced the cached kernel")
	}
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if e.Name()[0] == '.' {
			t.Errorf("work file %s left behind", e.Name())
		}
	}
}

// TestInspectTestKernel checks the kernel the real-boot tests use.
func TestInspectTestKernel(t *testing.T) {
	info, err := kernel.Inspect(kerneltest.Path(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := kernel.CheckBootable(info, vmm.QEMU); err != nil {
		t.Errorf("QEMU cannot boot the test kernel: %v", err)
	}
	t.Logf("test kernel: %+v", info)
}
