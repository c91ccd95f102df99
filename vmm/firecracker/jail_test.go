package firecracker

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/internal/testenv"
	"github.com/hyphae-run/hyphae/vmm"
)

// An unprivileged uid:gid that owns nothing on the host, for the jail.
const testJailUID, testJailGID = 60123, 60124

func TestJailerArgs(t *testing.T) {
	spec := vmm.Spec{ID: "vm-1", VCPUs: 2, MemoryMiB: 256}
	tail := []string{"--", "--api-sock", "/run/firecracker.socket"}
	cases := []struct {
		name       string
		opts       JailOptions
		configFile string
		want       []string
	}{
		{"defaults", JailOptions{UID: 123, GID: 100}, "", slices.Concat([]string{
			"--id", "vm-1", "--exec-file", "/usr/bin/firecracker", "--uid", "123", "--gid", "100",
			"--chroot-base-dir", "/srv/jailer", "--cgroup-version", "2",
			"--cgroup", "cpu.max=200000 100000", "--cgroup", "memory.max=335544320",
			"--new-pid-ns", "--daemonize"}, tail)},
		{"networked, config file", JailOptions{UID: 123, GID: 100, NetNS: "/var/run/netns/hy0", ChrootBaseDir: "/var/lib/jails", MemoryOverheadMiB: 16}, "/config.json", slices.Concat([]string{
			"--id", "vm-1", "--exec-file", "/usr/bin/firecracker", "--uid", "123", "--gid", "100",
			"--chroot-base-dir", "/var/lib/jails", "--cgroup-version", "2",
			"--cgroup", "cpu.max=200000 100000", "--cgroup", "memory.max=285212672",
			"--netns", "/var/run/netns/hy0", "--new-pid-ns", "--daemonize"}, tail, []string{"--config-file", "/config.json"})},
		{"cgroup v1, foreground, shared pid namespace", JailOptions{UID: 7, GID: 8, CgroupVersion: 1, NoNewPIDNS: true, NoDaemonize: true}, "", slices.Concat([]string{
			"--id", "vm-1", "--exec-file", "/usr/bin/firecracker", "--uid", "7", "--gid", "8",
			"--chroot-base-dir", "/srv/jailer", "--cgroup-version", "1",
			"--cgroup", "cpu.cfs_period_us=100000", "--cgroup", "cpu.cfs_quota_us=200000",
			"--cgroup", "memory.limit_in_bytes=335544320"}, tail)},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := JailerArgs(spec, "/usr/bin/firecracker", c.opts, c.configFile)
			if !slices.Equal(got, c.want) {
				t.Errorf("JailerArgs =\n%q\nwant\n%q", got, c.want)
			}
			sep := slices.Index(got, "--")
			if sep < 0 {
				t.Fatal("no -- separator")
			}
			for _, a := range got {
				if strings.HasPrefix(a, "--") && strings.Contains(a, "=") {
					t.Errorf("%q: the jailer refuses --flag=value", a)
				}
			}
			if slices.Contains(got[sep:], "--id") {
				t.Error("--id after --: the jailer passes it itself")
			}
		})
	}
	// The limits follow the spec.
	one := JailerArgs(vmm.Spec{ID: "x", VCPUs: 1, MemoryMiB: 128}, "/fc", JailOptions{UID: 1, GID: 1}, "")
	for _, want := range []string{"cpu.max=100000 100000", "memory.max=201326592"} {
		if !slices.Contains(one, want) {
			t.Errorf("1 vCPU, 128 MiB: %q missing from %q", want, one)
		}
	}
}

