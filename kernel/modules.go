package kernel

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
	"github.com/hyphae-run/hyphae/rootfs"
)

// Modules images
//
// Debian's cloud kernel has its virtio drivers as modules, so a guest
// needs the .ko files to get a NIC. ModulesImage packs the named modules
// and everything they depend on, decompressed, flat into a small ext4
// with a guest.ModulesLoadFile listing them in load order; hyphae-init
// loads them from there (guest.CmdlineModules).
//
// Dependencies come from each module's own .modinfo "depends=" field, the
// data depmod builds modules.dep from: Debian's packages ship no
// modules.dep (depmod writes it on install), and reading the modules
// themselves works on any unpacked tree. Modules are decompressed on the
// host because finit_module(2) takes raw ELF unless the guest kernel has
// CONFIG_MODULE_DECOMPRESS (Debian 12's has not; its modules are plain
// .ko, Debian 13 compresses them with xz).

// modulesFormat is mixed into every modules image's digest: changing the
// image layout must change the names of cached images.
const modulesFormat = "hyphae-modules/1"

// maxModuleBytes bounds one decompressed module: the largest in-tree
// modules are tens of MiB, and a hostile archive must not fill memory.
const maxModuleBytes = 256 << 20

// moduleSuffixes are the file endings of modules, raw or compressed.
var moduleSuffixes = []string{".ko", ".ko.xz", ".ko.zst", ".ko.gz"}

// validModuleName is what depmod accepts as a module name once '-' is
// folded to '_'.
var validModuleName = regexp.MustCompile(`^[A-Za-z0-9_]{1,64}$`)

// moduleName turns a file name ("virtio-rng.ko.xz") or a requested name
// into the kernel's module name ("virtio_rng"), or "" when it is not a
// module.
func moduleName(file string) string {
	for _, suf := range moduleSuffixes {
		if base, ok := strings.CutSuffix(file, suf); ok {
			return strings.ReplaceAll(base, "-", "_")
		}
	}
	return ""
}

// moduleTree is an unpacked lib/modules/<release> directory.
type moduleTree struct {
	dir     string
	files   map[string]string // module name → path relative to dir
	builtin map[string]bool
}

// openModuleTree indexes dir: every module file under it, and the built-in
// modules listed in modules.builtin. When a name occurs twice the copy
// under updates/ wins, as with depmod's default search order.
func openModuleTree(ctx context.Context, dir string) (*moduleTree, error) {
	st, err := os.Stat(dir)
	if err != nil || !st.IsDir() {
		if err == nil {
			err = errors.New("not a directory")
		}
		return nil, &errcode.Error{Code: errcode.ModulesNotFound, Message: "kernel modules tree " + dir, Err: err,
			Hint: "fetch the kernel with scripts/fetch-kernel.sh, which keeps its modules"}
	}
	t := &moduleTree{dir: dir, files: map[string]string{}, builtin: map[string]bool{}}
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		name := moduleName(d.Name())
		if name == "" || !d.Type().IsRegular() {
			return nil
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		if prev, ok := t.files[name]; !ok || (strings.HasPrefix(rel, "updates/") && !strings.HasPrefix(prev, "updates/")) {
			t.files[name] = rel
		}
		return nil
	})
	if err != nil {
		return nil, errcode.Wrap(errcode.ModulesNotFound, err, "reading kernel modules tree %s", dir)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "modules.builtin")); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if n := moduleName(filepath.Base(strings.TrimSpace(line))); n != "" {
				t.builtin[n] = true
			}
		}
	}
	if len(t.files) == 0 {
		return nil, errcode.New(errcode.ModulesNotFound, "%s holds no kernel modules", dir).
			WithHint("point at a kernel's lib/modules/<release> directory")
	}
	return t, nil
}

// module is one resolved module, decompressed.
type module struct {
	name string
	data []byte
}

