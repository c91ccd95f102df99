// Package firecracker is the vmm.Machine driver for Firecracker: it turns a
// vmm.Spec into Firecracker's configuration (for --config-file or the API
// socket), talks to the API over its Unix socket, supervises the firecracker
// process and opens the host↔guest channel over hybrid vsock.
//
// Each VM gets a private writable layer: the registry image is attached
// read-only as the root drive and a sparse, freshly formatted ext4 scratch
// file is attached as the second drive (/dev/vdb); hyphae-init sees
// hyphae.overlay=/dev/vdb on the command line and mounts an overlay over the
// root before anything else runs. Creating the layer costs one mkfs.ext4 run
// (tens of ms) and about 650 KiB of disk per VM.
//
// Tests run the lifecycle against a Firecracker stand-in (internal/standin)
// that serves the API socket per Firecracker's own API description; a test
// against a real Firecracker runs where one and a working KVM exist.
package firecracker

import (
	"errors"
	"fmt"
	"net"
	"strings"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
	"github.com/hyphae-run/hyphae/vmm"
)

// DefaultVsockCID is the guest CID used when the spec leaves it unset.
const DefaultVsockCID = 3

// ScratchDriveID is the drive id of the private writable layer. Firecracker
// attaches the root drive first and the others in order, so the scratch
// drive, listed right after the root, is always /dev/vdb in the guest.
const ScratchDriveID = "scratch"

// scratchDevice is where the guest sees the scratch drive.
const scratchDevice = "/dev/vdb"

// baseBootArgs come before spec.BootArgs. Firecracker's built-in default
// command line turns the serial console off, so we always send our own:
// console on ttyS0 (captured to the console log), reboot=k so that the
// guest's reboot makes Firecracker exit, pci=off because Firecracker has
// virtio-mmio only, and the root read-only (the image is shared).
const baseBootArgs = "console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda ro init=" + guest.InitPath

// maxBootArgs is the x86_64 kernel's COMMAND_LINE_SIZE less its NUL:
// Firecracker refuses longer command lines at InstanceStart.
const maxBootArgs = 2047

// maxInstanceID is Firecracker's limit on --id.
const maxInstanceID = 64

// maxResourceID bounds drive and interface ids. Firecracker sets no limit
// of its own; this keeps ids (which travel in URL paths and logs) sane.
const maxResourceID = 64

// BootSource is the body of PUT /boot-source.
type BootSource struct {
	KernelImagePath string `json:"kernel_image_path"`
	BootArgs        string `json:"boot_args"`
}

// Drive is the body of PUT /drives/{drive_id}.
type Drive struct {
	DriveID      string `json:"drive_id"`
	PathOnHost   string `json:"path_on_host"`
	IsRootDevice bool   `json:"is_root_device"`
	IsReadOnly   bool   `json:"is_read_only"`
}

// MachineConfig is the body of PUT /machine-config.
type MachineConfig struct {
	VCPUCount  int `json:"vcpu_count"`
	MemSizeMiB int `json:"mem_size_mib"`
}

// NetworkInterface is the body of PUT /network-interfaces/{iface_id}.
type NetworkInterface struct {
	IfaceID     string `json:"iface_id"`
	HostDevName string `json:"host_dev_name"`
	GuestMAC    string `json:"guest_mac,omitempty"`
}

// Vsock is the body of PUT /vsock. Firecracker binds UDSPath when it
// receives this (or reads it from the config file).
type Vsock struct {
	GuestCID uint32 `json:"guest_cid"`
	UDSPath  string `json:"uds_path"`
}

// Logger is the body of PUT /logger. Firecracker opens LogPath without
// creating it, so the file must exist first.
type Logger struct {
	LogPath   string `json:"log_path"`
	Level     string `json:"level"`
	ShowLevel bool   `json:"show_level"`
}

// Config is a whole VM configuration. Marshalled, it is the document for
// `firecracker --config-file` (kebab-case top-level keys); Requests gives
// the same bodies as API calls.
type Config struct {
	Logger            *Logger            `json:"logger,omitempty"`
	BootSource        BootSource         `json:"boot-source"`
	MachineConfig     MachineConfig      `json:"machine-config"`
	Drives            []Drive            `json:"drives"`
	NetworkInterfaces []NetworkInterface `json:"network-interfaces,omitempty"`
	Vsock             Vsock              `json:"vsock"`
}

// ConfigOptions are the host paths BuildConfig cannot derive from a spec.
type ConfigOptions struct {
	// ScratchPath is the private writable layer (an empty ext4 file),
	// attached as the second drive. Required.
	ScratchPath string
	// VsockPath is the Unix socket Firecracker binds for the vsock device.
	// Required.
	VsockPath string
	// LogPath, when set, sends Firecracker's own log there instead of to
	// its standard error.
	LogPath string
}