func TestJailOptionsRejected(t *testing.T) {
	spec := testSpec(t)
	ok := JailOptions{UID: testJailUID, GID: testJailGID}
	cases := []struct {
		name string
		edit func(*Options)
		code errcode.Code
	}{
		{"root uid", func(o *Options) { o.Jail.UID = 0 }, errcode.InvalidArgument},
		{"root gid", func(o *Options) { o.Jail.GID = 0 }, errcode.InvalidArgument},
		{"relative base", func(o *Options) { o.Jail.ChrootBaseDir = "srv/jailer" }, errcode.InvalidArgument},
		{"base is /", func(o *Options) { o.Jail.ChrootBaseDir = "/" }, errcode.InvalidArgument},
		{"unclean base", func(o *Options) { o.Jail.ChrootBaseDir = "/srv/../etc" }, errcode.InvalidArgument},
		{"cgroup v3", func(o *Options) { o.Jail.CgroupVersion = 3 }, errcode.InvalidArgument},
		{"relative netns", func(o *Options) { o.Jail.NetNS = "netns/x" }, errcode.InvalidArgument},
		{"config file while daemonized", func(o *Options) { o.UseConfigFile = true }, errcode.InvalidArgument},
		{"no firecracker", func(o *Options) { o.Binary = "/nonexistent/firecracker" }, errcode.VMMUnavailable},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			j := ok
			o := Options{Binary: standinPath, Jail: &j}
			c.edit(&o)
			if _, err := New(spec, o); !errcode.HasCode(err, c.code) {
				t.Errorf("New = %v, want %s", err, c.code)
			}
		})
	}
	t.Run("writable extra drive", func(t *testing.T) {
		s := testSpec(t)
		s.Drives = append(s.Drives, vmm.Drive{ID: "data", Path: s.Kernel})
		j := ok
		if _, err := New(s, Options{Binary: standinPath, Jail: &j}); !errcode.HasCode(err, errcode.InvalidSpec) {
			t.Errorf("New = %v, want InvalidSpec", err)
		}
	})
}

