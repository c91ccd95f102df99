package firecracker

// Running Firecracker under its jailer (Options.Jail).
//
// What this file relies on, from Firecracker v1.16.1's docs/jailer.md and
// src/jailer/src/{main,env,cgroup}.rs:
//   - Flags: --id, --exec-file, --uid, --gid (required); --chroot-base-dir
//     (default /srv/jailer); --cgroup-version (default "1"); --cgroup
//     <file>=<value> (repeatable; the value may hold spaces, it is split at
//     the one '='); --parent-cgroup (default: the exec file's name); --netns
//     <path>; --daemonize; --new-pid-ns; everything after "--" goes to
//     Firecracker. The argument parser takes "--flag value" only, and the
//     jailer passes "--id <id>" to Firecracker itself (Firecracker refuses an
//     argument given twice).
//   - The jail root is <chroot-base>/<file name of the canonicalized exec
//     file>/<id>/root. The jailer reuses an existing one, copies the exec
//     file into it, mknods /dev/kvm and /dev/net/tun, creates /run, and
//     chowns the root, /dev, /dev/net and /run to uid:gid with mode 0700.
//     Whatever Firecracker opens (kernel, drives, log, config file) must be
//     inside that root, named by its path as seen from inside.
//   - cgroups: for each --cgroup the jailer creates <mount of the
//     controller>/<parent-cgroup>/<id>, writes the value there and moves the
//     process in. It removes nothing afterwards: cleanup is the caller's.
//   - --daemonize: setsid() and stdin/stdout/stderr to /dev/null; setsid()
//     fails when the jailer is a process group leader, so it must not be
//     spawned with Setpgid.
//   - --new-pid-ns: clone(CLONE_NEWPID); the child becomes PID 1 of the new
//     namespace and execs Firecracker, the parent writes the child's PID
//     (in the jailer's namespace) to <jail root>/<exec file name>.pid and
//     exits 0. Without it the jailer execs Firecracker in place: same PID.
//   - The jailer closes inherited descriptors above 2 and clears its
//     environment before anything else.
//
// Design decisions:
//   - Read-only inputs (kernel, root image, read-only drives) stay
//     root-owned: they are hard-linked into the jail only when root owns
//     them and nobody else may write them (a hard link shares the inode, so
//     the jail user then can read but neither write nor chmod the registry
//     file); anything else is reflinked or copied as a root-owned 0444 file.
//     Nothing from outside is ever chowned. Files Firecracker writes (the
//     scratch layer, its log, the console, the config) are created inside
//     the jail and owned by the jail user, mode 0600.
//   - Writable extra drives are refused: a copy would take the guest's
//     writes away from the file the caller named, and chowning the original
//     would hand it to the jail user.
//   - The per-VM cgroup is the jailer's to create (that is what --cgroup is
//     for); hyphae checks beforehand that the controllers exist, enables
//     them for the shared parent cgroup on cgroup v2 (idempotent), and
//     removes the per-VM cgroup when the VM is cleaned up.
//   - With --daemonize Firecracker's stdout is /dev/null, so the guest
//     console is sent to <jail root>/console.log with PUT /serial (an API
//     call; the v1.16.1 config file has no serial section, so that
//     combination is refused).

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/vmm"
	"github.com/hyphae-run/hyphae/vmm/vmmproc"
)

// Defaults for JailOptions.
const (
	DefaultJailerBinary  = "jailer"
	DefaultChrootBaseDir = "/srv/jailer"
	DefaultCgroupVersion = 2
	// DefaultJailMemoryOverheadMiB is added to the guest's memory for the
	// cgroup memory limit: Firecracker's own footprint is a few MiB, the
	// rest covers page tables, the page cache of the images and the
	// vsock/virtio buffers, which are all charged to the VM's cgroup.
	DefaultJailMemoryOverheadMiB = 64
)

// DefaultJailUser is the system user jailed Firecrackers run as. Create it
// once with:
//
//	useradd --system --no-create-home --shell /usr/sbin/nologin hyphae-fc
const DefaultJailUser = "hyphae-fc"

// cpuPeriodMicros is the cgroup CPU bandwidth period; the quota is one
// period per vCPU, so the VM never uses more than its vCPUs' worth of CPU.
const cpuPeriodMicros = 100_000

// Paths as the jailed Firecracker sees them (its root is the jail root).
const (
	jailAPISocket   = "/run/firecracker.socket"
	jailKernel      = "/vmlinux"
	jailScratch     = "/" + scratchName
	jailVsock       = "/" + vsockSocketName
	jailLog         = "/" + logName
	jailConsole     = "/" + consoleName
	jailConfig      = "/" + configName
	jailerLogName   = "jailer.log"
	pidFileSuffix   = ".pid"
	cgroupRmdirWait = 5 * time.Second
	attachPause     = 10 * time.Millisecond
)

