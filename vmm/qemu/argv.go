package qemu

import (
	"fmt"
	"strings"

	"github.com/hyphae-run/hyphae/guest"
	"github.com/hyphae-run/hyphae/vmm"
)

// Accelerators.
const (
	AccelAuto = "auto"
	AccelKVM  = "kvm"
	AccelTCG  = "tcg"
)

// ChannelDevice is the guest's side of the serial channel: the second
// 8250 UART, which the Debian cloud kernel has built in (ttyS0 is the
// console).
const ChannelDevice = "/dev/ttyS1"

// layout is where one VM's files live and how it is accelerated; args
// renders it with the spec into QEMU's command line.
type layout struct {
	accel string
	// rootFile and rootFormat are what QEMU opens for the root drive: the
	// per-VM qcow2 overlay, or the image itself when the root is read-only.
	rootFile, rootFormat string
	channelSock, qmpSock string
	// tscKHz, when not zero, is handed to the kernel as tsc_early_khz (see
	// Machine.Start).
	tscKHz int
	vsock  bool
}

// args returns QEMU's arguments for spec. The root drive is always the
// first NVMe controller, so the guest sees it as /dev/nvme0n1; extra
// drives follow in spec order as /dev/nvme1n1, ...
func args(spec vmm.Spec, l layout) []string {
	a := []string{
		"-accel", l.accel,
		"-M", "microvm,pcie=on,rtc=on",
		"-m", fmt.Sprint(spec.MemoryMiB),
		"-smp", fmt.Sprint(spec.VCPUs),
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
		// The console goes to QEMU's stdout, which vmmproc sends to the
		// console log together with QEMU's own messages.
		"-serial", "stdio",
		// The channel: the second UART, backed by a Unix socket the host
		// dials. wait=off lets the guest boot before anyone connects.
		"-chardev", "socket,id=ch0,path=" + optEscape(l.channelSock) + ",server=on,wait=off",
		"-device", "isa-serial,chardev=ch0",
		// A PS/2 controller, so that QMP send-key can deliver Ctrl-Alt-Del
		// (microvm has neither ACPI power button handling nor a keyboard
		// by default).
		"-device", "i8042",
		"-qmp", "unix:" + optEscape(l.qmpSock) + ",server=on,wait=off",
		"-kernel", spec.Kernel,
		"-append", cmdline(spec, l),
	}
	if l.accel == AccelKVM {
		a = append(a, "-cpu", "host")
	}
	n := 0
	addDrive := func(file, format string, readOnly bool, serial string) {
		id := fmt.Sprintf("drive%d", n)
		n++
		opt := "file=" + optEscape(file) + ",if=none,id=" + id + ",format=" + format
		if readOnly {
			opt += ",readonly=on"
		}
		a = append(a, "-drive", opt, "-device", "nvme,drive="+id+",serial="+optEscape(nvmeSerial(serial)))
	}
	for _, d := range spec.Drives {
		if d.Root {
			addDrive(l.rootFile, l.rootFormat, d.ReadOnly, d.ID)
		}
	}
	for _, d := range spec.Drives {
		if !d.Root {
			addDrive(d.Path, "raw", d.ReadOnly, d.ID)
		}
	}
	for i, nic := range spec.Network {
		id := fmt.Sprintf("net%d", i)
		// Modern virtio only: microvm's PCIe root has no I/O port window
		// for the legacy BAR. No option ROM: nothing runs firmware here.
		dev := "virtio-net-pci,netdev=" + id + ",disable-legacy=on,romfile="
		if nic.MAC != "" {
			dev += ",mac=" + nic.MAC
		}
		a = append(a, "-netdev", "tap,id="+id+",ifname="+optEscape(nic.TapName)+",script=no,downscript=no", "-device", dev)
	}
	if l.vsock {
		a = append(a, "-device", fmt.Sprintf("vhost-vsock-pci,guest-cid=%d", spec.VsockCID))
	}
	return a
}

// guestDrivePath returns the device the guest sees the drive with that
// id as, following args' order: the root drive is the first NVMe
// controller, the others follow in spec order.
func guestDrivePath(spec vmm.Spec, id string) (string, bool) {
	n := 1
	for _, d := range spec.Drives {
		switch {
		case d.ID == id && d.Root:
			return "/dev/nvme0n1", true
		case d.ID == id:
			return fmt.Sprintf("/dev/nvme%dn1", n), true
		case !d.Root:
			n++
		}
	}
	return "", false
}

// cmdline is the guest kernel command line: what the driver needs first,
// the caller's boot args last so that they can override it.
func cmdline(spec vmm.Spec, l layout) string {
	mode := "rw"
	for _, d := range spec.Drives {
		if d.Root && d.ReadOnly {
			mode = "ro"
		}
	}
	parts := []string{
		"console=ttyS0", "root=/dev/nvme0n1", mode, "init=" + guest.InitPath,
		// Reboot at once on a panic: with -no-reboot QEMU then exits
		// instead of leaving a dead guest running.
		"panic=-1", "quiet",
		// Reboot through the i8042 reset line, which -no-reboot turns
		// into QEMU exiting. The kernel's default (ACPI reset first) was
		// seen to reset microvm now and then instead, leaving a guest
		// spinning in the firmware and QEMU running.
		"reboot=k",
		guest.CmdlineChannel + "=serial:" + ChannelDevice,
	}
	if l.tscKHz > 0 {
		parts = append(parts, fmt.Sprintf("tsc_early_khz=%d", l.tscKHz))
	}
	if spec.BootArgs != "" {
		parts = append(parts, spec.BootArgs)
	}
	return strings.Join(parts, " ")
}

// optEscape doubles commas, QEMU's way of putting one inside an option
// value such as a path.
func optEscape(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// nvmeSerial fits a drive id into an NVMe serial number (20 bytes), which
// the guest can read back from /sys/block/nvme*/device/serial.
func nvmeSerial(id string) string {
	if len(id) > 20 {
		return id[:20]
	}
	return id
}
