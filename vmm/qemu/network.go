package qemu

import (
	"context"
	"log/slog"
	"slices"
	"strings"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
	"github.com/hyphae-run/hyphae/kernel"
	"github.com/hyphae-run/hyphae/vmm"
)

// ModulesDriveID is the id of the read-only drive AddNetwork gives a guest
// whose kernel has its NIC driver as a module.
const ModulesDriveID = "modules"

// NetworkModules are the kernel modules the guest needs for the NIC this
// driver gives it (virtio-net-pci on microvm's PCIe): the virtio PCI
// transport and the virtio-net driver. Their dependencies come along.
func NetworkModules() []string { return []string{"virtio_pci", "virtio_net"} }

// NetworkOptions configure AddNetwork.
type NetworkOptions struct {
	// ModulesCache is where modules images are built and kept, shared by
	// every VM (e.g. the registry's kernels/modules). Required.
	ModulesCache string
	// ModulesSearch are extra directories holding modules-<release> trees
	// and config-<release> files, searched before the kernel's own
	// directory and kernel.DefaultCacheDir (see kernel.FindModules and
	// kernel.FindConfig).
	ModulesSearch []string
	// Logger; nil means slog.Default().
	Logger *slog.Logger
}

// AddNetwork gives spec the NIC nic and appends bootArgs (the guest's
// network configuration, network.Attachment.BootArgs) to its command
// line. When the kernel's configuration (kernel.FindConfig) shows the
// NetworkModules built in, that is all. Otherwise, when a modules tree
// for spec.Kernel is found, the NetworkModules it does not have built in
// are packed into a cached image
// (kernel.ModulesImage) that becomes a read-only drive ModulesDriveID,
// named to hyphae-init with guest.CmdlineModules. When no tree is found
// the kernel must have the drivers built in; that is logged, and a guest
// without them reports the missing device in its fatal status line.
// Call it after the spec's other drives are in place; drives appended
// later do not move the modules drive.
func AddNetwork(ctx context.Context, spec *vmm.Spec, nic vmm.NetworkInterface, bootArgs string, o NetworkOptions) error {
	if o.ModulesCache == "" {
		return errcode.New(errcode.InvalidArgument, "qemu: NetworkOptions.ModulesCache is required")
	}
	if slices.ContainsFunc(spec.Drives, func(d vmm.Drive) bool { return d.ID == ModulesDriveID }) {
		return errcode.New(errcode.InvalidSpec, "spec already has a drive %q", ModulesDriveID)
	}
	log := o.Logger
	if log == nil {
		log = slog.Default()
	}
	dev, err := devicesFor(spec.Kernel, o.ModulesSearch, log)
	if err != nil {
		return err
	}
	var args []string
	if !dev.nicBuiltin {
		modulesArg, err := addModulesDrive(ctx, spec, dev, o, log)
		if err != nil {
			return err
		}
		if modulesArg != "" {
			args = append(args, modulesArg)
		}
	}
	spec.Network = append(spec.Network, nic)
	if bootArgs != "" {
		args = append(args, bootArgs)
	}
	if len(args) > 0 {
		spec.BootArgs = strings.TrimSpace(spec.BootArgs + " " + strings.Join(args, " "))
	}
	return nil
}

// addModulesDrive packs the NetworkModules that the kernel of spec does
// not have built in into a cached image and attaches it as the read-only
// drive ModulesDriveID. It returns the boot argument that names the drive
// to hyphae-init, or "" when no drive was needed or no modules tree was
// found (then the drivers must be built in; that is logged).
func addModulesDrive(ctx context.Context, spec *vmm.Spec, dev devices, o NetworkOptions, log *slog.Logger) (string, error) {
	tree, err := kernel.FindModules(spec.Kernel, o.ModulesSearch...)
	switch {
	case errcode.HasCode(err, errcode.ModulesNotFound):
		log.Warn("no modules tree for the guest kernel; its NIC driver must be built in", "kernel", spec.Kernel, "err", err)
		return "", nil
	case err != nil:
		return "", err
	}
	image, order, err := kernel.ModulesImage(ctx, tree, NetworkModules(), o.ModulesCache)
	if err != nil || image == "" {
		return "", err
	}
	spec.Drives = append(spec.Drives, vmm.Drive{ID: ModulesDriveID, Path: image, ReadOnly: true})
	path, _ := guestDrivePath(*spec, dev, ModulesDriveID)
	log.Debug("guest kernel modules", "image", image, "modules", order)
	return guest.CmdlineModules + "=" + path, nil
}
