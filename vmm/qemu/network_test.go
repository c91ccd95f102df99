package qemu

import (
	"context"
	"encoding/binary"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
	"github.com/hyphae-run/hyphae/internal/testenv"
	"github.com/hyphae-run/hyphae/kernel"
	"github.com/hyphae-run/hyphae/kernel/kerneltest"
	"github.com/hyphae-run/hyphae/vmm"
)

func TestAddNetwork(t *testing.T) {
	testenv.RequiresTool(t, "mkfs.ext4")
	kernelPath := kerneltest.Path(t)
	if _, err := kernel.FindModules(kernelPath); err != nil {
		testenv.Unavailable(t, "the test kernel has no modules tree: "+err.Error())
	}
	nic := vmm.NetworkInterface{ID: "eth0", TapName: "hyphae-tap3", MAC: "06:00:ac:10:00:0e"}
	cache := t.TempDir()
	spec := vmm.Spec{Kernel: kernelPath, BootArgs: "quiet", Drives: []vmm.Drive{{ID: "root", Path: "/img", Root: true}}}
	if err := AddNetwork(context.Background(), &spec, nic, "ip=172.16.0.14::172.16.0.13:255.255.255.252::eth0:off", NetworkOptions{ModulesCache: cache}); err != nil {
		t.Fatal(err)
	}
	if len(spec.Drives) != 2 || spec.Drives[1].ID != ModulesDriveID || !spec.Drives[1].ReadOnly || filepath.Dir(spec.Drives[1].Path) != cache {
		t.Fatalf("drives %+v, want a read-only modules drive from the cache", spec.Drives)
	}
	if want := "quiet " + guest.CmdlineModules + "=/dev/nvme1n1 ip=172.16.0.14::"; !strings.HasPrefix(spec.BootArgs, want) {
		t.Errorf("boot args %q, want prefix %q", spec.BootArgs, want)
	}
	if len(spec.Network) != 1 || spec.Network[0] != nic {
		t.Errorf("network %+v", spec.Network)
	}
	if err := AddNetwork(context.Background(), &spec, nic, "", NetworkOptions{ModulesCache: cache}); !errcode.HasCode(err, errcode.InvalidSpec) {
		t.Errorf("second AddNetwork: %v", err)
	}
}

// A kernel without a modules tree gets the NIC and no drive.
func TestAddNetworkWithoutModules(t *testing.T) {
	b, err := os.ReadFile(kerneltest.Path(t))
	if err != nil {
		t.Fatal(err)
	}
	// The same bzImage with a release no modules tree is named after.
	ptr := int(binary.LittleEndian.Uint16(b[0x20e:]))
	copy(b[0x200+ptr:], "9.9.9-no-modules (test)\x00")
	kernelPath := filepath.Join(t.TempDir(), "vmlinuz")
	if err := os.WriteFile(kernelPath, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if rel, err := kernel.Release(kernelPath); err != nil || rel != "9.9.9-no-modules" {
		t.Fatalf("patched release %q, %v", rel, err)
	}
	spec := vmm.Spec{Kernel: kernelPath, Drives: []vmm.Drive{{ID: "root", Path: "/img", Root: true}}}
	nic := vmm.NetworkInterface{ID: "eth0", TapName: "hyphae-tap0"}
	if err := AddNetwork(context.Background(), &spec, nic, "ip=x", NetworkOptions{ModulesCache: t.TempDir(), Logger: slog.New(slog.DiscardHandler)}); err != nil {
		t.Fatal(err)
	}
	if len(spec.Drives) != 1 || spec.BootArgs != "ip=x" || len(spec.Network) != 1 {
		t.Errorf("spec %+v", spec)
	}
}