// BuildConfig renders spec as a Firecracker configuration. Every problem
// with the spec is reported at once, as errcode.InvalidSpec errors.
func BuildConfig(spec vmm.Spec, opts ConfigOptions) (Config, error) {
	errs := []error{vmm.Validate(spec)}
	bad := func(format string, args ...any) {
		errs = append(errs, errcode.New(errcode.InvalidSpec, format, args...))
	}
	errs = append(errs, checkID("id", spec.ID, '-', maxInstanceID))
	if opts.ScratchPath == "" {
		bad("firecracker: no path for the writable layer")
	}
	if opts.VsockPath == "" {
		bad("firecracker: no path for the vsock socket")
	}
	for i, d := range spec.Drives {
		if d.ID == ScratchDriveID {
			bad("drives[%d].id: %q is reserved for the writable layer", i, d.ID)
		} else if d.ID != "" {
			errs = append(errs, checkID(fmt.Sprintf("drives[%d].id", i), d.ID, '_', maxResourceID))
		}
	}
	for i, n := range spec.Network {
		if n.ID != "" {
			errs = append(errs, checkID(fmt.Sprintf("network[%d].id", i), n.ID, '_', maxResourceID))
		}
		if n.MAC == "" {
			continue
		}
		if hw, err := net.ParseMAC(n.MAC); err != nil || len(hw) != 6 {
			bad("network[%d].mac: %q is not a 6-byte MAC address", i, n.MAC)
		}
	}
	port := spec.ChannelPort
	if port == 0 {
		port = vmm.DefaultChannelPort
	}
	bootArgs := strings.Join(strings.Fields(fmt.Sprintf("%s %s=vsock:%d %s=%s %s",
		baseBootArgs, guest.CmdlineChannel, port, guest.CmdlineOverlay, scratchDevice, spec.BootArgs)), " ")
	if len(bootArgs) > maxBootArgs {
		bad("boot_args: the kernel command line would be %d bytes, over the limit of %d", len(bootArgs), maxBootArgs)
	}
	if err := errors.Join(errs...); err != nil {
		return Config{}, err
	}

	cid := spec.VsockCID
	if cid == 0 {
		cid = DefaultVsockCID
	}
	cfg := Config{
		BootSource:    BootSource{KernelImagePath: spec.Kernel, BootArgs: bootArgs},
		MachineConfig: MachineConfig{VCPUCount: spec.VCPUs, MemSizeMiB: spec.MemoryMiB},
		Vsock:         Vsock{GuestCID: cid, UDSPath: opts.VsockPath},
	}
	if opts.LogPath != "" {
		cfg.Logger = &Logger{LogPath: opts.LogPath, Level: "Info", ShowLevel: true}
	}
	// Root first, then the scratch layer, then the rest in spec order:
	// that is the order the guest sees them in (vda, vdb, vdc, ...).
	for _, d := range spec.Drives {
		if d.Root {
			// The root is a registry image: never writable, whatever
			// the spec says.
			cfg.Drives = append(cfg.Drives, Drive{DriveID: d.ID, PathOnHost: d.Path, IsRootDevice: true, IsReadOnly: true})
		}
	}
	cfg.Drives = append(cfg.Drives, Drive{DriveID: ScratchDriveID, PathOnHost: opts.ScratchPath})
	for _, d := range spec.Drives {
		if !d.Root {
			cfg.Drives = append(cfg.Drives, Drive{DriveID: d.ID, PathOnHost: d.Path, IsReadOnly: d.ReadOnly})
		}
	}
	for _, n := range spec.Network {
		cfg.NetworkInterfaces = append(cfg.NetworkInterfaces, NetworkInterface{IfaceID: n.ID, HostDevName: n.TapName, GuestMAC: n.MAC})
	}
	return cfg, nil
}

// checkID applies Firecracker's character rules to an identifier: --id
// allows letters, digits and '-' (at most 64), while the ids that appear in
// API paths (drives, interfaces) allow letters, digits and '_'.
func checkID(field, id string, extra rune, maxLen int) error {
	if id == "" || (maxLen > 0 && len(id) > maxLen) {
		return errcode.New(errcode.InvalidSpec, "%s: %q must be 1 to %d characters for Firecracker", field, id, maxLen)
	}
	for i, r := range id {
		if !(r == extra || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9') {
			return errcode.New(errcode.InvalidSpec, "%s: %q has %q at position %d; Firecracker allows letters, digits and %q", field, id, r, i, extra)
		}
	}
	return nil
}

// Request is one API call that configures a VM before it starts.
type Request struct {
	Method string
	Path   string
	Body   any
}

// Requests returns the API calls that set up c on a fresh Firecracker, in
// order: the logger first so that later errors are logged, then the boot
// source, machine, drives, interfaces and vsock. InstanceStart is not
// included.
func (c Config) Requests() []Request {
	var reqs []Request
	put := func(path string, body any) {
		reqs = append(reqs, Request{Method: "PUT", Path: path, Body: body})
	}
	if c.Logger != nil {
		put("/logger", *c.Logger)
	}
	put("/boot-source", c.BootSource)
	put("/machine-config", c.MachineConfig)
	for _, d := range c.Drives {
		put("/drives/"+d.DriveID, d)
	}
	for _, n := range c.NetworkInterfaces {
		put("/network-interfaces/"+n.IfaceID, n)
	}
	put("/vsock", c.Vsock)
	return reqs
}
