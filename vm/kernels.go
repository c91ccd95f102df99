package vm

import (
	"context"
	"errors"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"slices"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/kernel"
	"github.com/hyphae-run/hyphae/registry"
	"github.com/hyphae-run/hyphae/vmm"
	"github.com/hyphae-run/hyphae/vmm/qemu"
)

// Kernel is a registered kernel with the VMMs it is the default for.
type Kernel struct {
	registry.Kernel
	// DefaultFor lists the VMMs that boot this kernel when a run names
	// none.
	DefaultFor []string `json:"default_for"`
}

// AddKernel validates the kernel at path, stores it content-addressed in
// the registry's kernels/ and registers it as name (default: the file's
// base name after symlinks). Adding a name again replaces it, which also
// makes it the newest, hence the default for the VMMs it boots. A bzImage
// whose directory holds its modules tree (modules-<release>, as
// `kernel fetch --debian` leaves it) gets that tree recorded by release
// in kernels/module-trees, where networked QEMU runs find the NIC driver
// modules; the tree itself stays where it is, so it must not be removed.
func (rt *Runtime) AddKernel(ctx context.Context, src, name string) (Kernel, error) {
	reg, err := rt.registry()
	if err != nil {
		return Kernel{}, err
	}
	if name == "" {
		real, err := filepath.EvalSymlinks(src)
		if err != nil {
			return Kernel{}, errcode.Wrap(errcode.KernelNotFound, err, "kernel %s", src)
		}
		name = filepath.Base(real)
	}
	if err := registry.ValidateKernelName(name); err != nil {
		return Kernel{}, err
	}
	if _, err := os.Stat(src); err != nil {
		return Kernel{}, errcode.Wrap(errcode.KernelNotFound, err, "kernel %s", src)
	}
	dest, info, err := kernel.Store(src, reg.KernelsDir())
	if err != nil {
		return Kernel{}, err
	}
	if err := rt.linkModules(src); err != nil {
		rt.removeUnreferenced(ctx, dest)
		return Kernel{}, err
	}
	if err := rt.keepConfig(src, dest); err != nil {
		rt.removeUnreferenced(ctx, dest)
		return Kernel{}, err
	}
	return rt.register(ctx, name, dest, info)
}

// keepConfig copies the build config found beside the kernel file src
// (kernel.FindConfig) into kernels/kernel-configs under the name
// FindConfig looks for with the stored file dest, so that the qemu driver
// still reads it once the kernel lives under its content name. A config
// embedded in the image needs no copy, and a kernel without one is fine
// (the driver then assumes a stock kernel).
func (rt *Runtime) keepConfig(src, dest string) error {
	_, from, err := kernel.FindConfig(src)
	switch {
	case errcode.HasCode(err, errcode.ConfigNotFound):
		return nil
	case err != nil:
		return err
	case from.Embedded:
		return nil
	}
	b, err := os.ReadFile(from.Path)
	if err != nil {
		return errcode.Wrap(errcode.RegistryError, err, "keep the kernel config %s", from)
	}
	dir := rt.kernelConfigsDir()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return errcode.Wrap(errcode.RegistryError, err, "create %s", dir)
	}
	target := filepath.Join(dir, kernel.ConfigFileName(dest))
	tmp := target + ".new"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return errcode.Wrap(errcode.RegistryError, err, "keep the kernel config %s", from)
	}
	if err := os.Rename(tmp, target); err != nil {
		return errors.Join(errcode.Wrap(errcode.RegistryError, err, "keep the kernel config %s", from), os.Remove(tmp))
	}
	rt.log.Info("kernel config recorded", "config", from)
	return nil
}

