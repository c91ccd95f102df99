package vmm

import (
	"errors"

	"github.com/hyphae-run/hyphae/errcode"
)

// Limits enforced by Validate.
const (
	// MaxVCPUs is the most vCPUs a spec may ask for (Firecracker's limit).
	MaxVCPUs = 32
	// MinMemoryMiB is the least guest memory a spec may ask for; below it
	// no stock kernel gets to PID 1.
	MinMemoryMiB = 8
	// MinVsockCID is the lowest guest vsock context id: 0–2 are reserved
	// for the hypervisor, the local loopback and the host.
	MinVsockCID = 3
)

// maxIfName is the longest Linux interface name (IFNAMSIZ less the NUL).
const maxIfName = 15

// Validate checks spec before any VMM is spawned. It reports every problem
// at once, joined with errors.Join; each is an errcode.InvalidSpec error
// naming the offending field, so a user fixes all of them in one go.
func Validate(spec Spec) error {
	var errs []error
	bad := func(format string, args ...any) {
		errs = append(errs, errcode.New(errcode.InvalidSpec, format, args...))
	}

	// Firecracker only accepts 1 or an even number of vCPUs; the same rule
	// for QEMU keeps specs portable between drivers.
	if spec.VCPUs < 1 || spec.VCPUs > MaxVCPUs || (spec.VCPUs != 1 && spec.VCPUs%2 != 0) {
		bad("vcpus: %d is not 1 or an even number up to %d", spec.VCPUs, MaxVCPUs)
	}
	if spec.MemoryMiB < MinMemoryMiB {
		bad("memory_mib: %d is below the minimum of %d MiB", spec.MemoryMiB, MinMemoryMiB)
	}
	if spec.Kernel == "" {
		bad("kernel: no kernel path given")
	}

	roots := 0
	driveIDs := map[string]bool{}
	for i, d := range spec.Drives {
		if d.ID == "" {
			bad("drives[%d].id: empty", i)
		} else if driveIDs[d.ID] {
			bad("drives[%d].id: %q is used by another drive", i, d.ID)
		}
		driveIDs[d.ID] = true
		if d.Path == "" {
			bad("drives[%d].path: empty (drive %q)", i, d.ID)
		}
		if d.Root {
			roots++
		}
	}
	if roots != 1 {
		bad("drives: %d root drives, want exactly one", roots)
	}

	if spec.VsockCID != 0 && spec.VsockCID < MinVsockCID {
		bad("vsock_cid: %d is reserved, use %d or more", spec.VsockCID, MinVsockCID)
	}

	nicIDs, taps := map[string]bool{}, map[string]bool{}
	for i, n := range spec.Network {
		if n.ID == "" {
			bad("network[%d].id: empty", i)
		} else if nicIDs[n.ID] {
			bad("network[%d].id: %q is used by another interface", i, n.ID)
		}
		nicIDs[n.ID] = true
		if n.TapName == "" {
			bad("network[%d].tap_name: empty (interface %q)", i, n.ID)
		} else if len(n.TapName) > maxIfName {
			bad("network[%d].tap_name: %q is longer than %d bytes", i, n.TapName, maxIfName)
		} else if taps[n.TapName] {
			bad("network[%d].tap_name: %q is used by another interface", i, n.TapName)
		}
		taps[n.TapName] = true
	}
	return errors.Join(errs...)
}
