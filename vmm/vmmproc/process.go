package vmmproc

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hyphae-run/hyphae/errcode"
)

// Config describes a VMM process to start.
type Config struct {
	// Binary is the program, a path or a name looked up on PATH.
	Binary string
	// Args are the arguments after the program name.
	Args []string
	// Env is the environment; nil inherits hyphae's.
	Env []string
	// Dir is the working directory; empty keeps hyphae's.
	Dir string
	// LogPath receives the process's stdout and stderr (for QEMU and
	// Firecracker that includes the guest console). It is created 0600
	// and appended to.
	LogPath string
	// Logger gets lifecycle events; nil discards them.
	Logger *slog.Logger
}

// Process is a running (or exited) VMM: either a child started by Start, or
// a process of an earlier hyphae found again with Attach.
type Process struct {
	id      Identity
	logPath string
	log     *slog.Logger
	// done is closed once the process has exited (and, for a child, been
	// reaped).
	done chan struct{}

	// Child processes only.
	cmd *exec.Cmd
	// mu orders signals against reaping: while the exited child is not yet
	// reaped its PID cannot be reused, so a signal sent under mu with
	// reaped false always reaches our process group.
	mu      sync.Mutex
	reaped  bool
	waitErr error

	// Attached processes only: signals go through the pidfd, which stays
	// bound to the one process whatever happens to its PID.
	pidfd *os.File
}

// Start spawns cfg.Binary in its own process group, so that signals meant
// for hyphae (a terminal's Ctrl-C) do not reach the VM and the VMM can
// outlive a detached hyphae. Its stdin is /dev/null.
func Start(cfg Config) (*Process, error) {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	bin, err := exec.LookPath(cfg.Binary)
	if err != nil {
		return nil, errcode.Wrap(errcode.VMMUnavailable, err, "find %s", cfg.Binary)
	}
	if cfg.LogPath == "" {
		return nil, errcode.New(errcode.SpawnFailed, "no log path for %s", cfg.Binary)
	}
	logf, err := os.OpenFile(cfg.LogPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, errcode.Wrap(errcode.SpawnFailed, err, "open console log")
	}
	// The child holds its own copy of the descriptor.
	defer logf.Close()

	cmd := exec.Command(bin, cfg.Args...)
	cmd.Env = cfg.Env
	cmd.Dir = cfg.Dir
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, errcode.Wrap(errcode.SpawnFailed, err, "start %s", bin)
	}
	pid := cmd.Process.Pid
	// The child is not reaped before the waiter below runs, so its stat
	// and exe are readable even if it already exited.
	ticks, err := StartTicks(pid)
	if err != nil {
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		_ = cmd.Wait()
		return nil, errcode.Wrap(errcode.SpawnFailed, err, "read start time of %s (pid %d)", bin, pid)
	}
	// IsSame compares against /proc/<pid>/exe, which names the file after
	// symlinks are resolved.
	name := filepath.Base(bin)
	if real, err := filepath.EvalSymlinks(bin); err == nil {
		name = filepath.Base(real)
	}
	p := &Process{
		id:      Identity{PID: pid, StartTicks: ticks, Binary: name},
		logPath: cfg.LogPath,
		log:     log,
		done:    make(chan struct{}),
		cmd:     cmd,
	}
	log.Debug("vmm started", "binary", bin, "pid", pid, "start_ticks", ticks)
	go p.reap()
	return p, nil
}

// reap waits for the child to exit without reaping it, kills what is left
// of its process group while the group id is still certainly ours, then
// reaps it.
func (p *Process) reap() {
	var info unix.Siginfo
	for {
		err := unix.Waitid(unix.P_PID, p.id.PID, &info, unix.WEXITED|unix.WNOWAIT, nil)
		if err != unix.EINTR {
			break
		}
	}
	p.mu.Lock()
	_ = syscall.Kill(-p.id.PID, syscall.SIGKILL)
	p.waitErr = p.cmd.Wait()
	p.reaped = true
	p.mu.Unlock()
	p.log.Debug("vmm exited", "pid", p.id.PID, "state", p.cmd.ProcessState.String())
	close(p.done)
}

