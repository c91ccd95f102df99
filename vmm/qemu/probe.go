package qemu

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/hyphae-run/hyphae/vmm/vmmproc"
)

// probeTimeout bounds ProbeKVM when ctx has no earlier deadline. A kernel
// under working KVM panics for want of a root filesystem well within it.
const probeTimeout = 8 * time.Second

// probeMarker is printed by the kernel when no root filesystem can be
// mounted — proof that it got through early boot.
const probeMarker = "Kernel panic"

// ProbeKVM reports whether QEMU can really run a guest under KVM, and why
// not. A /dev/kvm node is not trusted: on nested hosts it can exist while a
// guest kernel hangs in early boot. So the probe boots kernelPath with
// -accel kvm and no disk; a kernel that runs panics for want of a root
// filesystem, reboots (panic=-1) and QEMU exits (-no-reboot), all within a
// few seconds. The probe costs one such boot: callers should cache its
// answer for their process.
func ProbeKVM(ctx context.Context, binary, kernelPath string) (bool, string) {
	if binary == "" {
		binary = DefaultBinary
	}
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return false, "cannot open /dev/kvm: " + err.Error()
	}
	f.Close()
	ctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	dir, err := os.MkdirTemp("", "hyphae-kvm-probe-")
	if err != nil {
		return false, "probe: " + err.Error()
	}
	defer os.RemoveAll(dir)
	logPath := filepath.Join(dir, ConsoleFile)
	p, err := vmmproc.Start(vmmproc.Config{
		Binary: binary,
		Args: []string{
			"-accel", "kvm", "-cpu", "host", "-M", "microvm", "-m", "64", "-smp", "1",
			"-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio",
			"-kernel", kernelPath, "-append", "console=ttyS0 panic=-1 root=/dev/nonexistent",
		},
		LogPath: logPath,
	})
	if err != nil {
		return false, "probe: " + err.Error()
	}
	if err := p.Wait(ctx); err != nil && !p.Exited() {
		_, _ = p.Stop(context.Background(), nil, time.Second)
		return false, "a guest under KVM did not finish booting within " + probeTimeout.String() + " (nested or broken KVM); using TCG"
	}
	b, _ := os.ReadFile(logPath)
	if !strings.Contains(string(b), probeMarker) {
		// One line: the reason is shown in tables (hyphae check).
		tail := strings.Join(strings.Fields(vmmproc.Tail(logPath, 300)), " ")
		return false, "QEMU under KVM exited without the guest kernel running: " + tail
	}
	return true, "a guest kernel booted under KVM"
}
