package qemu

import (
	"fmt"
	"log/slog"
	"strconv"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/kernel"
)

// devices is how a guest kernel gets its drives and the host↔guest
// channel. Virtio devices on microvm's virtio-mmio transport are used when
// the kernel has them built in (Firecracker-style kernels, which have
// neither NVMe nor a second UART); otherwise the NVMe controllers and the
// second 8250 UART that Debian's stock cloud kernel has built in (its
// virtio drivers are modules, and hyphae boots without an initramfs).
type devices struct {
	// virtioBlk puts the drives on virtio-blk-device (/dev/vda, vdb, …)
	// instead of NVMe controllers.
	virtioBlk bool
	// virtioPort makes the channel a virtio-serial port named
	// ChannelPortName instead of the second UART.
	virtioPort bool
	// vsock: the kernel has virtio vsock built in, so a vhost-vsock
	// device is worth adding where the host has /dev/vhost-vsock.
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
	mmio := c.Builtin("VIRTIO_MMIO")
	d := devices{
		virtioBlk:  mmio && c.Builtin("VIRTIO_BLK"),
		virtioPort: mmio && c.Builtin("VIRTIO_CONSOLE"),
		vsock:      mmio && c.Builtin("VIRTIO_VSOCKETS"),
		nicBuiltin: c.Builtin("VIRTIO_PCI") && c.Builtin("VIRTIO_NET"),
	}
	if !d.virtioBlk && !c.Builtin("BLK_DEV_NVME") {
		return devices{}, errcode.New(errcode.KernelUnsupported, "the kernel has neither virtio-blk over virtio-mmio nor NVMe built in: the qemu driver cannot give it a root drive").
			WithHint("build the kernel with CONFIG_VIRTIO_MMIO=y and CONFIG_VIRTIO_BLK=y, or CONFIG_BLK_DEV_NVME=y")
	}
	if !d.virtioPort && (!c.Builtin("SERIAL_8250") || runtimeUARTs(c) < 2) {
		return devices{}, errcode.New(errcode.KernelUnsupported, "the kernel has neither virtio-console over virtio-mmio nor a second 8250 UART built in: the qemu driver cannot give it a host channel").
			WithHint("build the kernel with CONFIG_VIRTIO_MMIO=y and CONFIG_VIRTIO_CONSOLE=y, or CONFIG_SERIAL_8250=y with CONFIG_SERIAL_8250_RUNTIME_UARTS ≥ 2")
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
		log.Debug("no kernel config found; assuming a stock kernel (NVMe drives, second UART as the channel)", "kernel", kernelPath)
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