func TestParseCgroupMounts(t *testing.T) {
	const mountinfo = `31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/un\040ified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
garbage line
`
	got, err := parseCgroupMounts(strings.NewReader(mountinfo))
	if err != nil {
		t.Fatal(err)
	}
	want := []cgroupMount{
		{path: "/sys/fs/cgroup/cpu,cpuacct", opts: []string{"rw", "cpu", "cpuacct"}},
		{path: "/sys/fs/cgroup/memory", opts: []string{"rw", "memory"}},
		{path: "/sys/fs/cgroup/un ified", v2: true, opts: []string{"rw", "nsdelegate"}},
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("parseCgroupMounts =\n%v\nwant\n%v", got, want)
	}
	bases, err := cgroupBases(got, 1, []string{"cpu", "memory"}, "firecracker")
	if err != nil || !slices.Equal(bases, []string{"/sys/fs/cgroup/cpu,cpuacct/firecracker", "/sys/fs/cgroup/memory/firecracker"}) {
		t.Errorf("v1 bases = %q, %v", bases, err)
	}
	if _, err := cgroupBases(got, 1, []string{"pids"}, "firecracker"); !errcode.HasCode(err, errcode.JailFailed) {
		t.Errorf("v1 without pids: %v", err)
	}

	// A v2 hierarchy offers the controllers its cgroup.controllers lists.
	root := t.TempDir()
	if err := os.WriteFile(filepath.Join(root, "cgroup.controllers"), []byte("cpuset cpu io memory pids\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	v2 := []cgroupMount{{path: root, v2: true}}
	if bases, err := cgroupBases(v2, 2, []string{"cpu", "memory"}, "fc"); err != nil || !slices.Equal(bases, []string{filepath.Join(root, "fc")}) {
		t.Errorf("v2 bases = %q, %v", bases, err)
	}
	if _, err := cgroupBases(v2, 2, []string{"hugetlb"}, "fc"); !errcode.HasCode(err, errcode.JailFailed) {
		t.Errorf("v2 without hugetlb: %v", err)
	}
	if _, err := cgroupBases(got[:2], 2, []string{"cpu"}, "fc"); !errcode.HasCode(err, errcode.JailFailed) {
		t.Errorf("no v2 mount: %v", err)
	}
}

func FuzzParseCgroupMounts(f *testing.F) {
	f.Add("40 31 0:37 / /sys/fs/cgroup/un\\040ified rw - cgroup2 cgroup2 rw\n")
	f.Add("1 2 3 4 \\0 - cgroup x a,b\n - - -\n")
	f.Fuzz(func(t *testing.T, s string) {
		ms, err := parseCgroupMounts(strings.NewReader(s))
		if err == nil {
			for _, m := range ms {
				if m.path == "" && !strings.Contains(s, " - ") {
					t.Errorf("mount %+v from no mount line", m)
				}
			}
		}
	})
}

// jailTestOptions are jail options for tests: the test's uid:gid and a
// short chroot base (socket paths are limited to 108 bytes).
func jailTestOptions(t *testing.T) JailOptions {
	t.Helper()
	base, err := os.MkdirTemp("", "hj")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	return JailOptions{UID: testJailUID, GID: testJailGID, ChrootBaseDir: base}
}

func statT(t *testing.T, path string) *syscall.Stat_t {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return &st
}

// TestStageJail stages a jail for real and checks what the jailed
// Firecracker would find, and that the registry files are untouched.
func TestStageJail(t *testing.T) {
	testenv.RequiresRoot(t)
	testenv.RequiresTool(t, "mkfs.ext4")
	spec := testSpec(t)
	// A registry-style extra drive the jail user could not read in place:
	// it must be copied, not linked.
	private := filepath.Join(t.TempDir(), "private.ext4")
	if err := os.WriteFile(private, []byte("private bytes"), 0o600); err != nil {
		t.Fatal(err)
	}
	spec.Drives = append(spec.Drives, vmm.Drive{ID: "data", Path: private, ReadOnly: true})
	before := map[string]syscall.Stat_t{}
	for _, p := range []string{spec.Kernel, spec.Drives[0].Path, private} {
		before[p] = *statT(t, p)
	}

	jo := jailTestOptions(t)
	m, err := New(spec, Options{Binary: standinPath, Jail: &jo, ScratchSize: 64 << 20})
	if err != nil {
		t.Fatal(err)
	}
	j := m.jail
	if want := filepath.Join(jo.ChrootBaseDir, "firecracker-standin", spec.ID, "root"); j.root != want {
		t.Errorf("jail root %s, want %s", j.root, want)
	}
	if err := j.stage(context.Background(), spec, 64<<20, true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = j.remove(nil) })

	// Paths in the configuration are the jail's, and name staged files.
	cfg := m.Config()
	inJail := []string{cfg.BootSource.KernelImagePath, cfg.Logger.LogPath}
	for _, d := range cfg.Drives {
		inJail = append(inJail, d.PathOnHost)
	}
	if !slices.Equal(inJail, []string{"/vmlinux", "/firecracker.log", "/drive0", "/scratch.ext4", "/drive1"}) {
		t.Errorf("config paths %q", inJail)
	}
	if cfg.Vsock.UDSPath != "/vsock.sock" {
		t.Errorf("vsock path %q", cfg.Vsock.UDSPath)
	}
	for _, p := range inJail {
		if _, err := os.Stat(j.host(p)); err != nil {
			t.Errorf("%s not staged: %v", p, err)
		}
	}

	type want struct {
		path      string
		uid, gid  uint32
		perm      uint32
		sameInode string // the source it must be a hard link of
	}
	for _, w := range []want{
		{j.root, testJailUID, testJailGID, 0o700, ""},
		{j.host("/vmlinux"), 0, 0, 0o644, spec.Kernel},
		{j.host("/drive0"), 0, 0, 0o644, spec.Drives[0].Path},
		{j.host("/drive1"), 0, 0, 0o444, ""},
		{j.host("/scratch.ext4"), testJailUID, testJailGID, 0o600, ""},
		{j.host("/firecracker.log"), testJailUID, testJailGID, 0o600, ""},
		{j.host("/console.log"), testJailUID, testJailGID, 0o600, ""},
	} {
		st := statT(t, w.path)
		if st.Uid != w.uid || st.Gid != w.gid || st.Mode&0o7777 != w.perm {
			t.Errorf("%s: owner %d:%d mode %o, want %d:%d %o", w.path, st.Uid, st.Gid, st.Mode&0o7777, w.uid, w.gid, w.perm)
		}
		if w.sameInode != "" && st.Ino != before[w.sameInode].Ino {
			t.Errorf("%s is not a hard link of %s", w.path, w.sameInode)
		}
	}
	if st := statT(t, j.host("/drive1")); st.Ino == before[private].Ino {
		t.Error("a file the jail user cannot read in place was linked, not copied")
	}
	if b, _ := os.ReadFile(j.host("/drive1")); string(b) != "private bytes" {
		t.Errorf("copied drive holds %q", b)
	}
	// The registry files keep their owner and mode: nothing was chowned.
	for p, st0 := range before {
		st := statT(t, p)
		if st.Uid != st0.Uid || st.Gid != st0.Gid || st.Mode != st0.Mode {
			t.Errorf("%s changed: %d:%d %o, was %d:%d %o", p, st.Uid, st.Gid, st.Mode, st0.Uid, st0.Gid, st0.Mode)
		}
	}
	// Read by the jail user: the scratch layer opens read-write, the
	// linked image read-only but not read-write.
	for _, c := range []struct {
		path     string
		flag     int
		allowed  bool
		describe string
	}{
		{j.host("/scratch.ext4"), os.O_RDWR, true, "scratch read-write"},
		{j.host("/drive0"), os.O_RDONLY, true, "root image read-only"},
		{j.host("/drive0"), os.O_RDWR, false, "root image read-write"},
		{j.host("/drive1"), os.O_RDWR, false, "copied drive read-write"},
	} {
		if got := openAs(t, c.path, c.flag); got != c.allowed {
			t.Errorf("%s as the jail user: allowed=%v, want %v", c.describe, got, c.allowed)
		}
	}

	// Removal is complete and idempotent.
	for i := range 2 {
		if err := j.remove(nil); err != nil {
			t.Fatalf("remove #%d: %v", i+1, err)
		}
	}
	if _, err := os.Stat(j.instanceDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("jail still there: %v", err)
	}
	for p := range before {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("source %s gone with the jail: %v", p, err)
		}
	}
}

