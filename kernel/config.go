package kernel

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/hyphae-run/hyphae/errcode"
)

// Config is a kernel's build configuration: each set CONFIG_ symbol,
// without the prefix, and its value ("y", "m", a number or a quoted
// string). Symbols that are "not set" are absent.
type Config map[string]string

// Builtin reports whether the symbol (without "CONFIG_") is built in.
func (c Config) Builtin(symbol string) bool { return c[symbol] == "y" }

// maxConfigBytes bounds a configuration, embedded or in a file. Real ones
// are 100–300 KiB.
const maxConfigBytes = 4 << 20

// ParseConfig reads a .config (what `make olddefconfig` writes, Debian's
// /boot/config-*, /proc/config.gz decompressed). Comments and blank lines
// are skipped; anything else must be CONFIG_<SYMBOL>=<value>. It reads
// untrusted input and is fuzzed.
func ParseConfig(r io.Reader) (Config, error) {
	c := Config{}
	lr := &io.LimitedReader{R: r, N: maxConfigBytes + 1}
	sc := bufio.NewScanner(lr)
	sc.Buffer(make([]byte, 0, 4096), 64<<10)
	line := 0
	for sc.Scan() {
		line++
		s := strings.TrimSpace(sc.Text())
		if s == "" || s[0] == '#' {
			continue
		}
		k, v, ok := strings.Cut(s, "=")
		sym, isConfig := strings.CutPrefix(k, "CONFIG_")
		if !ok || !isConfig || sym == "" {
			if lr.N <= 0 {
				break // a line cut at the bound: reported below
			}
			return nil, errcode.New(errcode.InvalidKernel, "kernel config line %d: want CONFIG_<SYMBOL>=<value>, got %.60q", line, s)
		}
		c[sym] = v
	}
	if err := sc.Err(); err != nil {
		return nil, errcode.Wrap(errcode.InvalidKernel, err, "reading kernel config")
	}
	if lr.N <= 0 {
		// Cut at the bound, the last line would parse as a wrong value.
		return nil, errcode.New(errcode.SizeLimit, "kernel config is over %d bytes", maxConfigBytes)
	}
	return c, nil
}

// The markers around the gzip'd configuration that CONFIG_IKCONFIG embeds
// in the kernel (kernel/configs.c, what /proc/config.gz serves). The start
// marker is matched with the gzip magic after it, as the kernel's
// scripts/extract-ikconfig does, so that the marker's own text elsewhere in
// the image is not mistaken for it.
var (
	ikconfigStart = []byte("IKCFG_ST")
	gzipMagic     = []byte{0x1f, 0x8b, 0x08}
	ikconfigEnd   = []byte("IKCFG_ED")
)

// EmbeddedConfig returns the configuration a kernel built with
// CONFIG_IKCONFIG carries, read from the file without booting it. Only an
// uncompressed image (an ELF vmlinux) shows it; in a bzImage it sits inside
// the compressed payload, and ok is false as for a kernel without one.
func EmbeddedConfig(r io.Reader) (c Config, ok bool, err error) {
	gz, found, err := findIKConfig(r)
	if err != nil || !found {
		return nil, false, err
	}
	zr, err := gzip.NewReader(bytes.NewReader(gz))
	if err != nil {
		return nil, false, errcode.Wrap(errcode.InvalidKernel, err, "embedded kernel config")
	}
	c, err = ParseConfig(zr)
	if err != nil {
		return nil, false, err
	}
	return c, true, nil
}

// findIKConfig scans r for the first IKCFG_ST marker followed by gzip
// data and returns what lies between it and the next IKCFG_ED. A start
// marker whose end does not follow within about maxConfigBytes is an
// error (a damaged image), not a reason to look further. It keeps one
// chunk plus the block in memory, never the whole kernel.
func findIKConfig(r io.Reader) ([]byte, bool, error) {
	const chunk = 1 << 20
	buf := make([]byte, 0, 2*chunk)
	tmp := make([]byte, chunk)
	startMarker := append(slices.Clone(ikconfigStart), gzipMagic...)
	var block []byte // non-nil once the start marker was seen
	for {
		n, rerr := io.ReadFull(r, tmp)
		buf = append(buf, tmp[:n]...)
		if block == nil {
			if i := bytes.Index(buf, startMarker); i >= 0 {
				block = slices.Clone(buf[i+len(ikconfigStart):])
				buf = buf[:0]
			} else if keep := len(startMarker) - 1; len(buf) > keep {
				// Keep a marker-sized tail: the marker may straddle reads.
				buf = append(buf[:0], buf[len(buf)-keep:]...)
			}
		} else {
			block = append(block, buf...)
			buf = buf[:0]
		}
		if block != nil {
			if j := bytes.Index(block, ikconfigEnd); j >= 0 {
				return block[:j], true, nil
			}
			if len(block) > maxConfigBytes {
				return nil, false, errcode.New(errcode.InvalidKernel, "embedded kernel config has no end marker within %d bytes", maxConfigBytes)
			}
		}
		switch rerr {
		case nil:
		case io.EOF, io.ErrUnexpectedEOF:
			return nil, false, nil
		default:
			return nil, false, errcode.Wrap(errcode.InvalidKernel, rerr, "reading kernel")
		}
	}
}