// resolve returns the modules names need, dependencies first. Names that
// are built into the kernel are left out; one that is neither a module
// nor built in is an error.
func (t *moduleTree) resolve(ctx context.Context, names []string) ([]module, error) {
	var order []module
	state := map[string]int{} // 1: being visited, 2: done
	var visit func(name, from string) error
	visit = func(name, from string) error {
		switch state[name] {
		case 1:
			return errcode.New(errcode.ModulesNotFound, "modules %s and %s depend on each other", from, name)
		case 2:
			return nil
		}
		if err := ctx.Err(); err != nil {
			return errcode.Wrap(errcode.ModulesNotFound, err, "resolving modules")
		}
		rel, ok := t.files[name]
		if !ok {
			if t.builtin[name] {
				state[name] = 2
				return nil
			}
			what := "requested"
			if from != "" {
				what = "needed by " + from
			}
			return errcode.New(errcode.ModulesNotFound, "module %s (%s) is not in %s", name, what, t.dir)
		}
		state[name] = 1
		data, err := readModule(filepath.Join(t.dir, rel))
		if err != nil {
			return err
		}
		deps, err := moduleDepends(data)
		if err != nil {
			return errcode.Wrap(errcode.InvalidKernel, err, "module %s", rel)
		}
		for _, d := range deps {
			if err := visit(d, name); err != nil {
				return err
			}
		}
		state[name] = 2
		order = append(order, module{name: name, data: data})
		return nil
	}
	for _, n := range names {
		if err := visit(n, ""); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// readModule reads a module file, decompressing it by its suffix.
func readModule(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, errcode.Wrap(errcode.ModulesNotFound, err, "open module")
	}
	defer f.Close()
	var r io.Reader = f
	switch {
	case strings.HasSuffix(path, ".ko.xz"):
		xr, err := xz.NewReader(f)
		if err != nil {
			return nil, errcode.Wrap(errcode.InvalidKernel, err, "decompress %s", path)
		}
		r = xr
	case strings.HasSuffix(path, ".ko.zst"):
		zr, err := zstd.NewReader(f, zstd.WithDecoderConcurrency(1))
		if err != nil {
			return nil, errcode.Wrap(errcode.InvalidKernel, err, "decompress %s", path)
		}
		defer zr.Close()
		r = zr
	case strings.HasSuffix(path, ".ko.gz"):
		gr, err := gzip.NewReader(f)
		if err != nil {
			return nil, errcode.Wrap(errcode.InvalidKernel, err, "decompress %s", path)
		}
		r = gr
	}
	data, err := io.ReadAll(io.LimitReader(r, maxModuleBytes+1))
	if err != nil {
		return nil, errcode.Wrap(errcode.InvalidKernel, err, "read %s", path)
	}
	if len(data) > maxModuleBytes {
		return nil, errcode.New(errcode.SizeLimit, "module %s is over %d bytes", path, maxModuleBytes)
	}
	return data, nil
}

// moduleDepends returns the "depends=" list of a module's .modinfo
// section.
func moduleDepends(ko []byte) ([]string, error) {
	f, err := elf.NewFile(bytes.NewReader(ko))
	if err != nil {
		return nil, fmt.Errorf("not an ELF module: %w", err)
	}
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, errors.New("no .modinfo section")
	}
	if sec.Size > maxModuleBytes {
		return nil, errors.New(".modinfo section too large")
	}
	b, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("reading .modinfo: %w", err)
	}
	return parseDepends(b)
}

// parseDepends reads the NUL-separated key=value records of a .modinfo
// section and returns its depends= entries (module names,
// comma-separated; empty for none).
func parseDepends(modinfo []byte) ([]string, error) {
	var deps []string
	for _, rec := range bytes.Split(modinfo, []byte{0}) {
		v, ok := bytes.CutPrefix(rec, []byte("depends="))
		if !ok {
			continue
		}
		for _, d := range strings.Split(string(v), ",") {
			if d == "" {
				continue
			}
			d = strings.ReplaceAll(d, "-", "_")
			if !validModuleName.MatchString(d) {
				return nil, fmt.Errorf("bad dependency %q", d)
			}
			if !slices.Contains(deps, d) {
				deps = append(deps, d)
			}
		}
	}
	return deps, nil
}

