package project

import (
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"slices"
	"strings"

	"github.com/dustin/go-humanize"

	"github.com/hyphae-run/hyphae/guest"
)

// ldCachePath is where glibc's loader keeps its soname → path cache.
const ldCachePath = "/etc/ld.so.cache"

// multiarchTriplet is Debian's multiarch directory name for this machine.
func multiarchTriplet() string {
	switch runtime.GOARCH {
	case "arm64":
		return "aarch64-linux-gnu"
	case "riscv64":
		return "riscv64-linux-gnu"
	default:
		return "x86_64-linux-gnu"
	}
}

// standardLibDirs are the directories a loader searches without being told,
// in the order searched: Debian's multiarch ones, the lib64 ones other
// distributions use, then the plain ones. Libraries found elsewhere are
// announced to the guest's loader through LD_LIBRARY_PATH, since the image
// has no ld.so.cache.
func standardLibDirs() []string {
	t := multiarchTriplet()
	return []string{"/lib/" + t, "/usr/lib/" + t, "/lib64", "/usr/lib64", "/lib", "/usr/lib"}
}

// libResolver finds shared libraries the way the dynamic loader does:
// DT_RPATH (when there is no DT_RUNPATH), DT_RUNPATH, the ld.so.cache,
// then the standard directories.
type libResolver struct {
	cache map[string][]string
	dirs  []string
}

// newLibResolver reads the host's ld.so.cache; one that is missing or in a
// format not understood leaves only the standard directories.
func newLibResolver(log *slog.Logger) *libResolver {
	r := &libResolver{dirs: standardLibDirs()}
	b, err := os.ReadFile(ldCachePath)
	if err == nil {
		r.cache, err = parseLDCache(b)
	}
	if err != nil {
		log.Debug("not using the loader cache", "path", ldCachePath, "err", err)
	}
	return r
}

// closureFile is one file of a program's runtime closure.
type closureFile struct {
	image string // absolute path in the image
	host  string // real path on the host, to copy from
}

// closure is what the loader needs to run one dynamically linked program.
type closure struct {
	interp  string        // PT_INTERP; "" for a static program
	files   []closureFile // the loader first, then libraries in discovery order
	libDirs []string      // image directories outside standardLibDirs holding libraries
}

// elfObject is one object whose DT_NEEDED entries are still to resolve.
type elfObject struct {
	path   string   // as found (the loader's view)
	rpaths []string // DT_RPATH dirs of the loaders above it, inherited unless it has DT_RUNPATH
}

// isExecutable reports whether f is an ELF program (not a shared library):
// ET_EXEC, or ET_DYN with a loader or flagged as a PIE.
func isExecutable(f *elf.File) bool {
	switch f.Type {
	case elf.ET_EXEC:
		return true
	case elf.ET_DYN:
		if programInterp(f) != "" {
			return true
		}
		flags, err := f.DynValue(elf.DT_FLAGS_1)
		return err == nil && len(flags) > 0 && flags[0]&uint64(elf.DF_1_PIE) != 0
	}
	return false
}

// programInterp returns f's PT_INTERP, or "" when it has none.
func programInterp(f *elf.File) string {
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			b := make([]byte, p.Filesz)
			if _, err := p.ReadAt(b, 0); err != nil {
				return ""
			}
			return string(bytes.TrimRight(b, "\x00"))
		}
	}
	return ""
}

// resolve returns the closure of the executable at exe: its loader and
// every library it needs, recursively.
func (r *libResolver) resolve(exe string) (closure, error) {
	f, err := elf.Open(exe)
	if err != nil {
		return closure{}, err
	}
	defer f.Close()
	var c closure
	c.interp = programInterp(f)
	if c.interp == "" {
		return c, nil
	}
	if !path.IsAbs(c.interp) {
		return c, fmt.Errorf("%s names a relative program interpreter %q", exe, c.interp)
	}
	interpHost, err := filepath.EvalSymlinks(c.interp)
	if err != nil {
		return c, fmt.Errorf("%s needs the loader %s: %w", exe, c.interp, err)
	}
	c.files = append(c.files, closureFile{image: path.Clean(c.interp), host: interpHost})
	// The loader answers to its own soname; it is never loaded twice.
	selfNames := map[string]bool{path.Base(c.interp): true}
	if lf, err := elf.Open(interpHost); err == nil {
		if sn, err := lf.DynString(elf.DT_SONAME); err == nil && len(sn) > 0 {
			selfNames[sn[0]] = true
		}
		lf.Close()
	}

	seen := map[string]bool{}
	images := map[string]bool{path.Clean(c.interp): true}
	queue := []elfObject{{path: exe}}
	for len(queue) > 0 {
		obj := queue[0]
		queue = queue[1:]
		o, err := elf.Open(obj.path)
		if err != nil {
			return c, err
		}
		needed, _ := o.DynString(elf.DT_NEEDED)
		runpath := dynPaths(o, elf.DT_RUNPATH, obj.path)
		// An object with DT_RUNPATH ignores DT_RPATH, its own and its
		// loaders'; its dependencies still inherit its loaders' DT_RPATH.
		var own []string
		if len(runpath) == 0 {
			own = dynPaths(o, elf.DT_RPATH, obj.path)
		}
		chain := append(slices.Clip(own), obj.rpaths...)
		var rpaths []string
		if len(runpath) == 0 {
			rpaths = chain
		}
		o.Close()
		for _, name := range needed {
			if selfNames[name] || seen[name] {
				continue
			}
			seen[name] = true
			found, err := r.find(name, rpaths, runpath, f)
			if err != nil {
				return c, fmt.Errorf("%s (needed by %s): %w", name, obj.path, err)
			}
			host, err := filepath.EvalSymlinks(found)
			if err != nil {
				return c, err
			}
			img := path.Clean(found)
			if images[img] {
				continue
			}
			images[img] = true
			c.files = append(c.files, closureFile{image: img, host: host})
			if dir := path.Dir(img); !slices.Contains(r.dirs, dir) && !slices.Contains(c.libDirs, dir) {
				c.libDirs = append(c.libDirs, dir)
			}
			queue = append(queue, elfObject{path: found, rpaths: chain})
		}
	}
	return c, nil
}

