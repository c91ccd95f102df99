package vm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/kernel"
	"github.com/hyphae-run/hyphae/network"
	"github.com/hyphae-run/hyphae/vmm"
	"github.com/hyphae-run/hyphae/vmm/firecracker"
	"github.com/hyphae-run/hyphae/vmm/qemu"
)

// Network is what the runtime needs of host networking. *network.Manager
// implements it; by default the runtime makes one over the registry's
// lease allocations, working in hyphae's own network namespace.
//
// A home's networked VMs live in one network namespace: run every hyphae
// command of that home that starts, stops or reconciles networked VMs in
// it. Reclaim, which a networked start runs first, removes hyphae TAPs of
// that namespace that the home's allocations do not know.
type Network interface {
	Setup(ctx context.Context, vmID string, o network.Options) (*network.Attachment, error)
	Teardown(ctx context.Context, vmID string) error
	Reclaim(ctx context.Context, live func(vmID string) bool) error
}

// NetworkDetails is a VM's network as its row records it.
type NetworkDetails struct {
	TapName string `json:"tap_name"`
	MAC     string `json:"mac"`
	Subnet  string `json:"subnet"`
	HostIP  string `json:"host_ip"`
	GuestIP string `json:"guest_ip"`
	NAT     bool   `json:"nat"`
	// Allow are the --allow entries, as ParseAllow reads them.
	Allow []string `json:"allow,omitempty"`
}

// JailDetails is how a jailed Firecracker VM was jailed, which stopping or
// cleaning it up from another hyphae process needs (its API socket and
// jail directory are named after them).
type JailDetails struct {
	JailerBinary  string `json:"jailer_binary,omitempty"`
	ChrootBaseDir string `json:"chroot_base_dir"`
	CgroupVersion int    `json:"cgroup_version"`
	UID           int    `json:"uid"`
	GID           int    `json:"gid"`
	NetNS         string `json:"netns,omitempty"`
	// Firecracker is the Firecracker binary the jail is named after.
	Firecracker string `json:"firecracker"`
}

func (j JailDetails) options() firecracker.JailOptions {
	return firecracker.JailOptions{JailerBinary: j.JailerBinary, UID: j.UID, GID: j.GID, ChrootBaseDir: j.ChrootBaseDir,
		CgroupVersion: j.CgroupVersion, NetNS: j.NetNS}
}

// cleanupJail removes a jailed VM's jail directory and cgroups; a VM that
// was not jailed has none.
func (rt *Runtime) cleanupJail(j *JailDetails, id string) error {
	if j == nil {
		return nil
	}
	return firecracker.CleanupJail(j.options(), j.Firecracker, id)
}

// network returns the runtime's network backend, making the default one
// on first use (so a bad pool only matters to networked runs).
func (rt *Runtime) network() (Network, error) {
	rt.netMu.Lock()
	defer rt.netMu.Unlock()
	if rt.net != nil {
		return rt.net, nil
	}
	reg, err := rt.registry()
	if err != nil {
		return nil, err
	}
	m, err := network.New(network.Config{Pool: rt.netPool, Allocations: reg.NetAllocations(), Logger: rt.log})
	if err != nil {
		return nil, err
	}
	rt.net = m
	return m, nil
}

// leases returns the ids of the VMs that hold a network lease. Only those
// make the runtime touch netlink or nftables, so VMs without a network
// never need the privileges for it.
func (rt *Runtime) leases(ctx context.Context) (map[string]bool, error) {
	reg, err := rt.registry()
	if err != nil {
		return nil, err
	}
	list, err := reg.NetAllocations().List(ctx)
	if err != nil {
		return nil, err
	}
	ids := make(map[string]bool, len(list))
	for _, a := range list {
		ids[a.VMID] = true
	}
	return ids, nil
}

// teardownNetwork removes id's TAP and rules and releases its lease, when
// it holds one.
func (rt *Runtime) teardownNetwork(ctx context.Context, id string) error {
	held, err := rt.leases(ctx)
	if err != nil || !held[id] {
		return err
	}
	n, err := rt.network()
	if err != nil {
		return err
	}
	return n.Teardown(ctx, id)
}