// FetchKernel downloads url (checked against sha256hex) into kernels/ and
// registers it as name (default: the URL's last path element).
func (rt *Runtime) FetchKernel(ctx context.Context, rawURL, sha256hex, name string) (Kernel, error) {
	reg, err := rt.registry()
	if err != nil {
		return Kernel{}, err
	}
	u, err := url.Parse(rawURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return Kernel{}, errcode.New(errcode.InvalidArgument, "%q is not an http(s) URL", rawURL)
	}
	if name == "" {
		name = path.Base(u.Path)
	}
	if err := registry.ValidateKernelName(name); err != nil {
		return Kernel{}, err
	}
	dest, err := kernel.Fetcher{Logger: rt.log}.Fetch(ctx, rawURL, sha256hex, reg.KernelsDir())
	if err != nil {
		return Kernel{}, err
	}
	info, err := kernel.Inspect(dest)
	if err != nil {
		rt.removeUnreferenced(ctx, dest)
		return Kernel{}, err
	}
	return rt.register(ctx, name, dest, info)
}

// FetchDebianKernel gets Debian's cloud kernel through apt into cacheDir
// (kernel.DefaultCacheDir when empty) and adds it as name (default: its
// file name, vmlinuz-<version>).
func (rt *Runtime) FetchDebianKernel(ctx context.Context, cacheDir, name string) (Kernel, error) {
	if cacheDir == "" {
		cacheDir = kernel.DefaultCacheDir
	}
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return Kernel{}, &errcode.Error{Code: errcode.FetchFailed, Message: "create " + cacheDir, Err: err,
			Hint: "run as root, or pick a writable --cache-dir"}
	}
	p, err := kernel.FetchDebian(ctx, cacheDir)
	if err != nil {
		return Kernel{}, err
	}
	return rt.AddKernel(ctx, p, name)
}

func (rt *Runtime) register(ctx context.Context, name, dest string, info kernel.Info) (Kernel, error) {
	k := registry.Kernel{Name: name, Path: dest, SHA256: info.SHA256, Format: info.Format, Arch: info.Arch,
		SizeBytes: info.SizeBytes, VMMs: info.VMMs}
	if err := rt.reg.PutKernel(ctx, k); err != nil {
		rt.removeUnreferenced(ctx, dest)
		return Kernel{}, err
	}
	rt.log.Info("kernel registered", "name", name, "format", info.Format, "vmms", info.VMMs)
	all, err := rt.ListKernels(ctx)
	if err != nil {
		return Kernel{}, err
	}
	for _, got := range all {
		if got.Name == name {
			return got, nil
		}
	}
	return Kernel{}, errcode.New(errcode.Conflict, "kernel %s was removed while it was being added", name)
}

// removeUnreferenced removes a stored kernel file that no row names, so a
// failed add leaves nothing behind.
func (rt *Runtime) removeUnreferenced(ctx context.Context, p string) {
	ks, err := rt.reg.ListKernels(ctx)
	if err != nil {
		return
	}
	for _, k := range ks {
		if k.Path == p {
			return
		}
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		rt.log.Warn("cannot remove kernel file", "path", p, "err", err)
	}
}

// ListKernels returns every registered kernel with the VMMs it is the
// default for.
func (rt *Runtime) ListKernels(ctx context.Context) ([]Kernel, error) {
	reg, err := rt.registry()
	if err != nil {
		return nil, err
	}
	ks, err := reg.ListKernels(ctx)
	if err != nil {
		return nil, err
	}
	defaults := map[string]string{}
	for _, d := range []string{vmm.Firecracker, vmm.QEMU} {
		if k, ok := defaultOf(ks, d); ok {
			defaults[d] = k.Name
		}
	}
	out := make([]Kernel, 0, len(ks))
	for _, k := range ks {
		kk := Kernel{Kernel: k, DefaultFor: []string{}}
		for _, d := range []string{vmm.Firecracker, vmm.QEMU} {
			if defaults[d] == k.Name {
				kk.DefaultFor = append(kk.DefaultFor, d)
			}
		}
		out = append(out, kk)
	}
	return out, nil
}

