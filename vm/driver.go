package vm

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/kernel"
	"github.com/hyphae-run/hyphae/vmm"
	"github.com/hyphae-run/hyphae/vmm/firecracker"
	"github.com/hyphae-run/hyphae/vmm/qemu"
	"github.com/hyphae-run/hyphae/vmm/vmmproc"
)

// Auto is the --vmm value that lets the runtime pick.
const Auto = "auto"

// Choice is the driver a run uses and why.
type Choice struct {
	Driver string `json:"driver"`
	// Binary is the VMM executable's path.
	Binary string `json:"binary"`
	// Accel is QEMU's accelerator: kvm or tcg.
	Accel     string `json:"accel,omitempty"`
	KVM       bool   `json:"kvm"`
	KVMReason string `json:"kvm_reason"`
	Reason    string `json:"reason"`
}

// KVMResult is the outcome of the KVM probe.
type KVMResult struct {
	OK     bool   `json:"ok"`
	Reason string `json:"reason"`
	// Method is how it was probed: "qemu-boot" (a real kernel booted under
	// QEMU with -accel kvm) or "hlt-guest" (a one-instruction guest run
	// through the KVM ioctls, when QEMU or a kernel is missing).
	Method string    `json:"method"`
	BootID string    `json:"boot_id"`
	At     time.Time `json:"probed_at"`
	// Cached reports an answer read back from this host boot's cache.
	Cached bool `json:"cached"`
}

// kvmCacheFile, in vmmproc.RuntimeDir(), keeps the probe's answer for the
// rest of the host's boot: the QEMU probe costs up to a few seconds (its
// whole bound where nested KVM hangs guests), too much for every run.
const kvmCacheFile = "kvm-probe.json"

// kvmProbe memoizes the probe within one process.
type kvmProbe struct {
	mu  sync.Mutex
	res *KVMResult
}

func bootID() string {
	b, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
	return strings.TrimSpace(string(b))
}

// ProbeKVM reports whether KVM really works: the device node is never
// trusted, a guest is booted (see KVMResult.Method). The answer is cached
// for this process and, per host boot, in the runtime directory; fresh
// ignores both caches (hyphae check).
func (rt *Runtime) ProbeKVM(ctx context.Context, fresh bool) KVMResult {
	rt.kvm.mu.Lock()
	defer rt.kvm.mu.Unlock()
	if rt.kvm.res != nil && !fresh {
		return *rt.kvm.res
	}
	cache := filepath.Join(vmmproc.RuntimeDir(), kvmCacheFile)
	boot := bootID()
	if !fresh {
		if b, err := os.ReadFile(cache); err == nil {
			var r KVMResult
			if json.Unmarshal(b, &r) == nil && r.BootID == boot && boot != "" {
				r.Cached = true
				rt.kvm.res = &r
				return r
			}
		}
	}
	r := KVMResult{BootID: boot, At: time.Now().UTC()}
	if bin, err := exec.LookPath(rt.qemu); err == nil {
		if k := rt.probeKernel(ctx); k != "" {
			r.Method = "qemu-boot"
			r.OK, r.Reason = qemu.ProbeKVM(ctx, bin, k)
		}
	}
	if r.Method == "" {
		r.Method = "hlt-guest"
		r.OK, r.Reason = firecracker.ProbeKVM(ctx)
	}
	rt.log.Debug("KVM probed", "ok", r.OK, "method", r.Method, "reason", r.Reason)
	if ctx.Err() == nil {
		if b, err := json.Marshal(r); err == nil && os.MkdirAll(vmmproc.RuntimeDir(), 0o700) == nil {
			tmp := cache + ".new"
			if os.WriteFile(tmp, b, 0o600) == nil {
				_ = os.Rename(tmp, cache)
			}
		}
		rt.kvm.res = &r
	}
	return r
}