// Attach finds the process id names again, typically one started by an
// earlier hyphae and recorded in the registry. It fails with
// errcode.VMNotRunning when the process is gone or its PID now belongs to
// another program.
func Attach(id Identity, logger *slog.Logger) (*Process, error) {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	// Non-blocking, so that os.NewFile registers the pidfd with the
	// runtime's poller: watchPidfd waits for readability through it (a
	// blocking pidfd makes that wait fail at once, and Done would close
	// while the process still runs).
	fd, err := unix.PidfdOpen(id.PID, unix.PIDFD_NONBLOCK)
	if err != nil {
		return nil, errcode.Wrap(errcode.VMNotRunning, err, "process %d", id.PID)
	}
	// Checked after opening the pidfd: if this is our process now, the pidfd
	// refers to it for good, even if it exits and the PID is reused later.
	if !id.Alive() {
		unix.Close(fd)
		return nil, errcode.New(errcode.VMNotRunning, "process %d is not the recorded %s", id.PID, id.Binary)
	}
	p := &Process{id: id, log: logger, done: make(chan struct{}), pidfd: os.NewFile(uintptr(fd), "pidfd")}
	go p.watchPidfd()
	return p, nil
}

// watchPidfd closes done when the attached process exits: a pidfd becomes
// readable then. Its parent, not us, reaps it.
func (p *Process) watchPidfd() {
	defer close(p.done)
	rc, err := p.pidfd.SyscallConn()
	if err != nil {
		return
	}
	_ = rc.Read(func(fd uintptr) bool {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, 0)
		return err != nil || n > 0
	})
}

// Identity returns what identifies the process across hyphae restarts.
func (p *Process) Identity() Identity { return p.id }

// PID returns the process id.
func (p *Process) PID() int { return p.id.PID }

// Done is closed once the process has exited.
func (p *Process) Done() <-chan struct{} { return p.done }

// Exited reports whether the process has exited.
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Wait blocks until the process exits or ctx ends. For a child it returns
// nil on exit status 0 and an errcode.ProcessFailed error otherwise; for an
// attached process the status is not ours to read and nil is returned.
func (p *Process) Wait(ctx context.Context) error {
	select {
	case <-p.done:
	case <-ctx.Done():
		return errcode.Wrap(errcode.Timeout, ctx.Err(), "waiting for %s (pid %d)", p.id.Binary, p.id.PID)
	}
	if p.cmd == nil || p.waitErr == nil {
		return nil
	}
	return errcode.Wrap(errcode.ProcessFailed, p.waitErr, "%s (pid %d) ended", p.id.Binary, p.id.PID)
}

// ExitCode returns the child's exit code, -1 when a signal ended it or it
// has not exited, and for attached processes.
func (p *Process) ExitCode() int {
	if p.cmd == nil || !p.Exited() {
		return -1
	}
	return p.cmd.ProcessState.ExitCode()
}