// JailOptions run Firecracker under the jailer. The zero value of every
// field but UID and GID is the recommended setting.
type JailOptions struct {
	// JailerBinary is the jailer program (DefaultJailerBinary when empty),
	// a path or a name looked up on PATH. It must be the release of the
	// Firecracker it runs.
	JailerBinary string
	// UID and GID are what Firecracker runs as: a dedicated system user
	// (DefaultJailUser; see LookupJailUser). Root is refused.
	UID, GID int
	// ChrootBaseDir holds the jails (DefaultChrootBaseDir when empty). It
	// must be on a filesystem mounted without nodev: the jailer creates
	// /dev/kvm and /dev/net/tun inside each jail.
	ChrootBaseDir string
	// CgroupVersion is 2 (DefaultCgroupVersion when zero) or 1, for hosts
	// whose cpu and memory controllers are on the v1 hierarchy.
	CgroupVersion int
	// NetNS is the network namespace (a path such as /var/run/netns/x)
	// Firecracker joins; empty keeps hyphae's. The VM's TAPs must be there.
	NetNS string
	// NoNewPIDNS runs Firecracker in hyphae's PID namespace instead of
	// making it PID 1 of its own (--new-pid-ns).
	NoNewPIDNS bool
	// NoDaemonize keeps Firecracker in hyphae's session with its output
	// going to the console log, instead of --daemonize (setsid, standard
	// I/O to /dev/null, the console through PUT /serial).
	NoDaemonize bool
	// MemoryOverheadMiB is added to the guest memory for the cgroup limit
	// (DefaultJailMemoryOverheadMiB when zero).
	MemoryOverheadMiB int
}

// withDefaults fills in the defaults.
func (o JailOptions) withDefaults() JailOptions {
	if o.JailerBinary == "" {
		o.JailerBinary = DefaultJailerBinary
	}
	if o.ChrootBaseDir == "" {
		o.ChrootBaseDir = DefaultChrootBaseDir
	}
	if o.CgroupVersion == 0 {
		o.CgroupVersion = DefaultCgroupVersion
	}
	if o.MemoryOverheadMiB == 0 {
		o.MemoryOverheadMiB = DefaultJailMemoryOverheadMiB
	}
	return o
}

// validate reports every problem with o (after withDefaults).
func (o JailOptions) validate() error {
	var errs []error
	bad := func(format string, args ...any) {
		errs = append(errs, errcode.New(errcode.InvalidArgument, "jail: "+format, args...))
	}
	if o.UID <= 0 || o.GID <= 0 {
		errs = append(errs, errcode.New(errcode.InvalidArgument,
			"jail: uid %d, gid %d: Firecracker must run as an unprivileged user, not root", o.UID, o.GID).
			WithHint("useradd --system --no-create-home --shell /usr/sbin/nologin "+DefaultJailUser))
	}
	if !filepath.IsAbs(o.ChrootBaseDir) || filepath.Clean(o.ChrootBaseDir) != o.ChrootBaseDir || o.ChrootBaseDir == "/" {
		bad("chroot base dir %q must be a clean absolute path other than /", o.ChrootBaseDir)
	}
	if o.CgroupVersion != 1 && o.CgroupVersion != 2 {
		bad("cgroup version %d: the jailer supports 1 and 2", o.CgroupVersion)
	}
	if o.NetNS != "" && !filepath.IsAbs(o.NetNS) {
		bad("network namespace %q must be an absolute path", o.NetNS)
	}
	if o.MemoryOverheadMiB < 0 {
		bad("memory overhead %d MiB is negative", o.MemoryOverheadMiB)
	}
	return errors.Join(errs...)
}

// LookupJailUser returns the uid and gid of the named system user
// (DefaultJailUser when empty), with the command that creates it as the
// hint when it does not exist.
func LookupJailUser(name string) (uid, gid int, err error) {
	if name == "" {
		name = DefaultJailUser
	}
	u, err := user.Lookup(name)
	if err != nil {
		return 0, 0, wrapHint(errcode.JailFailed, err, "useradd --system --no-create-home --shell /usr/sbin/nologin "+name,
			"jail user %q", name)
	}
	uid, uerr := strconv.Atoi(u.Uid)
	gid, gerr := strconv.Atoi(u.Gid)
	if uerr != nil || gerr != nil {
		return 0, 0, errcode.New(errcode.JailFailed, "jail user %q has a non-numeric uid %q or gid %q", name, u.Uid, u.Gid)
	}
	return uid, gid, nil
}

