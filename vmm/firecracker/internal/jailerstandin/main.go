// Command jailerstandin is a stand-in for Firecracker's jailer, for tests,
// built as "jailer-standin". It is not a security boundary. It does what
// the v1.16.1 jailer does that hyphae depends on, with real files, real
// cgroups and real privilege changes, so that the driver's jailed path can
// be exercised where the real jailer is not installed:
//
//   - the same command line (values as separate arguments, "--flag=value"
//     refused, "--" before Firecracker's arguments, which must not repeat
//     --id because the jailer passes it itself);
//   - the jail root <chroot-base>/<exec file name>/<id>/root, the exec file
//     copied into it, /dev/kvm and /dev/net/tun made with mknod, the root,
//     /dev, /dev/net and /run owned by uid:gid with mode 0700;
//   - each --cgroup written under <controller mount>/<parent>/<id> (cgroup
//     v1 or v2) and the process moved there (tasks / cgroup.procs);
//   - --netns joined with setns; --daemonize: setsid() (failing for a
//     process group leader, as the jailer does) and standard I/O to
//     /dev/null; --new-pid-ns: the exec file started as PID 1 of a new PID
//     namespace and its PID written to <jail root>/<exec file name>.pid
//     before the stand-in exits 0; otherwise the stand-in execs in place;
//   - Firecracker started as uid:gid from inside the jail with
//     "--id <id> --start-time-us N --start-time-cpu-us N
//     --parent-cpu-time-us N" and the arguments after "--".
//
// Deviations: it enters the jail with chroot(2) rather than a new mount
// namespace and pivot_root; it does not apply --resource-limit (it only
// parses it); and where the jailer clears the whole environment it keeps
// FIRECRACKER_STANDIN_* variables, which steer the Firecracker stand-in.
package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

const name = "jailer-standin"

func init() {
	// setns(2) and unshare act on the calling thread: keep main on one
	// thread so that the namespace joined is the one exec'd into.
	runtime.LockOSThread()
}

// args is the parsed command line.
type args struct {
	single  map[string]string
	multi   map[string][]string
	flags   map[string]bool
	extra   []string
	version int
}

var (
	valueFlags = []string{"id", "exec-file", "uid", "gid", "chroot-base-dir", "netns", "cgroup-version", "parent-cgroup"}
	multiFlags = []string{"cgroup", "resource-limit"}
	boolFlags  = []string{"daemonize", "new-pid-ns"}
)

func parseArgs(argv []string) (*args, error) {
	a := &args{single: map[string]string{"chroot-base-dir": "/srv/jailer", "cgroup-version": "1"}, multi: map[string][]string{}, flags: map[string]bool{}}
	seen := map[string]bool{}
	for i := 0; i < len(argv); i++ {
		arg := argv[i]
		if arg == "--" {
			a.extra = argv[i+1:]
			break
		}
		flag, ok := strings.CutPrefix(arg, "--")
		if !ok {
			return nil, fmt.Errorf("found argument %q which wasn't expected", arg)
		}
		if strings.Contains(flag, "=") {
			return nil, fmt.Errorf("found argument %q which wasn't expected (values must be separate arguments)", arg)
		}
		switch {
		case slices.Contains(boolFlags, flag):
			a.flags[flag] = true
			continue
		case slices.Contains(valueFlags, flag):
			if seen[flag] {
				return nil, fmt.Errorf("the argument '--%s' was provided more than once", flag)
			}
			seen[flag] = true
		case slices.Contains(multiFlags, flag):
		default:
			return nil, fmt.Errorf("found argument %q which wasn't expected", arg)
		}
		if i+1 >= len(argv) || strings.HasPrefix(argv[i+1], "--") {
			return nil, fmt.Errorf("argument '--%s' requires a value", flag)
		}
		i++
		if slices.Contains(multiFlags, flag) {
			a.multi[flag] = append(a.multi[flag], argv[i])
		} else {
			a.single[flag] = argv[i]
		}
	}
	for _, req := range []string{"id", "exec-file", "uid", "gid"} {
		if !seen[req] {
			return nil, fmt.Errorf("argument '--%s' is required", req)
		}
	}
	if slices.Contains(a.extra, "--id") {
		return nil, errors.New("--id after \"--\": the jailer passes --id to Firecracker itself, which refuses it twice")
	}
	v, err := strconv.Atoi(a.single["cgroup-version"])
	if err != nil || (v != 1 && v != 2) {
		return nil, fmt.Errorf("%s is an invalid cgroup version specifier", a.single["cgroup-version"])
	}
	a.version = v
	return a, nil
}