// Signal sends sig to the process (for a child, to its whole process
// group). Signalling a process that has exited is a no-op.
func (p *Process) Signal(sig syscall.Signal) error {
	if p.pidfd != nil {
		if p.Exited() {
			return nil
		}
		// Through the raw descriptor: File.Fd would switch the pidfd
		// back to blocking mode.
		rc, err := p.pidfd.SyscallConn()
		if err != nil {
			return errcode.Wrap(errcode.StopFailed, err, "signal %s to pid %d", sig, p.id.PID)
		}
		if cerr := rc.Control(func(fd uintptr) { err = unix.PidfdSendSignal(int(fd), sig, nil, 0) }); cerr != nil {
			err = cerr
		}
		if err != nil && err != unix.ESRCH {
			return errcode.Wrap(errcode.StopFailed, err, "signal %s to pid %d", sig, p.id.PID)
		}
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.reaped {
		return nil
	}
	if err := syscall.Kill(-p.id.PID, sig); err != nil && err != syscall.ESRCH {
		return errcode.Wrap(errcode.StopFailed, err, "signal %s to pid %d", sig, p.id.PID)
	}
	return nil
}

// Kill sends SIGKILL and does not wait.
func (p *Process) Kill() error { return p.Signal(syscall.SIGKILL) }

// KillWait sends SIGKILL and waits up to timeout for the process to be
// gone (a child: reaped). A process that outlives timeout (stuck in the
// kernel) is an errcode.StopFailed error rather than a wait without end.
func (p *Process) KillWait(timeout time.Duration) error {
	if err := p.Kill(); err != nil {
		return err
	}
	if !p.waitUntil(context.Background(), time.Now().Add(timeout)) {
		return errcode.New(errcode.StopFailed, "%s (pid %d) still running %s after SIGKILL", p.id.Binary, p.id.PID, timeout)
	}
	return nil
}

// Release frees the pidfd of an attached process. The process itself is
// left alone.
func (p *Process) Release() {
	if p.pidfd != nil {
		_ = p.pidfd.Close()
	}
}

// StopMethod says which step of Stop ended the process.
type StopMethod string

// Stop methods.
const (
	StoppedAlready  StopMethod = "already-exited"
	StoppedGraceful StopMethod = "graceful"
	StoppedTerm     StopMethod = "sigterm"
	StoppedKill     StopMethod = "sigkill"
)

// Shares of Stop's timeout given to each step. SIGKILL cannot be ignored,
// so its step only needs time for the kernel to tear the process down.
const (
	gracefulShare = 0.6
	termShare     = 0.3
)

// Stop ends the process within timeout: graceful (when not nil; e.g. a
// Ctrl-Alt-Del through the VMM's API) and a wait, then SIGTERM and a wait,
// then SIGKILL and a wait, each step bounded by its share of timeout. When
// ctx ends early Stop skips straight to SIGKILL rather than leave the
// process behind. It returns the step that worked, or an
// errcode.StopFailed error if the process outlived all of them.
func (p *Process) Stop(ctx context.Context, graceful func(context.Context) error, timeout time.Duration) (StopMethod, error) {
	if p.Exited() {
		return StoppedAlready, nil
	}
	start := time.Now()
	deadline := func(share float64) time.Time { return start.Add(time.Duration(float64(timeout) * share)) }
	termAt := deadline(gracefulShare)
	if graceful == nil {
		termAt = start
	}
	killAt := deadline(gracefulShare + termShare)
	endAt := start.Add(timeout)

	if graceful != nil {
		gctx, cancel := context.WithDeadline(ctx, termAt)
		err := graceful(gctx)
		cancel()
		if err != nil {
			p.log.Debug("graceful stop request failed", "pid", p.id.PID, "err", err)
		} else if p.waitUntil(ctx, termAt) {
			return StoppedGraceful, nil
		}
	}
	if ctx.Err() == nil {
		if err := p.Signal(syscall.SIGTERM); err != nil {
			return "", err
		}
		if p.waitUntil(ctx, killAt) {
			return StoppedTerm, nil
		}
	}
	if err := p.Kill(); err != nil {
		return "", err
	}
	// SIGKILL still gets its share when ctx has already ended.
	if p.waitUntil(context.Background(), endAt) {
		return StoppedKill, nil
	}
	return "", errcode.New(errcode.StopFailed, "%s (pid %d) still running %s after SIGKILL", p.id.Binary, p.id.PID, time.Since(start).Round(time.Millisecond))
}

// waitUntil waits for exit until t or ctx ends, reporting whether the
// process exited.
func (p *Process) waitUntil(ctx context.Context, t time.Time) bool {
	timer := time.NewTimer(time.Until(t))
	defer timer.Stop()
	select {
	case <-p.done:
		return true
	case <-timer.C:
	case <-ctx.Done():
	}
	return p.Exited()
}

// LogTail returns up to n bytes from the end of the process's log, to
// explain in an error why a VMM died.
func (p *Process) LogTail(n int64) string {
	if p.logPath == "" {
		return ""
	}
	return Tail(p.logPath, n)
}

// Tail returns up to n bytes from the end of the file at path, or "" when
// it cannot be read.
func Tail(path string, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return ""
	}
	off := max(st.Size()-n, 0)
	b, err := io.ReadAll(io.NewSectionReader(f, off, st.Size()-off))
	if err != nil && !errors.Is(err, io.EOF) {
		return ""
	}
	return string(b)
}