// FindConfig returns the build configuration of the kernel at kernelPath
// and where it was found: the one embedded in the image
// (EmbeddedConfig), else the first config file that exists of
// config-S next to a vmlinuz-S or vmlinux-S (also behind a symlink such
// as scripts/fetch-kernel.sh's vmlinuz); config-<file name> in each of
// searchDirs (where a registry keeps the configs of kernels it stores
// under content names); and config-R for a bzImage's release R (see
// Release) in each of searchDirs, the kernel's directory, DefaultCacheDir
// and /boot. It fails with errcode.ConfigNotFound when there is none;
// callers then fall back to what they assume of a stock distribution
// kernel.
func FindConfig(kernelPath string, searchDirs ...string) (Config, ConfigSource, error) {
	f, err := os.Open(kernelPath)
	if err != nil {
		code := errcode.InvalidKernel
		if errors.Is(err, fs.ErrNotExist) {
			code = errcode.KernelNotFound
		}
		return nil, ConfigSource{}, errcode.Wrap(code, err, "kernel %s", kernelPath)
	}
	c, ok, err := EmbeddedConfig(f)
	f.Close()
	if err != nil {
		return nil, ConfigSource{}, err
	}
	if ok {
		return c, ConfigSource{Path: kernelPath, Embedded: true}, nil
	}
	candidates := sidecarConfigs(kernelPath)
	for _, d := range searchDirs {
		candidates = append(candidates, filepath.Join(d, ConfigFileName(kernelPath)))
	}
	if release, err := Release(kernelPath); err == nil {
		for _, d := range append(slices.Clone(searchDirs), filepath.Dir(kernelPath), DefaultCacheDir, "/boot") {
			candidates = append(candidates, filepath.Join(d, "config-"+release))
		}
	}
	for _, p := range candidates {
		cf, err := os.Open(p)
		if err != nil {
			continue
		}
		c, err := ParseConfig(cf)
		cf.Close()
		if err != nil {
			return nil, ConfigSource{}, fmt.Errorf("%s: %w", p, err)
		}
		return c, ConfigSource{Path: p}, nil
	}
	return nil, ConfigSource{}, errcode.New(errcode.ConfigNotFound, "no build configuration for kernel %s (not embedded; looked for %s)", kernelPath, strings.Join(candidates, ", ")).
		WithHint("build the kernel with CONFIG_IKCONFIG=y, or put its .config beside it as config-<suffix of vmlinuz-/vmlinux->")
}

// ConfigSource says where FindConfig found a configuration: embedded in
// the kernel file Path, or in the config file Path.
type ConfigSource struct {
	Path     string `json:"path"`
	Embedded bool   `json:"embedded,omitempty"`
}

func (s ConfigSource) String() string {
	if s.Embedded {
		return s.Path + " (embedded)"
	}
	return s.Path
}

// ConfigFileName is the name FindConfig looks for in its search
// directories for the kernel file at kernelPath: config-<file name>.
func ConfigFileName(kernelPath string) string { return "config-" + filepath.Base(kernelPath) }

// sidecarConfigs names config-S for a kernel file vmlinuz-S or vmlinux-S,
// for the path as given and for the file a symlink points to.
func sidecarConfigs(kernelPath string) []string {
	var out []string
	paths := []string{kernelPath}
	if real, err := filepath.EvalSymlinks(kernelPath); err == nil && real != kernelPath {
		paths = append(paths, real)
	}
	for _, p := range paths {
		base := filepath.Base(p)
		for _, prefix := range []string{"vmlinuz-", "vmlinux-"} {
			if s, ok := strings.CutPrefix(base, prefix); ok && s != "" {
				out = append(out, filepath.Join(filepath.Dir(p), "config-"+s))
			}
		}
	}
	return out
}