func main() {
	start := time.Now()
	if err := run(start); err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
		os.Exit(1)
	}
}

func run(start time.Time) error {
	a, err := parseArgs(os.Args[1:])
	if err != nil {
		return fmt.Errorf("arguments parsing error: %w", err)
	}
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if !strings.HasPrefix(k, "FIRECRACKER_STANDIN_") {
			os.Unsetenv(k)
		}
	}
	id := a.single["id"]
	if id == "" || len(id) > 64 || strings.IndexFunc(id, func(r rune) bool {
		return !(r == '-' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9')
	}) >= 0 {
		return fmt.Errorf("invalid instance ID %q", id)
	}
	uid, err := strconv.Atoi(a.single["uid"])
	if err != nil {
		return fmt.Errorf("invalid uid: %s", a.single["uid"])
	}
	gid, err := strconv.Atoi(a.single["gid"])
	if err != nil {
		return fmt.Errorf("invalid gid: %s", a.single["gid"])
	}
	execFile, err := filepath.EvalSymlinks(a.single["exec-file"])
	if err != nil {
		return fmt.Errorf("failed to canonicalize path %s: %w", a.single["exec-file"], err)
	}
	if execFile, err = filepath.Abs(execFile); err != nil {
		return err
	}
	if st, err := os.Stat(execFile); err != nil || !st.Mode().IsRegular() {
		return fmt.Errorf("%s is not a file", execFile)
	}
	base, err := filepath.EvalSymlinks(a.single["chroot-base-dir"])
	if err != nil {
		return fmt.Errorf("failed to canonicalize path %s: %w", a.single["chroot-base-dir"], err)
	}
	if st, err := os.Stat(base); err != nil || !st.IsDir() {
		return fmt.Errorf("%s is not a directory", base)
	}
	execName := filepath.Base(execFile)
	parent := a.single["parent-cgroup"]
	if parent == "" {
		parent = execName
	}
	root := filepath.Join(base, execName, id, "root")
	if err := os.MkdirAll(root, 0o700); err != nil {
		return fmt.Errorf("failed to create directory %s: %w", root, err)
	}
	if err := copyFile(execFile, filepath.Join(root, execName)); err != nil {
		return err
	}
	for _, cg := range a.multi["cgroup"] {
		if err := setCgroup(a.version, cg, parent, id); err != nil {
			return err
		}
	}
	for _, d := range []string{"", "dev", "dev/net", "run"} {
		p := filepath.Join(root, d)
		if err := os.MkdirAll(p, 0o700); err != nil {
			return fmt.Errorf("failed to create directory %s: %w", p, err)
		}
		if err := os.Chmod(p, 0o700); err != nil {
			return err
		}
		if err := os.Chown(p, uid, gid); err != nil {
			return fmt.Errorf("failed to change owner for %s: %w", p, err)
		}
	}
	for _, dev := range []struct {
		path         string
		major, minor uint32
	}{{"dev/kvm", 10, 232}, {"dev/net/tun", 10, 200}} {
		p := filepath.Join(root, dev.path)
		if err := unix.Mknod(p, unix.S_IFCHR|0o600, int(unix.Mkdev(dev.major, dev.minor))); err != nil {
			return fmt.Errorf("failed to create %s via mknod inside the jail: %w", dev.path, err)
		}
		if err := os.Chown(p, uid, gid); err != nil {
			return fmt.Errorf("failed to change owner for %s: %w", p, err)
		}
	}
	if ns := a.single["netns"]; ns != "" {
		f, err := os.Open(ns)
		if err != nil {
			return fmt.Errorf("failed to open file %s: %w", ns, err)
		}
		err = unix.Setns(int(f.Fd()), unix.CLONE_NEWNET)
		f.Close()
		if err != nil {
			return fmt.Errorf("failed to join network namespace: netns: %w", err)
		}
	}
	if err := unix.Chroot(root); err != nil {
		return fmt.Errorf("chroot %s: %w", root, err)
	}
	if err := os.Chdir("/"); err != nil {
		return err
	}
	if a.flags["daemonize"] {
		if _, err := unix.Setsid(); err != nil {
			return fmt.Errorf("failed to daemonize: setsid: %w", err)
		}
		null, err := os.OpenFile("/dev/null", os.O_RDWR, 0)
		if err != nil {
			// No /dev/null in the jail: make one, as the jailer
			// opens it before entering the jail.
			if err := unix.Mknod("/dev/null", unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))); err != nil {
				return fmt.Errorf("failed to open /dev/null: %w", err)
			}
			if null, err = os.OpenFile("/dev/null", os.O_RDWR, 0); err != nil {
				return fmt.Errorf("failed to open /dev/null: %w", err)
			}
		}
		for fd := 0; fd <= 2; fd++ {
			if err := unix.Dup2(int(null.Fd()), fd); err != nil {
				return fmt.Errorf("failed to duplicate fd: %w", err)
			}
		}
		null.Close()
		os.Remove("/dev/null")
	}
	us := strconv.FormatInt(start.UnixMicro(), 10)
	fcArgs := append([]string{"/" + execName, "--id", id, "--start-time-us", us, "--start-time-cpu-us", "0", "--parent-cpu-time-us", "0"}, a.extra...)
	if a.flags["new-pid-ns"] {
		cmd := exec.Command(fcArgs[0], fcArgs[1:]...)
		cmd.Args = fcArgs
		cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
		cmd.SysProcAttr = &syscall.SysProcAttr{
			Cloneflags: syscall.CLONE_NEWPID,
			Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)},
		}
		if err := cmd.Start(); err != nil {
			return fmt.Errorf("failed cloning into a new child process: %w", err)
		}
		pidFile := "/" + execName + ".pid"
		f, err := os.OpenFile(pidFile, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
		if err != nil {
			return fmt.Errorf("failed to open file %s: %w", pidFile, err)
		}
		_, err = fmt.Fprint(f, cmd.Process.Pid)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("failed to write to %s: %w", pidFile, err)
		}
		os.Exit(0)
	}
	if err := syscall.Setgroups(nil); err != nil {
		return err
	}
	if err := syscall.Setgid(gid); err != nil {
		return err
	}
	if err := syscall.Setuid(uid); err != nil {
		return err
	}
	return fmt.Errorf("failed to exec into Firecracker: %w", syscall.Exec(fcArgs[0], fcArgs, os.Environ()))
}