// openAs reports whether the jail user may open path with flag. The
// directories above the jail root are root's, as for the real jail, so the
// file is opened relative to its directory (opened as root) on a thread
// whose filesystem uid and gid are the jail user's: only the jail root and
// the file itself are checked, as for the jailed Firecracker.
func openAs(t *testing.T, path string, flag int) bool {
	t.Helper()
	dir, err := os.Open(filepath.Dir(path))
	if err != nil {
		t.Fatal(err)
	}
	defer dir.Close()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	unix.Setfsgid(testJailGID)
	unix.Setfsuid(testJailUID)
	fd, err := unix.Openat(int(dir.Fd()), filepath.Base(path), flag|unix.O_CLOEXEC, 0)
	unix.Setfsuid(0)
	unix.Setfsgid(0)
	if err == nil {
		unix.Close(fd)
	}
	return err == nil
}

// TestStageFailureLeavesNothing: a staging step that fails removes the
// whole jail.
func TestStageFailureLeavesNothing(t *testing.T) {
	testenv.RequiresRoot(t)
	testenv.RequiresTool(t, "mkfs.ext4")
	for _, c := range []struct {
		name string
		edit func(*vmm.Spec)
	}{
		{"kernel missing", func(s *vmm.Spec) { s.Kernel += ".missing" }},
		{"root image missing", func(s *vmm.Spec) { s.Drives[0].Path += ".missing" }},
		{"drive is a directory", func(s *vmm.Spec) {
			s.Drives = append(s.Drives, vmm.Drive{ID: "dir", Path: filepath.Dir(s.Kernel), ReadOnly: true})
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			spec := testSpec(t)
			c.edit(&spec)
			jo := jailTestOptions(t)
			m, err := New(spec, Options{Binary: standinPath, Jail: &jo})
			if err != nil {
				t.Fatal(err)
			}
			err = m.jail.stage(context.Background(), spec, 64<<20, true)
			if !errcode.HasCode(err, errcode.JailFailed) {
				t.Fatalf("stage = %v, want JailFailed", err)
			}
			if _, err := os.Stat(m.jail.instanceDir); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("jail left behind after a failed stage: %v", err)
			}
		})
	}
}