// ModulesImage packs the modules names (and, first, everything they
// depend on) from the unpacked lib/modules/<release> tree at modulesDir
// into an ext4 image in outDir, and returns its path and the load order
// (module names). Names may use '-' or '_'. Modules built into the kernel
// (modules.builtin) are left out; when that leaves nothing, path is "" and
// order empty. The image holds each module decompressed as <name>.ko and
// guest.ModulesLoadFile listing those files in load order. It is named
// after the SHA-256 of its contents (modules-<hex>.ext4), so it is built
// once per kernel and module set and shared by every VM; it is written
// under a temporary name and renamed, so outDir never holds a partial
// image.
func ModulesImage(ctx context.Context, modulesDir string, names []string, outDir string) (path string, order []string, err error) {
	if len(names) == 0 {
		return "", nil, errcode.New(errcode.InvalidArgument, "no modules named")
	}
	want := make([]string, 0, len(names))
	for _, n := range names {
		m := strings.ReplaceAll(n, "-", "_")
		if !validModuleName.MatchString(m) {
			return "", nil, errcode.New(errcode.InvalidArgument, "module name %q: want letters, digits, '_' or '-'", n)
		}
		want = append(want, m)
	}
	tree, err := openModuleTree(ctx, modulesDir)
	if err != nil {
		return "", nil, err
	}
	mods, err := tree.resolve(ctx, want)
	if err != nil {
		return "", nil, err
	}
	if len(mods) == 0 {
		return "", nil, nil
	}
	h := sha256.New()
	h.Write([]byte(modulesFormat + "\x00"))
	for _, m := range mods {
		order = append(order, m.name)
		var n [8]byte
		binary.BigEndian.PutUint64(n[:], uint64(len(m.data)))
		h.Write([]byte(m.name + "\x00"))
		h.Write(n[:])
		h.Write(m.data)
	}
	digest := hex.EncodeToString(h.Sum(nil))
	path = filepath.Join(outDir, "modules-"+digest+".ext4")
	if nonEmpty(path) {
		return path, order, nil
	}
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return "", nil, errcode.Wrap(errcode.MkfsFailed, err, "create %s", outDir)
	}
	if err := buildModulesImage(ctx, mods, digest, path); err != nil {
		return "", nil, err
	}
	return path, order, nil
}

// buildModulesImage stages mods in a temporary directory next to path and
// makes the ext4 image from it.
func buildModulesImage(ctx context.Context, mods []module, digest, path string) error {
	dir := filepath.Dir(path)
	stage, err := os.MkdirTemp(dir, ".modules-stage-")
	if err != nil {
		return errcode.Wrap(errcode.StagingFailed, err, "create staging directory")
	}
	defer os.RemoveAll(stage)
	var load strings.Builder
	for _, m := range mods {
		file := m.name + ".ko"
		if err := os.WriteFile(filepath.Join(stage, file), m.data, 0o644); err != nil {
			return errcode.Wrap(errcode.StagingFailed, err, "stage %s", file)
		}
		load.WriteString(file + "\n")
	}
	if err := os.WriteFile(filepath.Join(stage, guest.ModulesLoadFile), []byte(load.String()), 0o644); err != nil {
		return errcode.Wrap(errcode.StagingFailed, err, "stage %s", guest.ModulesLoadFile)
	}
	usage, err := rootfs.Measure(ctx, stage)
	if err != nil {
		return errcode.Wrap(errcode.StagingFailed, err, "measure staged modules")
	}
	plan, err := rootfs.PlanSize(usage, 0)
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, fmt.Sprintf(".modules-%s-%d.ext4", digest[:16], os.Getpid()))
	_ = os.Remove(tmp)
	if err := rootfs.MakeExt4(ctx, stage, tmp, rootfs.MkfsOptions{Plan: plan, Label: "hyphae-modules", Seed: digest}); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return errcode.Wrap(errcode.MkfsFailed, err, "move modules image into place")
	}
	return nil
}