// cgroupSetting is one --cgroup <file>=<value>.
type cgroupSetting struct{ file, value string }

// cgroupLimits are the CPU and memory limits of spec for the given cgroup
// version: one period of CPU time per vCPU and the guest memory plus the
// overhead.
func cgroupLimits(spec vmm.Spec, o JailOptions) []cgroupSetting {
	quota := strconv.Itoa(spec.VCPUs * cpuPeriodMicros)
	period := strconv.Itoa(cpuPeriodMicros)
	mem := strconv.FormatInt(int64(spec.MemoryMiB+o.MemoryOverheadMiB)<<20, 10)
	if o.CgroupVersion == 1 {
		return []cgroupSetting{
			{"cpu.cfs_period_us", period},
			{"cpu.cfs_quota_us", quota},
			{"memory.limit_in_bytes", mem},
		}
	}
	return []cgroupSetting{{"cpu.max", quota + " " + period}, {"memory.max", mem}}
}

// cgroupControllers are the controllers the limits need.
func cgroupControllers(limits []cgroupSetting) []string {
	var cs []string
	for _, l := range limits {
		c, _, _ := strings.Cut(l.file, ".")
		if !slices.Contains(cs, c) {
			cs = append(cs, c)
		}
	}
	return cs
}

// JailerArgs is the jailer's command line (after the program name) for
// spec: execFile is the resolved Firecracker binary, configFile the
// --config-file path inside the jail or "" for the API path. Every value is
// its own argument, and --id is not repeated after "--".
func JailerArgs(spec vmm.Spec, execFile string, opts JailOptions, configFile string) []string {
	o := opts.withDefaults()
	args := []string{
		"--id", spec.ID,
		"--exec-file", execFile,
		"--uid", strconv.Itoa(o.UID),
		"--gid", strconv.Itoa(o.GID),
		"--chroot-base-dir", o.ChrootBaseDir,
		"--cgroup-version", strconv.Itoa(o.CgroupVersion),
	}
	for _, c := range cgroupLimits(spec, o) {
		args = append(args, "--cgroup", c.file+"="+c.value)
	}
	if o.NetNS != "" {
		args = append(args, "--netns", o.NetNS)
	}
	if !o.NoNewPIDNS {
		args = append(args, "--new-pid-ns")
	}
	if !o.NoDaemonize {
		args = append(args, "--daemonize")
	}
	args = append(args, "--", "--api-sock", jailAPISocket)
	if configFile != "" {
		args = append(args, "--config-file", configFile)
	}
	return args
}

// resolveExecFile finds binary and follows symlinks, as the jailer
// canonicalizes --exec-file: the jail directory is named after the result.
func resolveExecFile(binary string) (string, error) {
	p, err := exec.LookPath(binary)
	if err != nil {
		return "", errcode.Wrap(errcode.VMMUnavailable, err, "find %s", binary)
	}
	abs, err := filepath.Abs(p)
	if err != nil {
		return "", errcode.Wrap(errcode.VMMUnavailable, err, "find %s", binary)
	}
	real, err := filepath.EvalSymlinks(abs)
	if err != nil {
		return "", errcode.Wrap(errcode.VMMUnavailable, err, "resolve %s", abs)
	}
	return real, nil
}

// jailLayout is where one VM's jail lives on the host.
type jailLayout struct {
	opts JailOptions
	id   string
	// execFile is the resolved Firecracker binary (--exec-file).
	execFile string
	// execName is the file name of the resolved exec file: the jail's
	// parent directory, the parent cgroup and the pid file are named
	// after it.
	execName string
	// instanceDir is <base>/<execName>/<id>, removed as a whole.
	instanceDir string
	// root is instanceDir/root, the jailed Firecracker's /.
	root string
}

func newJailLayout(o JailOptions, execFile, id string) jailLayout {
	name := filepath.Base(execFile)
	dir := filepath.Join(o.ChrootBaseDir, name, id)
	return jailLayout{opts: o, id: id, execName: name, instanceDir: dir, root: filepath.Join(dir, "root")}
}

// host maps a path inside the jail to the host.
func (l jailLayout) host(inJail string) string { return filepath.Join(l.root, inJail) }

// pidFile is where the jailer records Firecracker's PID (--new-pid-ns).
func (l jailLayout) pidFile() string { return l.host(l.execName + pidFileSuffix) }

// jailDrivePath names drive i of the spec inside the jail.
func jailDrivePath(i int) string { return fmt.Sprintf("/drive%d", i) }