// cgroupVersionForTest picks the cgroup version whose cpu and memory
// controllers this host offers (2 first), or skips.
func cgroupVersionForTest(t *testing.T) int {
	t.Helper()
	for _, v := range []int{2, 1} {
		if CheckCgroups(v) == nil {
			return v
		}
	}
	testenv.Unavailable(t, "neither cgroup v2 nor v1 offers the cpu and memory controllers here")
	return 0
}

// TestCgroupsReal creates the VM's cgroup for real under a test parent,
// writes the limits the jailer would write, puts a process in, and checks
// that removeCgroups waits out the process's exit and removes it.
func TestCgroupsReal(t *testing.T) {
	testenv.RequiresRoot(t)
	for _, version := range []int{2, 1} {
		t.Run(fmt.Sprintf("v%d", version), func(t *testing.T) {
			if err := CheckCgroups(version); err != nil {
				// A host offers the cpu and memory controllers on one
				// hierarchy only, and installing packages cannot move
				// them; the version that is missing here is not a
				// prerequisite CI could provide, as long as the other one
				// is tested.
				if CheckCgroups(3-version) == nil {
					testenv.Optional(t, fmt.Sprintf("cgroup v%d cannot hold the limits on this host (%v); v%d is tested instead", version, err, 3-version))
				}
				testenv.Unavailable(t, fmt.Sprintf("cgroup v%d cannot hold the limits here: %v", version, err))
			}
			o := JailOptions{CgroupVersion: version}.withDefaults()
			spec := vmm.Spec{VCPUs: 2, MemoryMiB: 256}
			limits := cgroupLimits(spec, o)
			ms, err := readCgroupMounts()
			if err != nil {
				t.Fatal(err)
			}
			parent := fmt.Sprintf("hyphae-test-%d", os.Getpid())
			bases, err := cgroupBases(ms, version, cgroupControllers(limits), parent)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				for _, b := range bases {
					_ = syscall.Rmdir(b)
				}
			})
			if version == 2 {
				if err := enableControllers(filepath.Dir(bases[0]), bases[0], cgroupControllers(limits)); err != nil {
					t.Fatal(err)
				}
			}
			var dirs []string
			for _, b := range bases {
				d := filepath.Join(b, "vm-1")
				if err := os.MkdirAll(d, 0o755); err != nil {
					t.Fatal(err)
				}
				dirs = append(dirs, d)
			}
			t.Cleanup(func() { _ = removeCgroups(dirs) })
			for _, l := range limits {
				dir := dirs[0]
				for _, d := range dirs {
					if _, err := os.Stat(filepath.Join(d, l.file)); err == nil {
						dir = d
					}
				}
				if err := os.WriteFile(filepath.Join(dir, l.file), []byte(l.value+"\n"), 0); err != nil {
					t.Fatalf("writing %s=%q: %v", l.file, l.value, err)
				}
				b, err := os.ReadFile(filepath.Join(dir, l.file))
				if err != nil || strings.TrimSpace(string(b)) != l.value {
					t.Errorf("%s reads %q, %v; want %q", l.file, b, err, l.value)
				}
			}
			sleeper := exec.Command("sleep", "60")
			if err := sleeper.Start(); err != nil {
				t.Fatal(err)
			}
			procs := "cgroup.procs"
			if version == 1 {
				procs = "tasks"
			}
			for _, d := range dirs {
				if err := os.WriteFile(filepath.Join(d, procs), []byte(strconv.Itoa(sleeper.Process.Pid)), 0); err != nil {
					t.Fatal(err)
				}
			}
			if err := syscall.Rmdir(dirs[0]); !errors.Is(err, syscall.EBUSY) {
				t.Errorf("rmdir of a populated cgroup: %v, want EBUSY", err)
			}
			_ = sleeper.Process.Kill()
			done := make(chan struct{})
			go func() { _ = sleeper.Wait(); close(done) }()
			if err := removeCgroups(dirs); err != nil {
				t.Fatal(err)
			}
			<-done
			for _, d := range dirs {
				if _, err := os.Stat(d); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("%s still there: %v", d, err)
				}
			}
			if err := removeCgroups(dirs); err != nil {
				t.Errorf("second removeCgroups: %v", err)
			}
		})
	}
}

