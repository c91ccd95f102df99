package qemu

import (
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/kernel"
	"github.com/hyphae-run/hyphae/kernel/kerneltest"
)

func TestChooseDevices(t *testing.T) {
	// The symbols that matter in Debian's cloud kernel and in Firecracker's
	// CI guest config (scripts/kernel-config).
	debian := kernel.Config{"BLK_DEV_NVME": "y", "SERIAL_8250": "y", "SERIAL_8250_RUNTIME_UARTS": "4",
		"VIRTIO_BLK": "m", "VIRTIO_CONSOLE": "m", "VIRTIO_MMIO": "m", "VIRTIO_PCI": "m", "VIRTIO_NET": "m"}
	firecracker := kernel.Config{"ACPI": "y", "SERIAL_8250": "y", "SERIAL_8250_RUNTIME_UARTS": "1", "VIRTIO_MMIO": "y",
		"VIRTIO_BLK": "y", "VIRTIO_CONSOLE": "y", "VIRTIO_VSOCKETS": "y", "VIRTIO_PCI": "y", "VIRTIO_NET": "y"}
	with := func(c kernel.Config, kv ...string) kernel.Config {
		out := kernel.Config{}
		for k, v := range c {
			out[k] = v
		}
		for i := 0; i < len(kv); i += 2 {
			if kv[i+1] == "" {
				delete(out, kv[i])
			} else {
				out[kv[i]] = kv[i+1]
			}
		}
		return out
	}
	for _, tc := range []struct {
		name string
		c    kernel.Config
		want devices
		err  bool
	}{
		{"debian cloud", debian, stockDevices, false},
		{"firecracker ci", firecracker, devices{virtioBlk: true, virtioPort: true, vsock: true, nicBuiltin: true}, false},
		{"virtio-blk without mmio", with(debian, "VIRTIO_BLK", "y"), stockDevices, false},
		{"virtio disk, UART channel", with(debian, "ACPI", "y", "VIRTIO_MMIO", "y", "VIRTIO_BLK", "y"), devices{virtioBlk: true}, false},
		{"default UART count", with(debian, "SERIAL_8250_RUNTIME_UARTS", ""), stockDevices, false},
		{"no disk driver", with(debian, "BLK_DEV_NVME", ""), devices{}, true},
		// Without ACPI the guest cannot find microvm's virtio-mmio devices.
		{"virtio-mmio without ACPI", with(firecracker, "ACPI", ""), devices{}, true},
		{"virtio-mmio without ACPI, NVMe and 2 UARTs", with(firecracker, "ACPI", "", "BLK_DEV_NVME", "y", "SERIAL_8250_RUNTIME_UARTS", "2"),
			devices{nicBuiltin: true}, false},
		{"one UART, no virtio console", with(firecracker, "VIRTIO_CONSOLE", "m"), devices{}, true},
		{"no 8250 at all", with(debian, "SERIAL_8250", ""), devices{}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := chooseDevices(tc.c)
			if tc.err {
				if !errcode.HasCode(err, errcode.KernelUnsupported) {
					t.Errorf("err = %v, want KernelUnsupported", err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Errorf("chooseDevices = %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}

func TestDevicesFor(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	// The real Debian cloud kernel, through its config beside it.
	if d, err := devicesFor(kerneltest.Path(t), nil, log); err != nil || d != stockDevices {
		t.Errorf("Debian kernel: %+v, %v", d, err)
	}
	// No config anywhere: the stock choice.
	dir := t.TempDir()
	plain := filepath.Join(dir, "kernel")
	if err := os.WriteFile(plain, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if d, err := devicesFor(plain, nil, log); err != nil || d != stockDevices {
		t.Errorf("kernel without config: %+v, %v", d, err)
	}
	// A config that leaves the driver nothing to work with is refused.
	k := filepath.Join(dir, "vmlinux-odd")
	if err := os.WriteFile(k, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "config-odd"), []byte("CONFIG_SERIAL_8250=y\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := devicesFor(k, nil, log); !errcode.HasCode(err, errcode.KernelUnsupported) {
		t.Errorf("kernel without disk drivers: %v", err)
	}
}

func TestDeviceSummary(t *testing.T) {
	dir := t.TempDir()
	for name, cfg := range map[string]string{
		"vmlinux-virtio": "CONFIG_ACPI=y\nCONFIG_VIRTIO_MMIO=y\nCONFIG_VIRTIO_BLK=y\nCONFIG_VIRTIO_CONSOLE=y\n",
		"vmlinux-none":   "CONFIG_SERIAL_8250=y\n",
	} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "config-"+strings.TrimPrefix(name, "vmlinux-")), []byte(cfg), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	plain := filepath.Join(dir, "plain")
	if err := os.WriteFile(plain, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		kernel, want string
		code         errcode.Code
	}{
		{filepath.Join(dir, "vmlinux-virtio"), "virtio-blk drives, virtio-serial channel (config: " + filepath.Join(dir, "config-virtio") + ")", ""},
		{plain, "NVMe drives, UART channel (no kernel config found: assumed stock)", ""},
		{kerneltest.Path(t), "NVMe drives, UART channel (config: ", ""},
		{filepath.Join(dir, "vmlinux-none"), "", errcode.KernelUnsupported},
	} {
		got, err := DeviceSummary(tc.kernel, nil)
		if tc.code != "" {
			if !errcode.HasCode(err, tc.code) {
				t.Errorf("%s: %q, %v; want %s", tc.kernel, got, err, tc.code)
			}
			continue
		}
		if err != nil || !strings.HasPrefix(got, tc.want) {
			t.Errorf("%s: %q, %v; want %q", tc.kernel, got, err, tc.want)
		}
	}
}