// jailSpec rewrites spec's host paths to where stage puts them in the
// jail. Writable extra drives are refused (see the file comment).
func jailSpec(spec vmm.Spec) (vmm.Spec, error) {
	js := spec
	js.Kernel = jailKernel
	js.Drives = slices.Clone(spec.Drives)
	for i, d := range js.Drives {
		if !d.Root && !d.ReadOnly {
			return vmm.Spec{}, errcode.New(errcode.InvalidSpec,
				"drives[%d] (%q): writable extra drives are not supported under the jailer", i, d.ID).
				WithHint("attach it read-only, or run without the jailer")
		}
		js.Drives[i].Path = jailDrivePath(i)
	}
	return js, nil
}

// stage builds the jail root for spec before the jailer runs: read-only
// inputs linked or copied in, the writable layer, Firecracker's log and
// (with consoleFile) the console file created there and owned by the jail
// user. A leftover jail of the same id is removed first. On failure
// nothing is left.
func (l jailLayout) stage(ctx context.Context, spec vmm.Spec, scratchSize int64, consoleFile bool) (err error) {
	if err := os.RemoveAll(l.instanceDir); err != nil {
		return errcode.Wrap(errcode.JailFailed, err, "removing the leftover jail %s", l.instanceDir)
	}
	if err := os.MkdirAll(filepath.Dir(l.instanceDir), 0o755); err != nil {
		return errcode.Wrap(errcode.JailFailed, err, "creating %s", filepath.Dir(l.instanceDir))
	}
	if err := os.Mkdir(l.instanceDir, 0o700); err != nil {
		return errcode.Wrap(errcode.JailFailed, err, "creating the jail %s", l.instanceDir)
	}
	defer func() {
		if err != nil {
			_ = os.RemoveAll(l.instanceDir)
		}
	}()
	// The jailer does the same chown/chmod; doing it here makes the
	// staged tree complete on its own.
	if err := os.Mkdir(l.root, 0o700); err != nil {
		return errcode.Wrap(errcode.JailFailed, err, "creating the jail root")
	}
	if err := os.Chown(l.root, l.opts.UID, l.opts.GID); err != nil {
		return errcode.Wrap(errcode.JailFailed, err, "chown of the jail root to %d:%d", l.opts.UID, l.opts.GID)
	}
	if err := stageReadOnly(spec.Kernel, l.host(jailKernel)); err != nil {
		return err
	}
	for i, d := range spec.Drives {
		if err := stageReadOnly(d.Path, l.host(jailDrivePath(i))); err != nil {
			return err
		}
	}
	if err := makeScratch(ctx, l.host(jailScratch), scratchSize); err != nil {
		return err
	}
	if err := l.own(jailScratch); err != nil {
		return err
	}
	owned := []string{jailLog}
	if consoleFile {
		owned = append(owned, jailConsole)
	}
	for _, p := range owned {
		if err := l.writeOwned(p, nil); err != nil {
			return err
		}
	}
	return nil
}

// writeOwned creates the jail file inJail with data, owned by the jail
// user with mode 0600.
func (l jailLayout) writeOwned(inJail string, data []byte) error {
	path := l.host(inJail)
	if err := os.WriteFile(path, data, 0o600); err != nil {
		return errcode.Wrap(errcode.JailFailed, err, "writing %s", path)
	}
	return l.own(inJail)
}

// own hands the jail file inJail to the jail user, mode 0600.
func (l jailLayout) own(inJail string) error {
	path := l.host(inJail)
	if err := os.Lchown(path, l.opts.UID, l.opts.GID); err != nil {
		return errcode.Wrap(errcode.JailFailed, err, "chown of %s", path)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		return errcode.Wrap(errcode.JailFailed, err, "chmod of %s", path)
	}
	return nil
}

// stageReadOnly puts the regular file src at dst for reading by the jail
// user, never changing src: a hard link when src is root-owned, writable
// by root alone and world-readable, else a root-owned 0444 reflink or copy.
func stageReadOnly(src, dst string) error {
	st, err := os.Stat(src)
	if err != nil {
		return errcode.Wrap(errcode.JailFailed, err, "staging %s into the jail", src)
	}
	if !st.Mode().IsRegular() {
		return errcode.New(errcode.JailFailed, "staging %s into the jail: not a regular file", src)
	}
	if linkable(st) {
		if err := os.Link(src, dst); err == nil {
			return nil
		}
		// EXDEV (another filesystem) and friends: copy instead.
	}
	return copyReadOnly(src, dst)
}