// FindModules returns the lib/modules tree of the kernel at kernelPath:
// the first of, for its release R (see Release), each of searchDirs'
// modules-R (the cache layout of FetchDebian), the kernel file's own
// directory's modules-R, DefaultCacheDir/modules-R and the host's
// /lib/modules/R that exists. It fails with errcode.ModulesNotFound when
// none does, which for a kernel with its drivers built in is no problem.
func FindModules(kernelPath string, searchDirs ...string) (string, error) {
	release, err := Release(kernelPath)
	if err != nil {
		return "", err
	}
	var candidates []string
	for _, d := range append(slices.Clone(searchDirs), filepath.Dir(kernelPath), DefaultCacheDir) {
		candidates = append(candidates, filepath.Join(d, ModulesDirName(release)))
	}
	candidates = append(candidates, filepath.Join("/lib/modules", release))
	for _, c := range candidates {
		if st, err := os.Stat(c); err == nil && st.IsDir() {
			return c, nil
		}
	}
	return "", errcode.New(errcode.ModulesNotFound, "no modules tree for kernel release %s (looked in %s)", release, strings.Join(candidates, ", ")).
		WithHint("fetch the kernel with scripts/fetch-kernel.sh, which keeps its modules, or use a kernel with its drivers built in")
}

// bzImage setup header: kernel_version (u16) points, from 0x200, at a NUL
// terminated "<release> (<builder>) #<n> ..." string (boot protocol ≥ 2.00).
const (
	bzKernelVersionOffset = 0x20e
	bzKernelVersionBase   = 0x200
	maxVersionString      = 512
)

// Release returns the kernel release ("6.1.0-57-cloud-amd64", what
// uname -r prints in the guest and names its lib/modules directory) of a
// bzImage, read from its setup header.
func Release(kernelPath string) (string, error) {
	f, err := os.Open(kernelPath)
	if err != nil {
		return "", errcode.Wrap(errcode.KernelNotFound, err, "kernel %s", kernelPath)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return "", errcode.Wrap(errcode.InvalidKernel, err, "stat kernel %s", kernelPath)
	}
	release, err := bzRelease(f, st.Size())
	if err != nil {
		return "", fmt.Errorf("%s: %w", kernelPath, err)
	}
	return release, nil
}

// bzRelease parses the release out of a bzImage of the given size. It
// reads untrusted input and is fuzzed.
func bzRelease(r io.ReaderAt, size int64) (string, error) {
	if _, err := identifyBzImage(r, size); err != nil {
		return "", errcode.Wrap(errcode.InvalidKernel, err, "no kernel release: only a bzImage records one in its header")
	}
	var ptr [2]byte
	if _, err := r.ReadAt(ptr[:], bzKernelVersionOffset); err != nil {
		return "", errcode.Wrap(errcode.InvalidKernel, err, "read bzImage header")
	}
	off := int64(binary.LittleEndian.Uint16(ptr[:]))
	if off == 0 {
		return "", errcode.New(errcode.InvalidKernel, "bzImage records no kernel version")
	}
	buf := make([]byte, maxVersionString)
	n, err := r.ReadAt(buf, bzKernelVersionBase+off)
	if n == 0 && err != nil {
		return "", errcode.Wrap(errcode.InvalidKernel, err, "read the bzImage's kernel version")
	}
	s := buf[:n]
	if i := bytes.IndexByte(s, 0); i >= 0 {
		s = s[:i]
	}
	release, _, _ := strings.Cut(string(s), " ")
	if !validRelease.MatchString(release) {
		return "", errcode.New(errcode.InvalidKernel, "bzImage kernel version %q does not start with a release", s)
	}
	return release, nil
}

// validRelease keeps a release usable as a directory name.
var validRelease = regexp.MustCompile(`^[0-9][A-Za-z0-9._+~-]{0,126}$`)
