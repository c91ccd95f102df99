package kernel

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/hyphae-run/hyphae/errcode"
)

// DefaultCacheDir is where scripts/fetch-kernel.sh and FetchDebian keep
// Debian's cloud kernel by default: outside any checkout, so CI can cache
// it between runs.
const DefaultCacheDir = "/var/cache/hyphae/kernels"

// DebianMetaPackage always depends on Debian's current cloud kernel. Its
// kernel has NVMe, the 8250 UART, ext4 and devtmpfs built in (virtio and
// overlayfs are modules), which is what the QEMU driver relies on.
const DebianMetaPackage = "linux-image-cloud-amd64"

// CurrentLink names the symlink in a cache dir pointing at the newest
// vmlinuz-<version> there.
const CurrentLink = "vmlinuz"

// ModulesLink names the symlink in a cache dir pointing at the newest
// modules-<version> there.
const ModulesLink = "modules"

// ModulesDirName is the name, in a cache dir, of the lib/modules tree of
// kernel release version.
func ModulesDirName(version string) string { return "modules-" + version }

// modulesMarker is a file every modules tree of Debian's packages holds;
// its presence means the tree was moved into place whole. (The packages
// ship no modules.dep: depmod writes it when the package is installed.)
const modulesMarker = "modules.order"

var dependsRe = regexp.MustCompile(`Depends: (linux-image-[^\s]+)`)

// FetchDebian gets Debian's cloud kernel through apt into destDir and
// returns the path of its vmlinuz: apt-cache depends resolves the
// meta-package to the current kernel package, apt-get download fetches it
// (apt verifies it against the signed archive), dpkg -x unpacks it. The
// layout is the one scripts/fetch-kernel.sh writes (vmlinuz-<version>,
// config-<version>, modules-<version>/ holding the package's
// lib/modules/<version> tree, and the vmlinuz and modules symlinks). A
// kernel whose vmlinuz and modules are already there is not fetched again. apt-get update is run only when apt knows no
// package lists yet.
func FetchDebian(ctx context.Context, destDir string) (string, error) {
	for _, tool := range []string{"apt-cache", "apt-get", "dpkg"} {
		if _, err := exec.LookPath(tool); err != nil {
			return "", errcode.New(errcode.MissingTool, "%s not found", tool).
				WithHint("fetching Debian's kernel needs a Debian or Ubuntu host; elsewhere use `hyphae kernel fetch <url> --sha256 <hex>`")
		}
	}
	pkg, err := resolveDebianPackage(ctx)
	if err != nil {
		if _, uerr := run(ctx, "", "apt-get", "update", "-qq"); uerr != nil {
			return "", errcode.Wrap(errcode.FetchFailed, uerr, "apt-get update after: %v", err)
		}
		if pkg, err = resolveDebianPackage(ctx); err != nil {
			return "", err
		}
	}
	version := strings.TrimPrefix(pkg, "linux-image-")
	target := filepath.Join(destDir, "vmlinuz-"+version)
	modules := filepath.Join(destDir, ModulesDirName(version))
	if !nonEmpty(target) || !nonEmpty(filepath.Join(modules, modulesMarker)) {
		if err := downloadDebian(ctx, pkg, version, destDir, target, modules); err != nil {
			return "", err
		}
	}
	if _, err := Inspect(target); err != nil {
		return "", err
	}
	if err := replaceLink(filepath.Join(destDir, CurrentLink), filepath.Base(target)); err != nil {
		return "", err
	}
	if err := replaceLink(filepath.Join(destDir, ModulesLink), filepath.Base(modules)); err != nil {
		return "", err
	}
	return target, nil
}

func nonEmpty(path string) bool {
	st, err := os.Stat(path)
	return err == nil && st.Size() > 0
}

// replaceLink points link at target atomically (symlink, then rename).
func replaceLink(link, target string) error {
	tmpLink := link + ".new"
	_ = os.Remove(tmpLink)
	if err := os.Symlink(target, tmpLink); err != nil {
		return errcode.Wrap(errcode.FetchFailed, err, "link %s", link)
	}
	if err := os.Rename(tmpLink, link); err != nil {
		_ = os.Remove(tmpLink)
		return errcode.Wrap(errcode.FetchFailed, err, "link %s", link)
	}
	return nil
}

func resolveDebianPackage(ctx context.Context) (string, error) {
	out, err := run(ctx, "", "apt-cache", "depends", DebianMetaPackage)
	if m := dependsRe.FindSubmatch(out); err == nil && m != nil {
		return string(m[1]), nil
	}
	// err, when apt-cache itself failed, is the cause; nil when it ran but
	// named no kernel package.
	return "", &errcode.Error{Code: errcode.FetchFailed, Message: "apt cannot resolve " + DebianMetaPackage, Err: err,
		Hint: "run `apt-get update`; the host needs Debian's main archive in its sources"}
}

func downloadDebian(ctx context.Context, pkg, version, destDir, target, modules string) error {
	if err := os.MkdirAll(destDir, 0o755); err != nil {
		return errcode.Wrap(errcode.FetchFailed, err, "create %s", destDir)
	}
	work, err := os.MkdirTemp(destDir, ".fetch-")
	if err != nil {
		return errcode.Wrap(errcode.FetchFailed, err, "create work dir")
	}
	defer os.RemoveAll(work)
	// apt drops privileges to _apt for downloads where it can.
	if err := os.Chmod(work, 0o755); err != nil {
		return errcode.Wrap(errcode.FetchFailed, err, "chmod work dir")
	}
	if _, err := run(ctx, work, "apt-get", "download", "-qq", pkg); err != nil {
		return errcode.Wrap(errcode.FetchFailed, err, "apt-get download %s", pkg)
	}
	debs, _ := filepath.Glob(filepath.Join(work, pkg+"_*.deb"))
	if len(debs) != 1 {
		return errcode.New(errcode.FetchFailed, "apt-get download left %d .deb files for %s", len(debs), pkg)
	}
	tree := filepath.Join(work, "x")
	if _, err := run(ctx, "", "dpkg", "-x", debs[0], tree); err != nil {
		return errcode.Wrap(errcode.FetchFailed, err, "dpkg -x %s", debs[0])
	}
	config := filepath.Join(tree, "boot", "config-"+version)
	if err := os.Rename(config, filepath.Join(destDir, "config-"+version)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return errcode.Wrap(errcode.FetchFailed, err, "keep kernel config")
	}
	// Renamed last: an interrupted fetch never leaves a kernel or a
	// partial modules tree under its final name. What is already in place
	// stays, so a kernel cached before modules were kept is not replaced.
	if !nonEmpty(filepath.Join(modules, modulesMarker)) {
		if err := os.RemoveAll(modules); err != nil {
			return errcode.Wrap(errcode.FetchFailed, err, "remove incomplete %s", modules)
		}
		if err := os.Rename(filepath.Join(tree, "lib", "modules", version), modules); err != nil {
			return errcode.Wrap(errcode.FetchFailed, err, "%s holds no lib/modules/%s", pkg, version)
		}
	}
	if !nonEmpty(target) {
		if err := os.Rename(filepath.Join(tree, "boot", "vmlinuz-"+version), target); err != nil {
			return errcode.Wrap(errcode.FetchFailed, err, "%s holds no boot/vmlinuz-%s", pkg, version)
		}
	}
	return nil
}

// run runs a command and returns its stdout; a failure carries stderr.
func run(ctx context.Context, dir, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), errcode.Wrap(errcode.ProcessFailed, err, "%s: %s", name, strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}