// linkable reports whether a hard link to st keeps the file safe from the
// jail user: root owns it (so only root may chmod it) and only root may
// write it, while the jail user can read it.
func linkable(st os.FileInfo) bool {
	sys, ok := st.Sys().(*syscall.Stat_t)
	perm := st.Mode().Perm()
	return ok && sys.Uid == 0 && perm&0o022 == 0 && perm&0o004 != 0
}

// copyReadOnly copies src to a new root-owned 0444 file dst, sharing
// extents (FICLONE) where the filesystem can.
func copyReadOnly(src, dst string) (err error) {
	in, err := os.Open(src)
	if err != nil {
		return errcode.Wrap(errcode.JailFailed, err, "staging %s into the jail", src)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o444)
	if err != nil {
		return errcode.Wrap(errcode.JailFailed, err, "staging %s into the jail", src)
	}
	defer func() {
		if cerr := out.Close(); err == nil && cerr != nil {
			err = errcode.Wrap(errcode.JailFailed, cerr, "staging %s into the jail", src)
		}
		if err != nil {
			_ = os.Remove(dst)
		}
	}()
	if unix.IoctlFileClone(int(out.Fd()), int(in.Fd())) == nil {
		return nil
	}
	if _, err := io.Copy(out, in); err != nil {
		return errcode.Wrap(errcode.JailFailed, err, "copying %s into the jail", src)
	}
	// The umask may have taken bits away.
	if err := out.Chmod(0o444); err != nil {
		return errcode.Wrap(errcode.JailFailed, err, "chmod of %s", dst)
	}
	return nil
}

// cgroupMount is one cgroup filesystem from /proc/self/mountinfo.
type cgroupMount struct {
	path string
	v2   bool
	// opts are the superblock options; for v1 they name the controllers.
	opts []string
}

// readCgroupMounts lists the cgroup mounts of this mount namespace.
func readCgroupMounts() ([]cgroupMount, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, errcode.Wrap(errcode.JailFailed, err, "reading the mount table")
	}
	defer f.Close()
	return parseCgroupMounts(f)
}

// parseCgroupMounts reads mountinfo lines: "id parent dev root mountpoint
// opts [optional...] - fstype source superopts".
func parseCgroupMounts(r io.Reader) ([]cgroupMount, error) {
	var ms []cgroupMount
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		f, g := strings.Fields(pre), strings.Fields(post)
		if len(f) < 5 || len(g) < 3 || (g[0] != "cgroup" && g[0] != "cgroup2") {
			continue
		}
		ms = append(ms, cgroupMount{path: unescapeMountPath(f[4]), v2: g[0] == "cgroup2", opts: strings.Split(g[2], ",")})
	}
	if err := sc.Err(); err != nil {
		return nil, errcode.Wrap(errcode.JailFailed, err, "reading the mount table")
	}
	return ms, nil
}