// jailStandins builds the Firecracker and jailer stand-ins statically (the
// jail holds nothing but the exec file) into a fresh directory.
func jailStandins(t *testing.T) (firecracker, jailer string) {
	t.Helper()
	dir := t.TempDir()
	firecracker = filepath.Join(dir, "firecracker-standin")
	jailer = filepath.Join(dir, "jailer-standin")
	for pkg, out := range map[string]string{"./internal/standin": firecracker, "./internal/jailerstandin": jailer} {
		cmd := exec.Command("go", "build", "-o", out, pkg)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("building %s: %v\n%s", pkg, err, b)
		}
	}
	return firecracker, jailer
}

// processGone reports whether pid has exited (a zombie waiting for its
// parent counts: it runs nothing and holds nothing).
func processGone(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	return len(f) > 0 && f[0] == "Z"
}

// procStatusIDs returns the real uid and gid of pid.
func procStatusIDs(t *testing.T, pid int) (uid, gid string) {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, _ := strings.Cut(sc.Text(), ":")
		switch k {
		case "Uid":
			uid = strings.Fields(v)[0]
		case "Gid":
			gid = strings.Fields(v)[0]
		}
	}
	return uid, gid
}

// TestJailedLifecycle runs the whole Machine lifecycle through the jailer
// stand-in with the Firecracker stand-in as the exec file: staging, the
// jailer's chroot, uid, cgroups, pid file and daemonizing for real, the
// API and vsock through the jail, and cleanup of all of it.
func TestJailedLifecycle(t *testing.T) {
	testenv.RequiresRoot(t)
	testenv.RequiresTool(t, "mkfs.ext4")
	version := cgroupVersionForTest(t)
	fc, jailer := jailStandins(t)
	for _, c := range []struct {
		name        string
		noPIDNS     bool
		noDaemonize bool
		configFile  bool
	}{
		{"defaults", false, false, false},
		{"foreground", false, true, false},
		{"foreground config file", false, true, true},
		{"shared pid namespace", true, false, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Setenv("FIRECRACKER_STANDIN_LISTEN_DELAY", "200ms")
			jo := jailTestOptions(t)
			jo.JailerBinary, jo.CgroupVersion, jo.NoNewPIDNS, jo.NoDaemonize = jailer, version, c.noPIDNS, c.noDaemonize
			spec := testSpec(t)
			m, err := New(spec, Options{Binary: fc, Jail: &jo, ScratchSize: 64 << 20, UseConfigFile: c.configFile})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				_ = m.Cleanup()
				removeParentCgroups(m)
			})
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if err := m.Start(ctx); err != nil {
				t.Fatal(err)
			}
			info := m.Info()
			if info.State != vmm.StateRunning || info.PID <= 0 {
				t.Fatalf("info after start: %+v", info)
			}
			pid := info.PID
			if uid, gid := procStatusIDs(t, pid); uid != strconv.Itoa(testJailUID) || gid != strconv.Itoa(testJailGID) {
				t.Errorf("firecracker runs as %s:%s, want %d:%d", uid, gid, testJailUID, testJailGID)
			}
			if root, err := os.Readlink(fmt.Sprintf("/proc/%d/root", pid)); err != nil || root != m.jail.root {
				t.Errorf("firecracker's root is %q (%v), want the jail %s", root, err, m.jail.root)
			}
			ours, _ := os.Readlink("/proc/self/ns/pid")
			theirs, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/pid", pid))
			if (ours != theirs) != !c.noPIDNS {
				t.Errorf("pid namespace %s, ours %s, new namespace wanted: %v", theirs, ours, !c.noPIDNS)
			}
			ourSid, _ := unix.Getsid(0)
			if sid, err := unix.Getsid(pid); err != nil || (sid != ourSid) != !c.noDaemonize {
				t.Errorf("session %d (%v) of pid %d, ours %d, daemonized wanted: %v", sid, err, pid, ourSid, !c.noDaemonize)
			}
			// The cgroups exist with the spec's limits, and hold it.
			if len(m.jailCgroups) == 0 {
				t.Fatal("no cgroups recorded")
			}
			want := map[string]string{}
			for _, l := range cgroupLimits(spec, m.jail.opts) {
				want[l.file] = l.value
			}
			for _, d := range m.jailCgroups {
				for f, v := range want {
					b, err := os.ReadFile(filepath.Join(d, f))
					if err == nil && strings.TrimSpace(string(b)) != v {
						t.Errorf("%s/%s = %q, want %q", d, f, b, v)
					}
					if err == nil {
						delete(want, f)
					}
				}
				procs, _ := os.ReadFile(filepath.Join(d, "cgroup.procs"))
				if !slices.Contains(strings.Fields(string(procs)), strconv.Itoa(pid)) {
					t.Errorf("pid %d not in %s (%q)", pid, d, procs)
				}
			}
			if len(want) > 0 {
				t.Errorf("limits not found in %q: %v", m.jailCgroups, want)
			}

			conn, err := m.DialChannel(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := conn.Write([]byte("through the jail\n")); err != nil {
				t.Fatal(err)
			}
			_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			if got, err := bufio.NewReader(conn).ReadString('\n'); err != nil || got != "through the jail\n" {
				t.Errorf("echo: %q, %v", got, err)
			}
			conn.Close()

			if err := m.Stop(ctx, 10*time.Second); err != nil {
				t.Fatal(err)
			}
			if err := m.Wait(ctx); err != nil {
				t.Errorf("Wait: %v", err)
			}
			con := consoleText(t, m)
			for _, w := range []string{"booting /vmlinux", "drive rootfs: /drive0", "Ctrl+Alt+Del: rebooting"} {
				if !strings.Contains(con, w) {
					t.Errorf("console lacks %q:\n%s", w, con)
				}
			}
			cgroups := slices.Clone(m.jailCgroups)
			for i := range 2 {
				if err := m.Cleanup(); err != nil {
					t.Fatalf("Cleanup #%d: %v", i+1, err)
				}
			}
			if !processGone(pid) {
				t.Errorf("firecracker %d still runs", pid)
			}
			for _, p := range append(cgroups, m.jail.instanceDir, m.dir) {
				if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("%s still there after Cleanup: %v", p, err)
				}
			}
		})
	}
}