// dynPaths returns the directories of a DT_RPATH or DT_RUNPATH entry with
// $ORIGIN expanded. Entries using other loader tokens ($LIB, $PLATFORM) are
// dropped: their value depends on the loader, not on the file.
func dynPaths(f *elf.File, tag elf.DynTag, objPath string) []string {
	vals, err := f.DynString(tag)
	if err != nil {
		return nil
	}
	origin := filepath.Dir(objPath)
	if real, err := filepath.EvalSymlinks(objPath); err == nil {
		origin = filepath.Dir(real)
	}
	var dirs []string
	for _, v := range vals {
		for _, d := range strings.Split(v, ":") {
			d = strings.ReplaceAll(strings.ReplaceAll(d, "${ORIGIN}", origin), "$ORIGIN", origin)
			if d == "" || strings.Contains(d, "$") || !path.IsAbs(d) {
				continue
			}
			dirs = append(dirs, path.Clean(d))
		}
	}
	return dirs
}

// find locates the library name for an object with the given search
// paths; exe fixes the ELF class and machine a candidate must have.
func (r *libResolver) find(name string, rpaths, runpath []string, exe *elf.File) (string, error) {
	var candidates []string
	if strings.Contains(name, "/") {
		candidates = []string{name}
	} else {
		for _, d := range rpaths {
			candidates = append(candidates, path.Join(d, name))
		}
		for _, d := range runpath {
			candidates = append(candidates, path.Join(d, name))
		}
		candidates = append(candidates, r.cache[name]...)
		for _, d := range r.dirs {
			candidates = append(candidates, path.Join(d, name))
		}
	}
	for _, c := range candidates {
		if matchesELF(c, exe) {
			return c, nil
		}
	}
	return "", errors.New("not found in its RPATH/RUNPATH, " + ldCachePath + " or " + strings.Join(r.dirs, ", "))
}

// matchesELF reports whether p is an ELF object of exe's class and machine,
// the check the loader makes before it accepts a candidate.
func matchesELF(p string, exe *elf.File) bool {
	f, err := elf.Open(p)
	if err != nil {
		return false
	}
	defer f.Close()
	return f.Class == exe.Class && f.Machine == exe.Machine && f.Type == elf.ET_DYN
}

// stageClosure copies the closure of the program at exe into root: the
// loader at its PT_INTERP path and each library at the path where the
// loader found it on the host, so that the loader in the image finds them
// the same way. It returns the environment the program needs
// (LD_LIBRARY_PATH when a library lives outside the standard directories)
// and how many bytes it copied.
func stageClosure(ctx context.Context, root *os.Root, exe string, opts Options) ([]guest.EnvVar, int64, error) {
	c, err := newLibResolver(opts.logger()).resolve(exe)
	if err != nil {
		return nil, 0, err
	}
	var total int64
	for _, f := range c.files {
		if err := ctx.Err(); err != nil {
			return nil, total, err
		}
		n, err := copyHostFile(root, f.host, imageName(f.image))
		if err != nil {
			return nil, total, fmt.Errorf("copying %s to %s: %w", f.host, f.image, err)
		}
		total += n
		opts.logger().Debug("staged library", "image", f.image, "host", f.host, "bytes", n)
	}
	if len(c.files) > 0 {
		progressf(opts, "copied the loader and %d shared libraries (%s)", len(c.files)-1, humanize.IBytes(uint64(total)))
	}
	var env []guest.EnvVar
	if len(c.libDirs) > 0 {
		env = append(env, guest.EnvVar{Key: "LD_LIBRARY_PATH", Value: strings.Join(c.libDirs, ":")})
	}
	return env, total, nil
}