// unescapeMountPath undoes mountinfo's octal escapes (\040 for a space).
func unescapeMountPath(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// cgroupBases returns, for each controller, the directory the jailer puts
// per-VM cgroups under: <mount>/<parent>. They are deduplicated (v2 has one
// mount; v1 controllers may share one). A controller that is not mounted,
// or on v2 not offered by the hierarchy, is an error naming it.
func cgroupBases(ms []cgroupMount, version int, controllers []string, parent string) ([]string, error) {
	var bases []string
	add := func(dir string) {
		if !slices.Contains(bases, dir) {
			bases = append(bases, dir)
		}
	}
	if version == 2 {
		i := slices.IndexFunc(ms, func(m cgroupMount) bool { return m.v2 })
		if i < 0 {
			return nil, errcode.New(errcode.JailFailed, "no cgroup2 filesystem is mounted").
				WithHint("use cgroup version 1, or boot with systemd.unified_cgroup_hierarchy=1")
		}
		have, err := os.ReadFile(filepath.Join(ms[i].path, "cgroup.controllers"))
		if err != nil {
			return nil, errcode.Wrap(errcode.JailFailed, err, "reading the cgroup2 controllers")
		}
		for _, c := range controllers {
			if !slices.Contains(strings.Fields(string(have)), c) {
				return nil, errcode.New(errcode.JailFailed, "the cgroup2 hierarchy at %s does not offer the %s controller (it offers %q)",
					ms[i].path, c, strings.TrimSpace(string(have))).
					WithHint("the controller is bound to cgroup v1 here: use cgroup version 1, or boot with systemd.unified_cgroup_hierarchy=1")
			}
		}
		add(filepath.Join(ms[i].path, parent))
		return bases, nil
	}
	for _, c := range controllers {
		i := slices.IndexFunc(ms, func(m cgroupMount) bool { return !m.v2 && slices.Contains(m.opts, c) })
		if i < 0 {
			return nil, errcode.New(errcode.JailFailed, "no cgroup v1 hierarchy has the %s controller", c).
				WithHint("use cgroup version 2")
		}
		add(filepath.Join(ms[i].path, parent))
	}
	return bases, nil
}

// CheckCgroups reports whether the host offers what the jailer needs for
// the CPU and memory limits under the given cgroup version (0 for the
// default), for `hyphae check`.
func CheckCgroups(version int) error {
	o := JailOptions{CgroupVersion: version}.withDefaults()
	ms, err := readCgroupMounts()
	if err != nil {
		return err
	}
	_, err = cgroupBases(ms, o.CgroupVersion, cgroupControllers(cgroupLimits(vmm.Spec{VCPUs: 1}, o)), DefaultBinary)
	return err
}

// prepareCgroups finds the VM's cgroup directories and, on v2, enables the
// controllers for the shared parent (the jailer's per-VM cgroup can only
// have cpu.max and memory.max when its parent delegates them). It returns
// the per-VM directories the jailer will create.
func (l jailLayout) prepareCgroups(spec vmm.Spec) ([]string, error) {
	ms, err := readCgroupMounts()
	if err != nil {
		return nil, err
	}
	controllers := cgroupControllers(cgroupLimits(spec, l.opts))
	bases, err := cgroupBases(ms, l.opts.CgroupVersion, controllers, l.execName)
	if err != nil {
		return nil, err
	}
	if l.opts.CgroupVersion == 2 {
		if err := enableControllers(filepath.Dir(bases[0]), bases[0], controllers); err != nil {
			return nil, err
		}
	}
	dirs := make([]string, len(bases))
	for i, b := range bases {
		dirs[i] = filepath.Join(b, l.id)
	}
	return dirs, nil
}

// enableControllers makes the v2 cgroup parent (a child of root) exist and
// delegate controllers: "+c" into root's and parent's subtree_control,
// skipping the writes where they are already on.
func enableControllers(root, parent string, controllers []string) error {
	if err := os.Mkdir(parent, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return errcode.Wrap(errcode.JailFailed, err, "creating the cgroup %s", parent)
	}
	for _, dir := range []string{root, parent} {
		path := filepath.Join(dir, "cgroup.subtree_control")
		have, err := os.ReadFile(path)
		if err != nil {
			return errcode.Wrap(errcode.JailFailed, err, "reading %s", path)
		}
		var add []string
		for _, c := range controllers {
			if !slices.Contains(strings.Fields(string(have)), c) {
				add = append(add, "+"+c)
			}
		}
		if len(add) == 0 {
			continue
		}
		if err := os.WriteFile(path, []byte(strings.Join(add, " ")), 0o644); err != nil {
			return errcode.Wrap(errcode.JailFailed, err, "enabling %s in %s", strings.Join(add, " "), path)
		}
	}
	return nil
}

// removeCgroups removes per-VM cgroup directories. A cgroup cannot be
// removed while a task is in it, and a killed Firecracker leaves only
// once the kernel has torn it down, so EBUSY is retried for a bounded
// time. Directories already gone are fine.
func removeCgroups(dirs []string) error {
	var errs []error
	for _, d := range dirs {
		deadline := time.Now().Add(cgroupRmdirWait)
		for {
			err := unix.Rmdir(d)
			if err == nil || errors.Is(err, unix.ENOENT) {
				break
			}
			if errors.Is(err, unix.EBUSY) && time.Now().Before(deadline) {
				time.Sleep(attachPause)
				continue
			}
			errs = append(errs, errcode.Wrap(errcode.StopFailed, err, "removing the cgroup %s", d))
			break
		}
	}
	return errors.Join(errs...)
}

// remove removes the jail directory and the VM's cgroups.
func (l jailLayout) remove(cgroups []string) error {
	var errs []error
	if err := os.RemoveAll(l.instanceDir); err != nil {
		errs = append(errs, errcode.Wrap(errcode.StopFailed, err, "removing the jail %s", l.instanceDir))
	}
	errs = append(errs, removeCgroups(cgroups))
	return errors.Join(errs...)
}

// CleanupJail removes what a jailed VM left behind: its jail directory and
// its cgroups. It is for a hyphae process that did not start the VM
// (orphan cleanup, or cleanup of a detached VM once its Firecracker is
// gone); binary is the Firecracker the VM ran (Options.Binary).
func CleanupJail(opts JailOptions, binary, id string) error {
	o := opts.withDefaults()
	if err := checkID("id", id, '-', maxInstanceID); err != nil {
		return err
	}
	if binary == "" {
		binary = DefaultBinary
	}
	execFile, err := resolveExecFile(binary)
	if err != nil {
		// The binary may have been removed since; the jail is still
		// named after it.
		execFile = binary
	}
	l := newJailLayout(o, execFile, id)
	var dirs []string
	if ms, err := readCgroupMounts(); err == nil {
		bases, _ := cgroupBases(ms, o.CgroupVersion, cgroupControllers(cgroupLimits(vmm.Spec{VCPUs: 1}, o)), l.execName)
		for _, b := range bases {
			dirs = append(dirs, filepath.Join(b, id))
		}
	}
	return l.remove(dirs)
}

// JailAPISocket is the host path of the API socket of the jailed VM id, for
// a hyphae process that did not start it (see RequestShutdown).
func JailAPISocket(opts JailOptions, binary, id string) (string, error) {
	execFile, err := resolveExecFile(binary)
	if err != nil {
		return "", err
	}
	return newJailLayout(opts.withDefaults(), execFile, id).host(jailAPISocket), nil
}

// spawnJailer runs the jailer with args and returns the Firecracker it
// leaves running. The jailer's own output goes to logPath. With
// --new-pid-ns the jailer exits once Firecracker runs and the PID comes
// from the jail's pid file; otherwise the jailer becomes Firecracker. The
// process is tracked through a pidfd (vmmproc.Attach), since with a new
// PID namespace it is not hyphae's child.
func (l jailLayout) spawnJailer(ctx context.Context, args []string, logPath string, m *Machine) (*vmmproc.Process, error) {
	bin, err := exec.LookPath(l.opts.JailerBinary)
	if err != nil {
		return nil, wrapHint(errcode.VMMUnavailable, err, "install the jailer of the same Firecracker release",
			"find %s", l.opts.JailerBinary)
	}
	logf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, errcode.Wrap(errcode.SpawnFailed, err, "open the jailer log")
	}
	defer logf.Close()
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Dir = filepath.Dir(logPath)
	if l.opts.NoDaemonize {
		// Keep terminal signals away, as vmmproc.Start does. Not with
		// --daemonize: setsid() fails for a process group leader.
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	}
	if err := cmd.Start(); err != nil {
		return nil, errcode.Wrap(errcode.SpawnFailed, err, "start %s", bin)
	}
	exited := make(chan struct{})
	var waitErr error
	go func() {
		waitErr = cmd.Wait()
		close(exited)
	}()
	tail := func() string { return vmmproc.Tail(logPath, 2048) }
	m.log.Debug("jailer started", "pid", cmd.Process.Pid, "args", args)

	pid := cmd.Process.Pid
	if !l.opts.NoNewPIDNS {
		select {
		case <-exited:
		case <-ctx.Done():
			_ = cmd.Process.Kill()
			<-exited
			return nil, errcode.Wrap(errcode.Timeout, ctx.Err(), "the jailer did not finish; its output ends:\n%s", tail())
		}
		if waitErr != nil {
			return nil, errcode.Wrap(errcode.BootFailed, waitErr, "the jailer failed; its output ends:\n%s", tail())
		}
		b, err := os.ReadFile(l.pidFile())
		if err != nil {
			return nil, errcode.Wrap(errcode.JailFailed, err, "the jailer exited without a pid file; its output ends:\n%s", tail())
		}
		if pid, err = strconv.Atoi(strings.TrimSpace(string(b))); err != nil || pid <= 0 {
			return nil, errcode.New(errcode.JailFailed, "the jailer's pid file %s holds %q", l.pidFile(), b)
		}
	}
	// Until it execs, the process runs the jailer's binary, and Attach
	// (rightly) refuses it.
	ticks, err := vmmproc.StartTicks(pid)
	tick := time.NewTicker(attachPause)
	defer tick.Stop()
	for {
		if err != nil {
			return nil, errcode.New(errcode.BootFailed, "firecracker (pid %d) exited during start; jailer output ends:\n%s", pid, tail())
		}
		p, aerr := vmmproc.Attach(vmmproc.Identity{PID: pid, StartTicks: ticks, Binary: l.execName}, m.log)
		if aerr == nil {
			return p, nil
		}
		select {
		case <-ctx.Done():
			killPID(pid, ticks)
			return nil, errcode.Wrap(errcode.Timeout, ctx.Err(), "firecracker (pid %d) did not start under the jailer; its output ends:\n%s", pid, tail())
		case <-tick.C:
		}
		var now uint64
		if now, err = vmmproc.StartTicks(pid); err == nil && now != ticks {
			err = errors.New("pid reused")
		}
		if err == nil && l.opts.NoNewPIDNS {
			select {
			case <-exited:
				err = errors.New("exited")
			default:
			}
		}
	}
}