// probeKernel is a kernel QEMU can boot for the KVM probe: the default
// QEMU kernel of the registry, else Debian's kernel in the shared cache.
func (rt *Runtime) probeKernel(ctx context.Context) string {
	if rt.reg != nil {
		if k, err := rt.DefaultKernel(ctx, vmm.QEMU); err == nil {
			return k.Path
		}
	}
	p := filepath.Join(kernel.DefaultCacheDir, kernel.CurrentLink)
	if info, err := kernel.Inspect(p); err == nil && kernel.CheckBootable(info, vmm.QEMU) == nil {
		return p
	}
	return ""
}

// binaryPath finds a VMM binary, or says how to install it.
func (rt *Runtime) binaryPath(driver string) (string, error) {
	name, hint := rt.qemu, "apt-get install qemu-system-x86 qemu-utils"
	if driver == vmm.Firecracker {
		name, hint = rt.fc, "install Firecracker (a release binary named firecracker on PATH), or run with --vmm qemu"
	}
	p, err := exec.LookPath(name)
	if err != nil {
		return "", errcode.New(errcode.VMMUnavailable, "%s not found on PATH", name).WithHint(hint)
	}
	return p, nil
}

// ChooseDriver picks the VMM for a run: want is auto, firecracker or
// qemu. Auto takes Firecracker when its binary is on PATH and KVM really
// works, else QEMU (with KVM when it works, else TCG).
func (rt *Runtime) ChooseDriver(ctx context.Context, want string) (Choice, error) {
	switch want {
	case "", Auto, vmm.Firecracker, vmm.QEMU:
	default:
		return Choice{}, errcode.New(errcode.InvalidArgument, "--vmm %q: want auto, firecracker or qemu", want)
	}
	fcPath, fcErr := rt.binaryPath(vmm.Firecracker)
	qPath, qErr := rt.binaryPath(vmm.QEMU)
	if want == vmm.QEMU || want == vmm.Firecracker {
		if want == vmm.QEMU && qErr != nil {
			return Choice{}, qErr
		}
		if want == vmm.Firecracker && fcErr != nil {
			return Choice{}, fcErr
		}
	}
	if want == vmm.QEMU || (want != vmm.Firecracker && fcErr != nil) {
		if qErr != nil {
			return Choice{}, errcode.New(errcode.VMMUnavailable, "no VMM: neither firecracker nor %s is on PATH", rt.qemu).
				WithHint("apt-get install qemu-system-x86 qemu-utils (or install Firecracker on a KVM host)")
		}
		k := rt.ProbeKVM(ctx, false)
		c := Choice{Driver: vmm.QEMU, Binary: qPath, Accel: qemu.AccelTCG, KVM: k.OK, KVMReason: k.Reason}
		if k.OK {
			c.Accel = qemu.AccelKVM
		}
		c.Reason = "requested with --vmm qemu"
		if want != vmm.QEMU {
			c.Reason = "firecracker is not on PATH"
		}
		return c, nil
	}
	k := rt.ProbeKVM(ctx, false)
	if !k.OK {
		if want == vmm.Firecracker {
			return Choice{}, errcode.New(errcode.KVMUnavailable, "Firecracker needs a working KVM: %s", k.Reason).
				WithHint("run with --vmm qemu (TCG works without KVM)")
		}
		if qErr != nil {
			return Choice{}, errcode.New(errcode.VMMUnavailable, "firecracker is installed but KVM does not work (%s), and %s is not on PATH", k.Reason, rt.qemu).
				WithHint("apt-get install qemu-system-x86 qemu-utils")
		}
		return Choice{Driver: vmm.QEMU, Binary: qPath, Accel: qemu.AccelTCG, KVMReason: k.Reason,
			Reason: "firecracker is installed but KVM does not work"}, nil
	}
	c := Choice{Driver: vmm.Firecracker, Binary: fcPath, KVM: true, KVMReason: k.Reason, Reason: "firecracker is on PATH and KVM works"}
	if want == vmm.Firecracker {
		c.Reason = "requested with --vmm firecracker"
	}
	return c, nil
}