// removeParentCgroups removes the shared parent cgroups the stand-in
// jailer made for the test's exec file (real ones stay: they are shared).
func removeParentCgroups(m *Machine) {
	for _, d := range m.jailCgroups {
		_ = syscall.Rmdir(filepath.Dir(d))
	}
}

// TestJailedStartFailures: a jailed start that fails says why with a
// coded error and leaves no process, jail, cgroup or runtime directory.
func TestJailedStartFailures(t *testing.T) {
	testenv.RequiresRoot(t)
	testenv.RequiresTool(t, "mkfs.ext4")
	version := cgroupVersionForTest(t)
	fc, jailer := jailStandins(t)
	cases := []struct {
		name string
		env  map[string]string
		edit func(*vmm.Spec, *Options)
		code errcode.Code
	}{
		{"no jailer", nil, func(_ *vmm.Spec, o *Options) { o.Jail.JailerBinary = "/nonexistent/jailer" }, errcode.VMMUnavailable},
		{"kernel missing", nil, func(s *vmm.Spec, _ *Options) { s.Kernel += ".missing" }, errcode.JailFailed},
		{"api socket too slow", map[string]string{"FIRECRACKER_STANDIN_SOCKET_DELAY": "1h"},
			func(_ *vmm.Spec, o *Options) { o.StartTimeout = 500 * time.Millisecond }, errcode.Timeout},
		{"jailer refuses the network namespace", nil, func(_ *vmm.Spec, o *Options) { o.Jail.NetNS = "/nonexistent/netns" }, errcode.BootFailed},
		{"jailer fails, shared pid namespace", nil, func(_ *vmm.Spec, o *Options) {
			o.Jail.NetNS, o.Jail.NoNewPIDNS = "/nonexistent/netns", true
		}, errcode.BootFailed},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			for k, v := range c.env {
				t.Setenv(k, v)
			}
			jo := jailTestOptions(t)
			jo.JailerBinary, jo.CgroupVersion = jailer, version
			spec := testSpec(t)
			opts := Options{Binary: fc, Jail: &jo, ScratchSize: 64 << 20}
			c.edit(&spec, &opts)
			m, err := New(spec, opts)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { removeParentCgroups(m) })
			err = m.Start(context.Background())
			if !errcode.HasCode(err, c.code) {
				t.Fatalf("Start = %v, want %s", err, c.code)
			}
			pid := m.Info().PID
			cgroups := slices.Clone(m.jailCgroups)
			if err := m.Cleanup(); err != nil {
				t.Fatal(err)
			}
			if pid > 0 && !processGone(pid) {
				t.Errorf("process %d left running", pid)
			}
			for _, p := range append(cgroups, m.jail.instanceDir, m.dir) {
				if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("%s left behind: %v", p, err)
				}
			}
		})
	}
}