// killPID sends SIGKILL to pid if it is still the process that started at
// ticks, through a pidfd so that a reused PID is never hit.
func killPID(pid int, ticks uint64) {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return
	}
	defer unix.Close(fd)
	if now, err := vmmproc.StartTicks(pid); err == nil && now == ticks {
		_ = unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0)
	}
}

// serialDevice is the body of PUT /serial (v1.14 and later).
type serialDevice struct {
	SerialOutPath string `json:"serial_out_path"`
}

// newJail checks opts.Jail for spec, resolves the Firecracker binary the
// jailer will copy and returns the VM's jail with the configuration
// rewritten to the paths inside it.
func newJail(spec vmm.Spec, opts *Options) (*jailLayout, Config, error) {
	o := opts.Jail.withDefaults()
	if err := o.validate(); err != nil {
		return nil, Config{}, err
	}
	if opts.UseConfigFile && !o.NoDaemonize {
		return nil, Config{}, errcode.New(errcode.InvalidArgument,
			"jail: a daemonized Firecracker logs the console only through PUT /serial, which the v1.16.1 config file cannot carry").
			WithHint("configure through the API, or set NoDaemonize")
	}
	execFile, err := resolveExecFile(opts.Binary)
	if err != nil {
		return nil, Config{}, err
	}
	js, err := jailSpec(spec)
	if err != nil {
		return nil, Config{}, err
	}
	cfg, err := BuildConfig(js, ConfigOptions{ScratchPath: jailScratch, VsockPath: jailVsock, LogPath: jailLog})
	if err != nil {
		return nil, Config{}, err
	}
	l := newJailLayout(o, execFile, spec.ID)
	l.execFile = execFile
	return &l, cfg, nil
}