// copyFile copies the exec file into the jail, keeping its mode.
func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, st.Mode().Perm())
	if err != nil {
		return fmt.Errorf("failed to copy %s to %s: %w", src, dst, err)
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return fmt.Errorf("failed to copy %s to %s: %w", src, dst, err)
	}
	return out.Close()
}

// setCgroup applies one --cgroup <file>=<value>.
func setCgroup(version int, arg, parent, id string) error {
	file, value, ok := strings.Cut(arg, "=")
	if !ok || value == "" || strings.Contains(value, "=") {
		return fmt.Errorf("invalid format for cgroups: %s", arg)
	}
	controller, _, ok := strings.Cut(file, ".")
	if !ok {
		return fmt.Errorf("cgroup invalid file: %s", file)
	}
	mount, err := findMount(version, controller)
	if err != nil {
		return err
	}
	if version == 2 {
		have, err := os.ReadFile(filepath.Join(mount, "cgroup.controllers"))
		if err != nil || !slices.Contains(strings.Fields(string(have)), controller) {
			return fmt.Errorf("controller %s is unavailable", controller)
		}
	}
	dir := filepath.Join(mount, parent, id)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("failed to create directory %s: %w", dir, err)
	}
	if err := os.WriteFile(filepath.Join(dir, file), []byte(value+"\n"), 0); err != nil {
		return fmt.Errorf("failed to write to %s: %w", filepath.Join(dir, file), err)
	}
	procs := "tasks"
	if version == 2 {
		procs = "cgroup.procs"
	}
	if err := os.WriteFile(filepath.Join(dir, procs), []byte(strconv.Itoa(os.Getpid())+"\n"), 0); err != nil {
		return fmt.Errorf("failed to write to %s: %w", filepath.Join(dir, procs), err)
	}
	return nil
}

// findMount finds the cgroup hierarchy of controller in /proc/mounts.
func findMount(version int, controller string) (string, error) {
	b, err := os.ReadFile("/proc/mounts")
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 4 {
			continue
		}
		if version == 2 && f[2] == "cgroup2" {
			return f[1], nil
		}
		if version == 1 && f[2] == "cgroup" && slices.Contains(strings.Split(f[3], ","), controller) {
			return f[1], nil
		}
	}
	return "", fmt.Errorf("hierarchy not found: %s", controller)
}