// reclaimNetwork removes the TAPs, rules and leases of VMs that are gone.
// A VM is live while its row exists: a start records its row before it
// takes a lease, and teardown releases the lease before deleting the row.
func (rt *Runtime) reclaimNetwork(ctx context.Context, n Network) error {
	return n.Reclaim(ctx, func(id string) bool {
		_, err := rt.reg.GetVM(ctx, id)
		// Only a certain "no such row" reclaims: a database error keeps it.
		return !errcode.HasCode(err, errcode.NotFound)
	})
}

// checkNetworkOptions refuses network settings that need --network.
func checkNetworkOptions(o RunOptions) error {
	if !o.Network && (o.NoNAT || len(o.Allow) > 0) {
		return errcode.New(errcode.InvalidArgument, "--no-nat and --allow configure the VM's network: add --network")
	}
	return nil
}

// jailFor returns how a run is jailed (nil without Jail): Firecracker
// only, as the dedicated system user.
func (rt *Runtime) jailFor(o RunOptions, c Choice) (*JailDetails, error) {
	if !o.Jail {
		return nil, nil
	}
	if c.Driver != vmm.Firecracker {
		return nil, errcode.New(errcode.InvalidArgument, "--jail runs Firecracker under its jailer, but this run uses %s (%s)", c.Driver, c.Reason).
			WithHint("run with --vmm firecracker on a host with Firecracker, its jailer and a working KVM, or drop --jail")
	}
	uid, gid, err := firecracker.LookupJailUser("")
	if err != nil {
		return nil, err
	}
	cgroups := firecracker.DefaultCgroupVersion
	if firecracker.CheckCgroups(cgroups) != nil && firecracker.CheckCgroups(1) == nil {
		// Hosts whose cpu and memory controllers are still on the v1
		// hierarchy.
		cgroups = 1
	}
	j := &JailDetails{ChrootBaseDir: firecracker.DefaultChrootBaseDir, CgroupVersion: cgroups,
		UID: uid, GID: gid, Firecracker: c.Binary}
	if o.Network {
		// The jailed Firecracker joins the namespace its TAP is in, which
		// is hyphae's own; the path stays valid while hyphae starts it.
		j.NetNS = fmt.Sprintf("/proc/%d/ns/net", os.Getpid())
	}
	return j, nil
}

// attachNetwork gives the VM its network: a lease, TAP and rules from
// Setup, then the NIC and the guest's network boot arguments in spec. The
// caller tears the network down again when anything later fails.
func (rt *Runtime) attachNetwork(ctx context.Context, n Network, spec *vmm.Spec, o RunOptions, c Choice, jail *JailDetails) (*NetworkDetails, error) {
	opts := network.Options{NoNAT: o.NoNAT, Allow: o.Allow}
	if jail != nil {
		// The unprivileged Firecracker opens the TAP itself.
		opts.UID, opts.GID = uint32(jail.UID), uint32(jail.GID)
	}
	att, err := n.Setup(ctx, spec.ID, opts)
	if err != nil {
		return nil, err
	}
	nic := vmm.NetworkInterface{ID: "eth0", TapName: att.TapName, MAC: att.MAC.String()}
	switch c.Driver {
	case vmm.QEMU:
		reg, err := rt.registry()
		if err != nil {
			return nil, err
		}
		err = qemu.AddNetwork(ctx, spec, nic, att.BootArgs, qemu.NetworkOptions{
			ModulesCache:  filepath.Join(reg.KernelsDir(), modulesCacheDir),
			ModulesSearch: rt.kernelSearch(spec.Kernel),
			Logger:        rt.log,
		})
		if err != nil {
			return nil, err
		}
	case vmm.Firecracker:
		// Firecracker's kernels have their NIC driver built in.
		spec.Network = append(spec.Network, nic)
		spec.BootArgs = strings.TrimSpace(spec.BootArgs + " " + att.BootArgs)
	default:
		return nil, errcode.New(errcode.VMMUnavailable, "unknown driver %q", c.Driver)
	}
	d := &NetworkDetails{TapName: att.TapName, MAC: att.MAC.String(), Subnet: att.Subnet.String(),
		HostIP: att.HostIP.String(), GuestIP: att.GuestIP.String(), NAT: !o.NoNAT}
	for _, a := range o.Allow {
		d.Allow = append(d.Allow, a.String())
	}
	return d, nil
}