// QEMUDevices says which devices the qemu driver gives the kernel at
// kernelPath (qemu.DeviceSummary), with the files the registry keeps for
// it taken into account.
func (rt *Runtime) QEMUDevices(kernelPath string) (string, error) {
	return qemu.DeviceSummary(kernelPath, rt.kernelSearch(kernelPath))
}

// RemoveKernel unregisters a kernel (its stored file goes with its last
// name).
func (rt *Runtime) RemoveKernel(ctx context.Context, name string) error {
	reg, err := rt.registry()
	if err != nil {
		return err
	}
	if err := reg.RemoveKernel(ctx, name); err != nil {
		if errcode.HasCode(err, errcode.NotFound) {
			return errcode.New(errcode.KernelNotFound, "no kernel named %q", name).WithHint("`hyphae kernel list` shows the registered kernels")
		}
		return err
	}
	return nil
}

// DefaultKernel returns the kernel a run on driver uses when it names
// none: the most recently added kernel of the host's architecture that
// driver can boot.
func (rt *Runtime) DefaultKernel(ctx context.Context, driver string) (registry.Kernel, error) {
	reg, err := rt.registry()
	if err != nil {
		return registry.Kernel{}, err
	}
	ks, err := reg.ListKernels(ctx)
	if err != nil {
		return registry.Kernel{}, err
	}
	if k, ok := defaultOf(ks, driver); ok {
		return k, nil
	}
	e := errcode.New(errcode.KernelNotFound, "no registered kernel can boot %s", driver)
	if driver == vmm.QEMU {
		return registry.Kernel{}, e.WithHint("`hyphae kernel fetch --debian` (Debian's cloud kernel), or `hyphae kernel add <bzImage>`")
	}
	return registry.Kernel{}, e.WithHint("`hyphae kernel add <vmlinux>` with an uncompressed ELF vmlinux, or run with --vmm qemu")
}

func defaultOf(ks []registry.Kernel, driver string) (registry.Kernel, bool) {
	var best registry.Kernel
	found := false
	for _, k := range ks {
		if !slices.Contains(k.VMMs, driver) || k.Arch != hostArch() {
			continue
		}
		if !found || k.CreatedAt.After(best.CreatedAt) {
			best, found = k, true
		}
	}
	return best, found
}

func hostArch() string {
	if runtime.GOARCH == "arm64" {
		return kernel.ArchAarch64
	}
	return kernel.ArchX86_64
}

// ResolvedKernel is the kernel a run boots.
type ResolvedKernel struct {
	// Name is the registry name, or the path for a kernel given by path.
	Name string
	Path string
	Info kernel.Info
}

// ResolveKernel finds the kernel for a run on driver: ref is a registered
// name, a file path, or empty for the driver's default. The file is
// inspected and refused with kernel.CheckBootable's coded error when the
// driver cannot boot it, before anything is spawned.
func (rt *Runtime) ResolveKernel(ctx context.Context, ref, driver string) (ResolvedKernel, error) {
	var r ResolvedKernel
	switch {
	case ref == "":
		k, err := rt.DefaultKernel(ctx, driver)
		if err != nil {
			return r, err
		}
		r = ResolvedKernel{Name: k.Name, Path: k.Path}
	default:
		if rt.reg != nil {
			if k, err := rt.reg.LookupKernel(ctx, ref); err == nil {
				r = ResolvedKernel{Name: k.Name, Path: k.Path}
				break
			}
		}
		if _, err := os.Stat(ref); err != nil {
			return r, errcode.New(errcode.KernelNotFound, "no kernel named %q and no such file", ref).
				WithHint("`hyphae kernel list` shows the registered kernels")
		}
		abs, err := filepath.Abs(ref)
		if err != nil {
			return r, errcode.Wrap(errcode.KernelNotFound, err, "kernel %s", ref)
		}
		r = ResolvedKernel{Name: abs, Path: abs}
	}
	info, err := kernel.Inspect(r.Path)
	if err != nil {
		return r, err
	}
	if err := kernel.CheckBootable(info, driver); err != nil {
		return r, err
	}
	r.Info = info
	return r, nil
}
