package cli

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/registry"
	"github.com/hyphae-run/hyphae/vm"
	"github.com/hyphae-run/hyphae/vmm"
)

// vmChecks shares one KVM probe and one registry look between the VM
// runtime's check entries.
type vmChecks struct {
	once sync.Once
	rt   *vm.Runtime
	reg  *registry.Registry
	err  error
}

// runtime returns a vm.Runtime for the checks: with the registry when the
// home exists (check must not create it), else without.
func (c *vmChecks) runtime(ctx context.Context, a *app) *vm.Runtime {
	c.once.Do(func() {
		// The checks report problems themselves; the runtime's warnings
		// would only repeat them on stderr.
		quiet := slog.New(slog.DiscardHandler)
		if _, err := os.Stat(filepath.Join(a.home, registry.DBFile)); err == nil {
			c.reg, c.err = registry.Open(ctx, a.home, quiet)
		}
		c.rt = vm.New(vm.Options{Registry: c.reg, Logger: quiet})
	})
	return c.rt
}

func (c *vmChecks) close() {
	if c.reg != nil {
		c.reg.Close()
	}
}

// vmPrereqs are the VM runtime's entries of `hyphae check`.
func vmPrereqs(c *vmChecks) []prereq {
	return []prereq{
		{Name: "kvm", For: "Firecracker; QEMU acceleration", Probe: func(ctx context.Context, a *app) probeResult {
			k := c.runtime(ctx, a).ProbeKVM(ctx, false)
			detail := fmt.Sprintf("%s (probe: %s", k.Reason, k.Method)
			if k.Cached {
				detail += ", cached for this host boot"
			}
			detail += ")"
			return probeResult{OK: k.OK, Detail: detail, Hint: "QEMU falls back to TCG (slower); Firecracker needs KVM: use a host with working (not nested-broken) KVM"}
		}},
		vmmBinaryPrereq("firecracker", "--vmm firecracker (production)", "install a Firecracker release binary as firecracker on PATH"),
		toolPrereq("qemu-system-x86_64", false, "--vmm qemu (hosts without Firecracker or KVM)", "qemu-system-x86", "--version"),
		toolPrereq("qemu-img", false, "QEMU's per-VM writable layer", "qemu-utils", "--version"),
		kernelPrereq(c, vmm.QEMU, "`hyphae kernel fetch --debian` (or `hyphae kernel add <bzImage>`)"),
		kernelPrereq(c, vmm.Firecracker, "`hyphae kernel add <vmlinux>` with an uncompressed ELF vmlinux"),
		{Name: "vmm (auto)", Required: true, For: "hyphae run", Probe: func(ctx context.Context, a *app) probeResult {
			ch, err := c.runtime(ctx, a).ChooseDriver(ctx, vm.Auto)
			if err != nil {
				return probeResult{Detail: strings.TrimPrefix(err.Error(), string(errcode.CodeOf(err))+": "), Hint: errcode.HintOf(err)}
			}
			d := ch.Driver
			if ch.Accel != "" {
				d += " (" + ch.Accel + ")"
			}
			return probeResult{OK: true, Detail: "auto picks " + d + ": " + ch.Reason}
		}},
	}
}

func vmmBinaryPrereq(name, forWhat, hint string) prereq {
	return prereq{Name: name, For: forWhat, Probe: func(ctx context.Context, _ *app) probeResult {
		v, p, err := versionOf(ctx, name)
		if err != nil {
			return probeResult{Detail: errText(err), Hint: hint}
		}
		return probeResult{OK: true, Detail: v + " (" + p + ")"}
	}}
}

func kernelPrereq(c *vmChecks, driver, hint string) prereq {
	return prereq{Name: "kernel (" + driver + ")", For: "hyphae run --vmm " + driver, Probe: func(ctx context.Context, a *app) probeResult {
		rt := c.runtime(ctx, a)
		if c.err != nil {
			return probeResult{Detail: c.err.Error(), Hint: errcode.HintOf(c.err)}
		}
		if c.reg == nil {
			return probeResult{Detail: "no registry yet, so no kernels", Hint: hint}
		}
		k, err := rt.DefaultKernel(ctx, driver)
		if err != nil {
			if errors.Is(err, context.Canceled) {
				return probeResult{Detail: err.Error()}
			}
			return probeResult{Detail: "no registered kernel can boot " + driver, Hint: hint}
		}
		detail := "default " + k.Name + " (" + k.Format + ", " + k.Path + ")"
		if driver == vmm.QEMU {
			devs, err := rt.QEMUDevices(k.Path)
			if err != nil {
				return probeResult{Detail: detail + ": " + err.Error(), Hint: errcode.HintOf(err)}
			}
			detail += ": " + devs
		}
		return probeResult{OK: true, Detail: detail}
	}}
}
