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

// ChannelDevice is the guest's side of the serial channel on a stock
// kernel: the second 8250 UART, which the Debian cloud kernel has built in
// (ttyS0 is the console).
const ChannelDevice = "/dev/ttyS1"

// ChannelPortName names the virtio-serial port that is the channel on a
// kernel with virtio-console built in. The guest finds the port by this
// name (/sys/class/virtio-ports/*/name), since its vportNpM device name
// depends on the order in which virtio devices were probed.
const ChannelPortName = "org.hyphae.channel"

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
	dev    devices
}

// args returns QEMU's arguments for spec. The root drive always comes
// first, so the guest sees it as /dev/nvme0n1 (or /dev/vda on virtio);
// extra drives follow in spec order (see guestDrivePath).
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
		// The channel, backed by a Unix socket the host dials. wait=off
		// lets the guest boot before anyone connects.
		"-chardev", "socket,id=ch0,path=" + optEscape(l.channelSock) + ",server=on,wait=off",
		// A PS/2 controller, so that QMP send-key can deliver Ctrl-Alt-Del
		// (microvm has neither ACPI power button handling nor a keyboard
		// by default).
		"-device", "i8042",
		"-qmp", "unix:" + optEscape(l.qmpSock) + ",server=on,wait=off",
		"-kernel", spec.Kernel,
		"-append", cmdline(spec, l),
	}
	if l.dev.virtioPort {
		a = append(a, "-device", "virtio-serial-device,id=vser0",
			"-device", "virtserialport,bus=vser0.0,chardev=ch0,name="+ChannelPortName)
	} else {
		a = append(a, "-device", "isa-serial,chardev=ch0")
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
		// The guest can read the drive id back from the serial
		// (/sys/block/vdX/serial, /sys/block/nvmeXn1/device/serial).
		dev := "nvme"
		if l.dev.virtioBlk {
			dev = virtioBlkDevice
		}
		a = append(a, "-drive", opt, "-device", dev+",drive="+id+",serial="+optEscape(driveSerial(serial)))
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
		dev := "vhost-vsock-pci"
		if l.dev.vsock {
			dev = "vhost-vsock-device" // on virtio-mmio, which the kernel has
		}
		a = append(a, "-device", fmt.Sprintf("%s,guest-cid=%d", dev, spec.VsockCID))
	}
	return a
}

// guestDrivePath returns the device the guest sees the drive with that
// id as, following args' order: the root drive first, the others in spec
// order.
func guestDrivePath(spec vmm.Spec, dev devices, id string) (string, bool) {
	n := 1
	for _, d := range spec.Drives {
		switch {
		case d.ID == id && d.Root:
			return driveName(dev, 0), true
		case d.ID == id:
			return driveName(dev, n), true
		case !d.Root:
			n++
		}
	}
	return "", false
}

// driveName is the guest's name for the n-th drive (from 0): an NVMe
// namespace, or a virtio disk (vda, vdb, …; New refuses more drives than
// microvm has virtio-mmio slots for, fewer than 26).
func driveName(dev devices, n int) string {
	if dev.virtioBlk {
		return "/dev/vd" + string(rune('a'+n))
	}
	return fmt.Sprintf("/dev/nvme%dn1", n)
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
	channel := "serial:" + ChannelDevice
	if l.dev.virtioPort {
		channel = "virtio-port:" + ChannelPortName
	}
	parts := []string{
		"console=ttyS0", "root=" + driveName(l.dev, 0), mode, "init=" + guest.InitPath,
		// Reboot at once on a panic: with -no-reboot QEMU then exits
		// instead of leaving a dead guest running.
		"panic=-1", "quiet",
		// Reboot through the i8042 reset line, which -no-reboot turns
		// into QEMU exiting. The kernel's default (ACPI reset first) was
		// seen to reset microvm now and then instead, leaving a guest
		// spinning in the firmware and QEMU running.
		"reboot=k",
		guest.CmdlineChannel + "=" + channel,
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

// virtioBlkDevice is QEMU's virtio-blk on the virtio-mmio transport.
const virtioBlkDevice = "virtio-blk-device"

// driveSerial fits a drive id into a drive serial number: 20 bytes, the
// size of both NVMe's and virtio-blk's.
func driveSerial(id string) string {
	if len(id) > 20 {
		return id[:20]
	}
	return id
}