// Directories under the registry's kernels/ (GC leaves directories alone).
const (
	// modulesCacheDir holds the modules images qemu.AddNetwork builds,
	// shared by every VM.
	modulesCacheDir = "modules"
	// moduleTreesDir holds, per kernel release R, a symlink modules-R to
	// the modules tree found next to a kernel when it was added (the
	// registry stores kernels under content names, away from the tree).
	// Only the link's target directory is used, never a copy: trees are
	// around 100 MB.
	moduleTreesDir = "module-trees"
	// kernelConfigsDir holds copies of the build configs found beside
	// kernels when they were added, named for kernel.FindConfig's search
	// (kernel.ConfigFileName of the stored file).
	kernelConfigsDir = "kernel-configs"
)

// kernelConfigsDir is where keepConfig copies kernels' configs.
func (rt *Runtime) kernelConfigsDir() string {
	return filepath.Join(rt.reg.KernelsDir(), kernelConfigsDir)
}

// kernelSearch returns the directories where the qemu driver looks for
// the files of the kernel at kernelPath that the registry keeps apart from
// it: its modules tree (modulesSearch) and its build config.
func (rt *Runtime) kernelSearch(kernelPath string) []string {
	if rt.reg == nil {
		return nil
	}
	return append(rt.modulesSearch(kernelPath), rt.kernelConfigsDir())
}

// modulesSearch returns the directory holding the modules tree that
// linkModules recorded for the kernel's release, if any. The link is
// resolved here because the modules code reads a tree only by its real
// path.
func (rt *Runtime) modulesSearch(kernelPath string) []string {
	release, err := kernel.Release(kernelPath)
	if err != nil {
		return nil
	}
	tree, err := filepath.EvalSymlinks(filepath.Join(rt.reg.KernelsDir(), moduleTreesDir, kernel.ModulesDirName(release)))
	if err != nil {
		return nil
	}
	return []string{filepath.Dir(tree)}
}

// linkModules records where the modules tree of the bzImage at src is,
// when its directory holds one (modules-<release>, the layout of
// `hyphae kernel fetch --debian` and scripts/fetch-kernel.sh). Kernels
// without a tree (drivers built in, or an ELF vmlinux) need none.
func (rt *Runtime) linkModules(src string) error {
	real, err := filepath.EvalSymlinks(src)
	if err == nil {
		real, err = filepath.Abs(real)
	}
	if err != nil {
		return errcode.Wrap(errcode.KernelNotFound, err, "kernel %s", src)
	}
	release, err := kernel.Release(real)
	if err != nil {
		return nil // not a bzImage: nothing to find
	}
	tree := filepath.Join(filepath.Dir(real), kernel.ModulesDirName(release))
	if st, err := os.Stat(tree); err != nil || !st.IsDir() {
		return nil
	}
	dir := filepath.Join(rt.reg.KernelsDir(), moduleTreesDir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return errcode.Wrap(errcode.RegistryError, err, "create %s", dir)
	}
	link := filepath.Join(dir, kernel.ModulesDirName(release))
	tmp := link + ".new"
	_ = os.Remove(tmp)
	if err := os.Symlink(tree, tmp); err != nil {
		return errcode.Wrap(errcode.RegistryError, err, "link the modules tree %s", tree)
	}
	if err := os.Rename(tmp, link); err != nil {
		return errors.Join(errcode.Wrap(errcode.RegistryError, err, "link the modules tree %s", tree), os.Remove(tmp))
	}
	rt.log.Info("kernel modules tree recorded", "release", release, "tree", tree)
	return nil
}
