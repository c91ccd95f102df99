// Package pid1 is the namespace harness for tests: it runs a root
// directory's /sbin/init as PID 1 of a fresh PID and mount namespace
// (`unshare --pid --mount --fork --propagation private chroot ROOT
// /sbin/init`), so that the real, static hyphae-init can be exercised
// without a VM. Mounts init makes stay inside the namespace, and reboot(2)
// from that PID 1 ends it.
//
// A kernel command line cannot be given to a namespace: a fresh proc shows
// the host's. So, when Options.Cmdline is set, the harness prepares /proc
// the way a supervisor may: before exec'ing init it mounts the namespace's
// proc at ROOT/proc and bind-mounts a file over ROOT/proc/cmdline. Init
// skips mounting a proc that is already there (as it skips the kernel's
// devtmpfs automount) and reads /proc/cmdline as always; production code
// has no test-only path.
//
// It is a package of its own, not part of testenv, because it needs
// package guest: tests of guest itself can then still use testenv.
package pid1

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hyphae-run/hyphae/guest"
	"github.com/hyphae-run/hyphae/internal/testenv"
)

// Requires checks what a boot needs: root and the unshare, chroot and
// mount programs.
func Requires(t testing.TB) {
	t.Helper()
	testenv.RequiresRoot(t)
	for _, p := range []string{"unshare", "chroot", "mount"} {
		testenv.RequiresTool(t, p)
	}
}

// Options extend a boot.
type Options struct {
	// Cmdline, when not empty, becomes the namespace's /proc/cmdline.
	Cmdline string
	// Net gives the boot a fresh network namespace (holding only lo).
	Net bool
	// Setup is a shell command run inside the namespaces before init, e.g.
	// to create the devices a test configures.
	Setup string
	// OnLine sees each console line as it arrives, with init's host pid
	// (to signal it).
	OnLine func(line string, initPid int)
}

// Result is what a boot printed and how the namespace ended.
type Result struct {
	// Lines is the console (init's and the program's stdout), line by line.
	Lines  []string
	Stderr string
	State  *os.ProcessState
}

// Has reports whether line was printed.
func (r Result) Has(line string) bool {
	for _, l := range r.Lines {
		if l == line {
			return true
		}
	}
	return false
}

// Status parses the last console line, which must be init's status line;
// anything else fails t.
func (r Result) Status(t testing.TB) guest.Status {
	t.Helper()
	if len(r.Lines) == 0 {
		t.Fatalf("no console output; stderr:\n%s", r.Stderr)
	}
	last := r.Lines[len(r.Lines)-1]
	st, ok := guest.ParseStatusLine(last)
	if !ok {
		t.Fatalf("last console line %q is not a status line; console:\n%s\nstderr:\n%s", last, strings.Join(r.Lines, "\n"), r.Stderr)
	}
	return st
}

// EndedByReboot reports whether the namespace ended the way reboot(2) from
// its PID 1 ends it: init killed by SIGHUP, which unshare either reports
// as 129 or re-raises on itself.
func (r Result) EndedByReboot() bool {
	if ws, ok := r.State.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return ws.Signal() == syscall.SIGHUP
	}
	return r.State.ExitCode() == 128+int(syscall.SIGHUP)
}

// Boot runs root's /sbin/init as PID 1 of a new PID and mount namespace
// and returns when the namespace has ended.
func Boot(t testing.TB, root string, o Options) Result {
	t.Helper()
	args := []string{"--pid", "--mount", "--fork", "--propagation", "private", "--kill-child"}
	if o.Net {
		args = append(args, "--net")
	}
	if o.Cmdline == "" && o.Setup == "" {
		args = append(args, "chroot", root, guest.InitPath)
	} else {
		script, f := `exec chroot "$1" "$3"`, ""
		if o.Cmdline != "" {
			f = filepath.Join(t.TempDir(), "cmdline")
			if err := os.WriteFile(f, []byte(o.Cmdline+"\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			script = `mount -t proc proc "$1/proc" && mount --bind "$2" "$1/proc/cmdline" && ` + script
		}
		if o.Setup != "" {
			script = "(" + o.Setup + ") && " + script
		}
		args = append(args, "sh", "-c", script, "sh", root, f, guest.InitPath)
	}
	// The deadline only keeps a broken init from hanging the test run.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "unshare", args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var res Result
	sc := bufio.NewScanner(stdout)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	initPid := 0
	for sc.Scan() {
		line := sc.Text()
		res.Lines = append(res.Lines, line)
		if o.OnLine != nil {
			// Looked up once, at init's first line: by the last one
			// unshare may have reaped it already.
			if initPid == 0 {
				initPid = childOf(t, cmd.Process.Pid)
			}
			o.OnLine(line, initPid)
		}
	}
	scanErr := sc.Err()
	if scanErr != nil {
		// Nobody reads the console any more: end the boot rather than
		// wait for the deadline.
		cancel()
	}
	err = cmd.Wait()
	if scanErr != nil {
		t.Fatalf("reading the console: %v\n%s", scanErr, strings.Join(res.Lines, "\n"))
	}
	var exitErr *exec.ExitError
	if err != nil && !errors.As(err, &exitErr) {
		t.Fatalf("unshare: %v\n%s", err, stderr.String())
	}
	if ctx.Err() != nil {
		t.Fatalf("boot did not end: console:\n%s\nstderr:\n%s", strings.Join(res.Lines, "\n"), stderr.String())
	}
	res.Stderr, res.State = stderr.String(), cmd.ProcessState
	return res
}

// childOf returns the only child of pid: with --fork, unshare's child is
// the namespace's PID 1.
func childOf(t testing.TB, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
	if err != nil {
		t.Fatalf("finding init: %v", err)
	}
	f := strings.Fields(string(b))
	if len(f) != 1 {
		t.Fatalf("unshare has children %q, want one", f)
	}
	n, err := strconv.Atoi(f[0])
	if err != nil {
		t.Fatal(err)
	}
	return n
}
