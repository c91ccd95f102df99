package guestinit

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
)

// modulesMount is where the hyphae.modules device is mounted while its
// modules load; /run is init's own tmpfs by then.
const modulesMount = "/run/hyphae/modules"

// maxLoadFile bounds guest.ModulesLoadFile.
const maxLoadFile = 64 << 10

// loadModules mounts the hyphae.modules device read-only, loads the
// modules its load file lists, in order, and unmounts it. A module the
// kernel already has (built in, or loaded) is not an error.
func loadModules(device string, log *slog.Logger) (err error) {
	bad := func(err error, format string, args ...any) error {
		return errcode.Wrap(errcode.InitFatal, err, "%s=%s: %s", guest.CmdlineModules, device, fmt.Sprintf(format, args...))
	}
	if !strings.HasPrefix(device, "/dev/") || strings.Contains(device, "..") {
		return errcode.New(errcode.InitFatal, "%s=%s: want a block device path under /dev/", guest.CmdlineModules, device)
	}
	if err := mountOn(device, modulesMount, "ext4", unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return bad(err, "cannot mount it read-only as ext4 on %s", modulesMount)
	}
	defer func() {
		if uerr := unix.Unmount(modulesMount, 0); uerr != nil && err == nil {
			err = bad(uerr, "cannot unmount %s", modulesMount)
		}
		_ = os.Remove(modulesMount)
	}()
	b, err := readBounded(filepath.Join(modulesMount, guest.ModulesLoadFile), maxLoadFile)
	if err != nil {
		return bad(err, "cannot read %s", guest.ModulesLoadFile)
	}
	files, err := parseLoadFile(b)
	if err != nil {
		return bad(err, "bad %s", guest.ModulesLoadFile)
	}
	for _, file := range files {
		loaded, err := loadModule(filepath.Join(modulesMount, file))
		if err != nil {
			return bad(err, "cannot load %s", file)
		}
		log.Debug("kernel module", "file", file, "loaded", loaded)
	}
	return nil
}

// loadModule loads one module file with finit_module(2). It reports false
// when the kernel already had the module.
func loadModule(path string) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	err = unix.FinitModule(int(f.Fd()), "", 0)
	if errors.Is(err, unix.EEXIST) {
		return false, nil
	}
	return err == nil, err
}

// parseLoadFile reads guest.ModulesLoadFile: one .ko file name per line,
// no directories. Blank lines are skipped.
func parseLoadFile(b []byte) ([]string, error) {
	var files []string
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		if strings.ContainsAny(line, "/\x00") || line == "." || line == ".." || !strings.HasSuffix(line, ".ko") {
			return nil, errcode.New(errcode.InitFatal, "line %q is not a .ko file name", line)
		}
		files = append(files, line)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return files, nil
}

// readBounded reads a file of at most max bytes.
func readBounded(path string, max int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > max {
		return nil, errcode.New(errcode.InitFatal, "%s is over %d bytes", path, max)
	}
	return b, nil
}
