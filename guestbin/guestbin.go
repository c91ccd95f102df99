// Package guestbin finds the static guest binaries (hyphae-init,
// dimension-agent) that hyphae copies into every image.
//
// Host binaries look for them, in order, in $HYPHAE_LIBEXEC, next to their
// own executable (where `go install ./cmd/...` puts them), and in
// ../libexec/hyphae relative to it (a packaged layout). A candidate must be
// a statically linked ELF: a binary that needs a dynamic loader would crash
// in an image that has none.
package guestbin

import (
	"debug/elf"
	"os"
	"path/filepath"

	"github.com/hyphae-run/hyphae/errcode"
)

// Names of the guest binaries.
const (
	Init  = "hyphae-init"
	Agent = "dimension-agent"
)

// EnvLibexec names the directory searched first.
const EnvLibexec = "HYPHAE_LIBEXEC"

// Dirs returns the directories searched, in order.
func Dirs() []string {
	var dirs []string
	if d := os.Getenv(EnvLibexec); d != "" {
		dirs = append(dirs, d)
	}
	if exe, err := os.Executable(); err == nil {
		if real, err := filepath.EvalSymlinks(exe); err == nil {
			exe = real
		}
		dir := filepath.Dir(exe)
		dirs = append(dirs, dir, filepath.Join(dir, "..", "libexec", "hyphae"))
	}
	return dirs
}

// Locate returns the path of the named guest binary.
func Locate(name string) (string, error) {
	dirs := Dirs()
	for _, d := range dirs {
		p := filepath.Join(d, name)
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
			if err := CheckStatic(p); err != nil {
				return "", err
			}
			return p, nil
		}
	}
	return "", errcode.New(errcode.GuestBinaryMissing, "%s not found (looked in %v)", name, dirs).
		WithHint("run `make install` (or `CGO_ENABLED=0 go install ./cmd/...`), or set " + EnvLibexec + " to the directory that holds " + name)
}

// CheckStatic reports an error unless path is an ELF executable without a
// program interpreter (that is, statically linked).
func CheckStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return errcode.Wrap(errcode.GuestBinaryDynamic, err, "%s is not an ELF executable", path)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return errcode.New(errcode.GuestBinaryDynamic, "%s is dynamically linked; guest binaries must be static", path).
				WithHint("rebuild it with CGO_ENABLED=0")
		}
	}
	return nil
}