// TestRealJailer boots realRoot under the real jailer where it,
// Firecracker and a KVM that runs guests exist. It needs root and the jail
// user (DefaultJailUser).
func TestRealJailer(t *testing.T) {
	kernel := realFirecrackerKernel(t, true)
	testenv.RequiresRoot(t)
	uid, gid, err := LookupJailUser("")
	if err != nil {
		testenv.Optional(t, err.Error())
	}
	dir := t.TempDir()
	root := realRoot(t)
	spec := vmm.Spec{
		ID: "fc-jail-real", VCPUs: 1, MemoryMiB: 128, Kernel: kernel,
		Drives:     []vmm.Drive{{ID: "rootfs", Path: root, Root: true}},
		RuntimeDir: filepath.Join(dir, "run"),
	}
	jo := jailTestOptions(t)
	jo.UID, jo.GID = uid, gid
	jo.CgroupVersion = cgroupVersionForTest(t)
	m, err := New(spec, Options{Jail: &jo})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Cleanup()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := m.Start(ctx); err != nil {
		t.Fatal(err)
	}
	_ = m.Wait(ctx)
	checkRealConsole(t, consoleText(t, m))
	if err := m.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(m.jail.instanceDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("jail left behind: %v", err)
	}
}

func TestCheckChrootBase(t *testing.T) {
	testenv.RequiresRoot(t)
	dir := t.TempDir()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil || st.Flags&unix.ST_NODEV != 0 {
		testenv.Unavailable(t, "the temporary directory is on a nodev filesystem")
	}
	if err := CheckChrootBase(filepath.Join(dir, "not", "yet")); err != nil {
		t.Errorf("base on %s: %v", dir, err)
	}
	nodev := filepath.Join(dir, "nodev")
	if err := os.Mkdir(nodev, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", nodev, "tmpfs", unix.MS_NODEV, "size=1m"); err != nil {
		testenv.Unavailable(t, "cannot mount a tmpfs: "+err.Error())
	}
	t.Cleanup(func() { _ = unix.Unmount(nodev, unix.MNT_DETACH) })
	if err := CheckChrootBase(filepath.Join(nodev, "jails")); !errcode.HasCode(err, errcode.JailFailed) {
		t.Errorf("nodev base: %v, want JailFailed", err)
	}
}
