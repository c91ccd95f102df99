package qemu

import (
	"fmt"
	"log/slog"
	"strconv"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/kernel"
	"github.com/hyphae-run/hyphae/vmm"
)

// devices is how a guest kernel gets its drives and the host↔guest
// channel. Virtio devices on microvm's virtio-mmio transport are used when
// the kernel has them built in (Firecracker-style kernels, which have
// neither NVMe nor a second UART); otherwise the NVMe controllers and the
// second 8250 UART that Debian's stock cloud kernel has built in (its
// virtio drivers are modules, and hyphae boots without an initramfs).
//
// The guest finds microvm's virtio-mmio devices through ACPI: with ACPI
// on (microvm's default, and needed for its PCIe bus) QEMU does not put
// virtio_mmio.device= on the command line. So virtio-mmio counts only in
// a kernel with CONFIG_ACPI.
type devices struct {
	// virtioBlk puts the drives on virtio-blk-device (/dev/vda, vdb, …)
	// instead of NVMe controllers.
	virtioBlk bool
	// virtioPort makes the channel a virtio-serial port named
	// ChannelPortName instead of the second UART.
	virtioPort bool
	// vsock: the kernel has virtio vsock and virtio-mmio built in, so the
	// vhost-vsock device (added where the host has /dev/vhost-vsock and
	// the spec names a CID) goes on virtio-mmio rather than PCI.
	vsock bool
	// nicBuiltin: the kernel has the NIC's drivers (NetworkModules) built
	// in, so AddNetwork needs no modules drive.
	nicBuiltin bool
}

// stockDevices is the choice for a kernel whose configuration is unknown:
// what Debian's cloud kernel (the qemu driver's reference kernel) has.
var stockDevices = devices{}

// chooseDevices picks the devices for a kernel with configuration c. A
// kernel that can be given neither kind of disk or neither kind of
// channel is refused with errcode.KernelUnsupported.
func chooseDevices(c kernel.Config) (devices, error) {
	mmio := c.Builtin("VIRTIO_MMIO") && c.Builtin("ACPI")
	d := devices{
		virtioBlk:  mmio && c.Builtin("VIRTIO_BLK"),
		virtioPort: mmio && c.Builtin("VIRTIO_CONSOLE"),
		vsock:      mmio && c.Builtin("VIRTIO_VSOCKETS"),
		nicBuiltin: c.Builtin("VIRTIO_PCI") && c.Builtin("VIRTIO_NET"),
	}
	if !d.virtioBlk && !c.Builtin("BLK_DEV_NVME") {
		return devices{}, errcode.New(errcode.KernelUnsupported, "the kernel has neither virtio-blk over virtio-mmio (with ACPI) nor NVMe built in: the qemu driver cannot give it a root drive").
			WithHint("build the kernel with CONFIG_ACPI=y, CONFIG_VIRTIO_MMIO=y and CONFIG_VIRTIO_BLK=y, or CONFIG_BLK_DEV_NVME=y")
	}
	if !d.virtioPort && (!c.Builtin("SERIAL_8250") || runtimeUARTs(c) < 2) {
		return devices{}, errcode.New(errcode.KernelUnsupported, "the kernel has neither virtio-console over virtio-mmio (with ACPI) nor a second 8250 UART built in: the qemu driver cannot give it a host channel").
			WithHint("build the kernel with CONFIG_ACPI=y, CONFIG_VIRTIO_MMIO=y and CONFIG_VIRTIO_CONSOLE=y, or CONFIG_SERIAL_8250=y with CONFIG_SERIAL_8250_RUNTIME_UARTS ≥ 2")
	}
	return d, nil
}

// runtimeUARTs is how many 8250 ports the kernel registers at boot: the
// ISA ports at 0x3f8 (ttyS0, the console) and 0x2f8 (ttyS1, the channel)
// exist in the guest only when this is at least 2. The kernel's default
// is 4.
func runtimeUARTs(c kernel.Config) int {
	v, ok := c["SERIAL_8250_RUNTIME_UARTS"]
	if !ok {
		return 4
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		return 0
	}
	return n
}

// devicesFor finds the configuration of the kernel at kernelPath (see
// kernel.FindConfig; search are extra directories holding config-<release>
// files) and chooses its devices. A kernel without a findable
// configuration gets stockDevices.
func devicesFor(kernelPath string, search []string, log *slog.Logger) (devices, error) {
	c, from, err := kernel.FindConfig(kernelPath, search...)
	switch {
	case errcode.HasCode(err, errcode.ConfigNotFound):
		log.Warn("no kernel config found; assuming a stock kernel (NVMe drives, the second UART as the channel)", "kernel", kernelPath, "err", err)
		return stockDevices, nil
	case err != nil:
		return devices{}, err
	}
	d, err := chooseDevices(c)
	if err != nil {
		return devices{}, fmt.Errorf("kernel %s (config %s): %w", kernelPath, from, err)
	}
	log.Debug("guest devices", "kernel", kernelPath, "config", from, "virtio_blk", d.virtioBlk, "virtio_port", d.virtioPort)
	return d, nil
}

// microvmVirtioSlots is how many virtio-mmio transports QEMU's microvm
// machine has (seen here: the 25th virtio device finds no virtio-bus).
const microvmVirtioSlots = 24

// virtioDriveSlots is how many virtio drives fit next to the other
// virtio-mmio devices of a VM with spec: the channel port and a
// vhost-vsock device take a slot each.
func (d devices) virtioDriveSlots(spec vmm.Spec) int {
	n := microvmVirtioSlots
	if d.virtioPort {
		n--
	}
	if d.vsock && spec.VsockCID != 0 {
		n--
	}
	return n
}

// DeviceSummary says, for people, which devices the driver gives the
// kernel at kernelPath and why (search: as Options.KernelSearch), e.g.
// "virtio-blk drives, virtio-serial channel (config: /boot/config-6.1)".
// A kernel the driver refuses gives the refusal.
func DeviceSummary(kernelPath string, search []string) (string, error) {
	c, from, err := kernel.FindConfig(kernelPath, search...)
	switch {
	case errcode.HasCode(err, errcode.ConfigNotFound):
		return "NVMe drives, UART channel (no kernel config found: assumed stock)", nil
	case err != nil:
		return "", err
	}
	d, err := chooseDevices(c)
	if err != nil {
		return "", err
	}
	disk, channel := "NVMe drives", "UART channel"
	if d.virtioBlk {
		disk = "virtio-blk drives"
	}
	if d.virtioPort {
		channel = "virtio-serial channel"
	}
	return fmt.Sprintf("%s, %s (config: %s)", disk, channel, from), nil
}

// RootDisk returns the -device driver and the guest device path the
// driver uses for the root drive of the kernel at kernelPath (search: as
// Options.KernelSearch), for programs that start QEMU by hand to compare
// with it, such as bench/boot's baseline.
func RootDisk(kernelPath string, search []string) (device, guestPath string, err error) {
	d, err := devicesFor(kernelPath, search, slog.New(slog.DiscardHandler))
	if err != nil {
		return "", "", err
	}
	device = "nvme"
	if d.virtioBlk {
		device = virtioBlkDevice
	}
	return device, driveName(d, 0), nil
}
