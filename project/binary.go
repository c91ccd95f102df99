package project

import (
	"context"
	"debug/elf"
	"fmt"
	"os"
	"path/filepath"
	"runtime"

	"github.com/hyphae-run/hyphae/errcode"
)

// hostMachine is the ELF machine of the guests this host boots (the same
// architecture as the host).
func hostMachine() elf.Machine {
	switch runtime.GOARCH {
	case "arm64":
		return elf.EM_AARCH64
	case "riscv64":
		return elf.EM_RISCV
	default:
		return elf.EM_X86_64
	}
}

// inspectProgram checks that p is an ELF executable for this machine and
// reports whether it is dynamically linked.
func inspectProgram(p string) (dynamic bool, err error) {
	f, err := elf.Open(p)
	if err != nil {
		return false, fmt.Errorf("%s is not an ELF executable: %w", p, err)
	}
	defer f.Close()
	if !isExecutable(f) {
		return false, fmt.Errorf("%s is an ELF %s, not an executable", p, f.Type)
	}
	if f.Machine != hostMachine() {
		return false, fmt.Errorf("%s is built for %s; guests here run %s", p, f.Machine, hostMachine())
	}
	return programInterp(f) != "", nil
}

// stageBinary stages file as /app/<name>; see StageBinary.
func stageBinary(ctx context.Context, file string, root *os.Root, opts Options) (Result, error) {
	st, err := os.Stat(file)
	if err != nil {
		return Result{}, errcode.Wrap(errcode.InvalidArgument, err, "binary %s", file)
	}
	if !st.Mode().IsRegular() {
		return Result{}, errcode.New(errcode.InvalidArgument, "binary %s is not a regular file", file)
	}
	if st.Mode()&0o111 == 0 {
		return Result{}, errcode.New(errcode.InvalidArgument, "binary %s is not executable (mode %s)", file, st.Mode()).
			WithHint("chmod +x " + file)
	}
	dynamic, err := inspectProgram(file)
	if err != nil {
		return Result{}, wrapHint(errcode.InvalidArgument, err, "pass a program built for Linux on "+runtime.GOARCH+", ideally statically linked", "binary %s cannot be staged", file)
	}
	name := filepath.Base(file)
	dest := AppDir + "/" + name
	if _, err := copyHostFile(root, file, imageName(dest)); err != nil {
		return Result{}, errcode.Wrap(errcode.StagingFailed, err, "copying %s", file)
	}
	res := Result{Kind: KindBinary, Entrypoint: []string{dest}, Workdir: AppDir}
	if dynamic {
		opts.logger().Warn("binary is dynamically linked; staging its loader and shared libraries from this host", "binary", file)
		env, _, err := stageClosure(ctx, root, file, opts)
		if err != nil {
			return Result{}, wrapHint(errcode.StagingFailed, err, "build the program statically (CGO_ENABLED=0 for Go, the musl target for Rust)", "staging the libraries of %s", file)
		}
		res.Env = env
	}
	progressf(opts, "staged %s as %s", file, dest)
	return res, nil
}
