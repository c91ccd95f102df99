package vmmproc

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
)

func TestRuntimeDir(t *testing.T) {
	tests := []struct {
		name, hyphae, xdg, want string
	}{
		{"override", "/srv/run", "/run/user/0", "/srv/run"},
		{"xdg", "", "/run/user/0", "/run/user/0/hyphae"},
		{"fallback", "", "", filepath.Join(os.TempDir(), "hyphae")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv(EnvRuntimeDir, tt.hyphae)
			t.Setenv("XDG_RUNTIME_DIR", tt.xdg)
			if got := RuntimeDir(); got != tt.want {
				t.Errorf("RuntimeDir() = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestVMDir(t *testing.T) {
	t.Setenv(EnvRuntimeDir, "/r")
	for _, tt := range []struct {
		id, want string
	}{
		{"vm-1", "/r/vm-1"},
		{"", ""}, {".", ""}, {"..", ""}, {"a/b", ""}, {"a\x00b", ""},
	} {
		got, err := VMDir(tt.id)
		if tt.want == "" {
			if !errcode.HasCode(err, errcode.InvalidSpec) {
				t.Errorf("VMDir(%q) = %q, %v; want an InvalidSpec error", tt.id, got, err)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("VMDir(%q) = %q, %v; want %q", tt.id, got, err, tt.want)
		}
	}
}

func TestPrepareAndRemoveDir(t *testing.T) {
	base := t.TempDir()
	dir := filepath.Join(base, "hyphae", "vm1")
	if err := PrepareDir(dir); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o700 {
		t.Errorf("mode %v, want 0700", st.Mode().Perm())
	}
	// A second prepare of the same directory tightens and accepts it.
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := PrepareDir(dir); err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(dir); st.Mode().Perm() != 0o700 {
		t.Errorf("mode after re-prepare %v, want 0700", st.Mode().Perm())
	}
	if err := os.WriteFile(filepath.Join(dir, "console.log"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		if err := RemoveDir(dir); err != nil {
			t.Fatalf("RemoveDir #%d: %v", i+1, err)
		}
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("dir still there: %v", err)
	}

	link := filepath.Join(base, "link")
	if err := os.Symlink(base, link); err != nil {
		t.Fatal(err)
	}
	if err := PrepareDir(link); !errcode.HasCode(err, errcode.SpawnFailed) {
		t.Errorf("PrepareDir(symlink) = %v, want SpawnFailed", err)
	}
	if err := PrepareDir(""); !errcode.HasCode(err, errcode.InvalidSpec) {
		t.Errorf("PrepareDir(\"\") = %v, want InvalidSpec", err)
	}
}

func TestParseStartTicks(t *testing.T) {
	tail := " S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 424242 20 21"
	for _, tt := range []struct {
		name, stat string
		want       uint64
		ok         bool
	}{
		{"plain", "123 (qemu)" + tail, 424242, true},
		{"comm with spaces and parens", "123 (a) 1 2 (b c))" + tail, 424242, true},
		{"no comm", "123 qemu" + tail, 0, false},
		{"short", "123 (qemu) S 1 2", 0, false},
		{"not a number", "123 (q) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 x", 0, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseStartTicks([]byte(tt.stat))
			if (err == nil) != tt.ok || got != tt.want {
				t.Errorf("parseStartTicks = %d, %v; want %d, ok=%v", got, err, tt.want, tt.ok)
			}
		})
	}
}

func FuzzParseStartTicks(f *testing.F) {
	f.Add([]byte("1 (init) S 0 1 1 0 -1 4194560 1 2 3 4 5 6 7 8 20 0 1 0 27 1000 100"))
	f.Add([]byte("1 ()) ) S"))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = parseStartTicks(b)
	})
}

// start runs a shell script as a supervised process.
func start(t *testing.T, script string) (*Process, string) {
	t.Helper()
	return startProgram(t, "sh", "-c", script)
}

func startProgram(t *testing.T, binary string, args ...string) (*Process, string) {
	t.Helper()
	logPath := filepath.Join(t.TempDir(), "console.log")
	p, err := Start(Config{Binary: binary, Args: args, LogPath: logPath})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = p.Kill()
		<-p.Done()
	})
	return p, logPath
}

// waitLog waits until the log holds marker, so that a script's traps are
// installed before the test signals it.
func waitLog(t *testing.T, path, marker string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for {
		if b, _ := os.ReadFile(path); strings.Contains(string(b), marker) {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("log %s never showed %q", path, marker)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func TestStartWaitAndLog(t *testing.T) {
	p, logPath := start(t, "echo to-stdout; echo to-stderr >&2; exit 3")
	err := p.Wait(context.Background())
	if !errcode.HasCode(err, errcode.ProcessFailed) {
		t.Errorf("Wait = %v, want ProcessFailed", err)
	}
	if got := p.ExitCode(); got != 3 {
		t.Errorf("ExitCode = %d, want 3", got)
	}
	b, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatal(err)
	}
	if s := string(b); !strings.Contains(s, "to-stdout") || !strings.Contains(s, "to-stderr") {
		t.Errorf("log = %q, want both streams", s)
	}
	if st, _ := os.Stat(logPath); st.Mode().Perm() != 0o600 {
		t.Errorf("log mode %v, want 0600", st.Mode().Perm())
	}
	if tail := p.LogTail(10); tail != "to-stderr\n" {
		t.Errorf("LogTail(10) = %q", tail)
	}
	// Signals after the exit are no-ops, not errors about a foreign PID.
	if err := p.Kill(); err != nil {
		t.Errorf("Kill after exit: %v", err)
	}
}

func TestStartMissingBinary(t *testing.T) {
	_, err := Start(Config{Binary: "/nonexistent/qemu", LogPath: filepath.Join(t.TempDir(), "log")})
	if !errcode.HasCode(err, errcode.VMMUnavailable) {
		t.Errorf("Start = %v, want VMMUnavailable", err)
	}
}

func TestWaitContext(t *testing.T) {
	p, _ := startProgram(t, "sleep", "30")
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := p.Wait(ctx); !errcode.HasCode(err, errcode.Timeout) {
		t.Errorf("Wait = %v, want Timeout", err)
	}
	if p.Exited() {
		t.Error("process exited on its own")
	}
}

func TestIsSame(t *testing.T) {
	p, _ := startProgram(t, "sleep", "30")
	id := p.Identity()
	if id.Binary != "sleep" {
		t.Errorf("Binary = %q, want sleep", id.Binary)
	}
	if !IsSame(id.PID, id.StartTicks, "sleep") || !id.Alive() {
		t.Fatal("IsSame false for our own live process")
	}
	if IsSame(id.PID, id.StartTicks+1, "sleep") {
		t.Error("IsSame true with a wrong start time")
	}
	if IsSame(id.PID, id.StartTicks, "qemu-system-x86_64") {
		t.Error("IsSame true with a wrong binary")
	}
	// A live process that is not a VMM, recorded with the start time a
	// previous owner of its PID had: the reused-PID case.
	self := os.Getpid()
	ticks, err := StartTicks(self)
	if err != nil {
		t.Fatal(err)
	}
	exe, _ := os.Executable()
	if !IsSame(self, ticks, filepath.Base(exe)) {
		t.Fatal("IsSame false for the test binary itself")
	}
	if IsSame(self, ticks-1, filepath.Base(exe)) {
		t.Error("IsSame true for a live process with a wrong start time")
	}
	if _, err := Attach(Identity{PID: self, StartTicks: ticks - 1, Binary: filepath.Base(exe)}, nil); !errcode.HasCode(err, errcode.VMNotRunning) {
		t.Errorf("Attach(reused pid) = %v, want VMNotRunning", err)
	}

	_ = p.Kill()
	<-p.Done()
	if id.Alive() {
		t.Error("Alive after the process was killed and reaped")
	}
	if _, err := Attach(id, nil); !errcode.HasCode(err, errcode.VMNotRunning) {
		t.Errorf("Attach(dead) = %v, want VMNotRunning", err)
	}
}

func TestStop(t *testing.T) {
	// Each script prints "ready" once its traps are in place; the
	// background sleep checks that the whole process group goes.
	const loop = "sleep 300 & echo ready; while :; do sleep 0.05; done"
	tests := []struct {
		name     string
		script   string
		graceful func(p *Process) func(context.Context) error
		want     StopMethod
	}{
		{
			name:   "graceful request honoured",
			script: "trap 'exit 0' USR1; " + loop,
			graceful: func(p *Process) func(context.Context) error {
				return func(context.Context) error { return p.Signal(syscall.SIGUSR1) }
			},
			want: StoppedGraceful,
		},
		{
			name:   "graceful request ignored",
			script: "trap '' USR1; " + loop,
			graceful: func(p *Process) func(context.Context) error {
				return func(context.Context) error { return p.Signal(syscall.SIGUSR1) }
			},
			want: StoppedTerm,
		},
		{
			name:   "graceful request fails",
			script: loop,
			graceful: func(*Process) func(context.Context) error {
				return func(context.Context) error { return errors.New("no API socket") }
			},
			want: StoppedTerm,
		},
		{name: "no graceful step", script: loop, want: StoppedTerm},
		{name: "SIGTERM ignored", script: "trap '' TERM; " + loop, want: StoppedKill},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, logPath := start(t, tt.script)
			waitLog(t, logPath, "ready")
			var g func(context.Context) error
			if tt.graceful != nil {
				g = tt.graceful(p)
			}
			got, err := p.Stop(context.Background(), g, 3*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Errorf("Stop = %s, want %s", got, tt.want)
			}
			if !p.Exited() {
				t.Fatal("process still running after Stop")
			}
			if live := liveGroupMembers(t, p.PID()); len(live) > 0 {
				t.Errorf("process group %d still has live members %v", p.PID(), live)
			}
			if again, err := p.Stop(context.Background(), g, time.Second); again != StoppedAlready || err != nil {
				t.Errorf("second Stop = %s, %v; want %s", again, err, StoppedAlready)
			}
		})
	}
}

func TestStopCancelledContextStillKills(t *testing.T) {
	p, logPath := start(t, "trap '' TERM; echo ready; while :; do sleep 0.05; done")
	waitLog(t, logPath, "ready")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	got, err := p.Stop(ctx, nil, 2*time.Second)
	if err != nil || got != StoppedKill {
		t.Errorf("Stop = %s, %v; want %s", got, err, StoppedKill)
	}
}

func TestKillWait(t *testing.T) {
	p, logPath := start(t, "trap '' TERM; echo ready; while :; do sleep 0.05; done")
	waitLog(t, logPath, "ready")
	if err := p.KillWait(5 * time.Second); err != nil {
		t.Fatalf("KillWait = %v", err)
	}
	if !p.Exited() {
		t.Error("KillWait returned before the process was reaped")
	}
	if code := p.ExitCode(); code != -1 {
		t.Errorf("ExitCode = %d, want -1 (killed by a signal)", code)
	}
	if err := p.KillWait(time.Second); err != nil {
		t.Errorf("KillWait after exit = %v, want nil", err)
	}
}

func TestAttach(t *testing.T) {
	p, _ := startProgram(t, "sleep", "30")
	a, err := Attach(p.Identity(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Release()
	if a.Exited() {
		t.Fatal("attached process reported exited")
	}
	// Done must stay open while the process runs (a blocking pidfd once
	// made the watcher give up, and Done close, at once).
	select {
	case <-a.Done():
		t.Fatal("Done closed while the attached process runs")
	case <-time.After(200 * time.Millisecond):
	}
	got, err := a.Stop(context.Background(), nil, 3*time.Second)
	if err != nil || got != StoppedTerm {
		t.Errorf("attached Stop = %s, %v; want %s", got, err, StoppedTerm)
	}
	<-p.Done()
	if err := a.Wait(context.Background()); err != nil {
		t.Errorf("attached Wait = %v", err)
	}
}

func TestWaitForSocket(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "api.sock")
	ready := make(chan net.Listener, 1)
	go func() {
		time.Sleep(100 * time.Millisecond)
		l, err := net.Listen("unix", path)
		if err != nil {
			close(ready)
			return
		}
		ready <- l
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := WaitForSocket(ctx, path); err != nil {
		t.Fatal(err)
	}
	l := <-ready
	if l == nil {
		t.Fatal("listen failed")
	}
	defer l.Close()

	short, cancel2 := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel2()
	if err := WaitForSocket(short, filepath.Join(dir, "never.sock")); !errcode.HasCode(err, errcode.Timeout) {
		t.Errorf("WaitForSocket(never) = %v, want Timeout", err)
	}

	p, _ := start(t, "echo dying words; exit 1")
	err := p.WaitForSocket(ctx, filepath.Join(dir, "never.sock"))
	if !errcode.HasCode(err, errcode.BootFailed) || !strings.Contains(err.Error(), "dying words") {
		t.Errorf("Process.WaitForSocket = %v, want BootFailed with the log tail", err)
	}
}

func TestRemoveStaleSocket(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "old.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	// Keep the file: closing a listener would unlink it.
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	if err := RemoveStaleSocket(sock); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stale socket still there: %v", err)
	}
	if err := RemoveStaleSocket(sock); err != nil {
		t.Errorf("missing socket: %v", err)
	}
	file := filepath.Join(dir, "notasocket")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := RemoveStaleSocket(file); !errcode.HasCode(err, errcode.SpawnFailed) {
		t.Errorf("RemoveStaleSocket(file) = %v, want SpawnFailed", err)
	}
	if _, err := os.Stat(file); err != nil {
		t.Errorf("regular file was removed: %v", err)
	}
}

func TestCheckSocketPath(t *testing.T) {
	if err := CheckSocketPath("/tmp/hyphae/vm1/qmp.sock"); err != nil {
		t.Error(err)
	}
	if err := CheckSocketPath("/" + strings.Repeat("x", MaxSocketPath)); !errcode.HasCode(err, errcode.InvalidSpec) {
		t.Errorf("long path: %v, want InvalidSpec", err)
	}
}

// liveGroupMembers lists the processes of group pgid that are not zombies
// (a killed member stays a zombie until whoever adopted it reaps it).
func liveGroupMembers(t *testing.T, pgid int) []int {
	t.Helper()
	stats, err := filepath.Glob("/proc/[0-9]*/stat")
	if err != nil {
		t.Fatal(err)
	}
	var live []int
	for _, path := range stats {
		b, err := os.ReadFile(path)
		if err != nil {
			continue
		}
		s := string(b)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
		if len(f) > 3 && f[0] != "Z" && f[2] == strconv.Itoa(pgid) {
			pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(path)))
			live = append(live, pid)
		}
	}
	return live
}