// spawnJailed stages the jail and starts Firecracker in it through the
// jailer; the jail, the cgroups and the process are Cleanup's to remove.
func (m *Machine) spawnJailed(ctx context.Context) (*vmmproc.Process, error) {
	j := m.jail
	cgroups, err := j.prepareCgroups(m.spec)
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	m.jailCgroups = cgroups
	m.mu.Unlock()
	begin := time.Now()
	if err := j.stage(ctx, m.spec, m.opts.ScratchSize, !j.opts.NoDaemonize); err != nil {
		return nil, err
	}
	m.log.Debug("jail staged", "root", j.root, "took", time.Since(begin))
	configFile := ""
	if m.opts.UseConfigFile {
		doc, err := json.MarshalIndent(m.cfg, "", "  ")
		if err != nil {
			return nil, errcode.Wrap(errcode.SpawnFailed, err, "encoding the Firecracker config")
		}
		if err := j.writeOwned(jailConfig, doc); err != nil {
			return nil, err
		}
		configFile = jailConfig
	}
	// Without --daemonize the jailer's output is Firecracker's, the
	// console; with it only the jailer's own messages land here.
	logPath := m.consolePath
	if !j.opts.NoDaemonize {
		logPath = filepath.Join(m.dir, jailerLogName)
	}
	jctx, cancel := context.WithTimeout(ctx, m.opts.StartTimeout)
	defer cancel()
	return j.spawnJailer(jctx, JailerArgs(m.spec, j.execFile, j.opts, configFile), logPath, m)
}

// wrapHint is errcode.Wrap with a hint.
func wrapHint(code errcode.Code, err error, hint, format string, args ...any) error {
	e := &errcode.Error{Code: code, Message: fmt.Sprintf(format, args...), Err: err}
	return e.WithHint(hint)
}

// CheckChrootBase reports whether jails can live under dir (the nearest
// existing ancestor is checked when dir does not exist yet): the jailer
// creates /dev/kvm and /dev/net/tun inside each jail, which do not work on
// a filesystem mounted nodev, and hard links need the images on the same
// filesystem (else they are copied). For `hyphae check`.
func CheckChrootBase(dir string) error {
	if dir == "" {
		dir = DefaultChrootBaseDir
	}
	p := filepath.Clean(dir)
	for {
		if _, err := os.Stat(p); err == nil || p == "/" {
			break
		}
		p = filepath.Dir(p)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(p, &st); err != nil {
		return errcode.Wrap(errcode.JailFailed, err, "checking the chroot base %s", dir)
	}
	if st.Flags&unix.ST_NODEV != 0 {
		return errcode.New(errcode.JailFailed, "the chroot base %s is on a filesystem mounted nodev (at %s): the jail's /dev/kvm would not open", dir, p).
			WithHint("choose a chroot base on a filesystem mounted without nodev")
	}
	return nil
}
