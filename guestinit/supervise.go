package guestinit

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/hyphae-run/hyphae/errcode"
	"golang.org/x/sys/unix"
)

// supervise starts the plan's program with stdin on /dev/null and the
// console as stdout and stderr, then reaps every child until the program
// itself has exited, forwarding termination signals to it meanwhile.
func supervise(ctx context.Context, cfg Config, plan Plan) Result {
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		return fatal(errcode.Wrap(errcode.InitFatal, err, "cannot open stdin"))
	}
	defer devnull.Close()

	// Subscribe before the fork so that neither an early SIGCHLD nor an
	// early SIGTERM is lost. SIGTERM, SIGINT and SIGHUP are forwarded: a
	// VMM or a user asking the machine to stop means the program should.
	sigc := make(chan os.Signal, 16)
	signal.Notify(sigc, unix.SIGCHLD, unix.SIGTERM, unix.SIGINT, unix.SIGHUP)
	defer signal.Stop(sigc)

	pid, err := syscall.ForkExec(plan.Path, plan.Argv, &syscall.ProcAttr{
		Dir:   plan.Dir,
		Env:   plan.Env,
		Files: []uintptr{devnull.Fd(), cfg.Stdout.Fd(), cfg.Stderr.Fd()},
	})
	if err != nil {
		return fatal(errcode.Wrap(errcode.InitFatal, err, "cannot start %s", plan.Path))
	}
	cfg.Logger.Debug("started", "pid", pid, "path", plan.Path, "agent", plan.Agent)

	done := ctx.Done()
	for {
		select {
		case <-done:
			cfg.Logger.Warn("cancelled; killing the program", "pid", pid)
			_ = unix.Kill(pid, unix.SIGKILL)
			done = nil
		case sig := <-sigc:
			if sig != unix.SIGCHLD {
				fwd := sig.(syscall.Signal)
				if fwd == unix.SIGINT {
					// SIGINT reaches PID 1 only from Ctrl-Alt-Del (see
					// disableCtrlAltDel): the VMM's graceful stop. Programs
					// expect that as SIGTERM, as from docker stop.
					fwd = unix.SIGTERM
				}
				cfg.Logger.Debug("forwarding signal", "signal", sig, "as", fwd, "pid", pid)
				_ = unix.Kill(pid, fwd)
				continue
			}
			if ws, exited := reap(pid, cfg.Logger); exited {
				return resultOf(ws)
			}
		}
	}
}

// reap collects every child that has exited, orphans included, without
// blocking. It reports the main program's status separately, so that the
// orphan reaping never swallows it.
func reap(main int, log *slog.Logger) (unix.WaitStatus, bool) {
	var (
		mainStatus unix.WaitStatus
		exited     bool
	)
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil || pid <= 0 {
			return mainStatus, exited
		}
		if pid == main {
			mainStatus, exited = ws, true
			continue
		}
		log.Debug("reaped", "pid", pid, "status", int(ws))
	}
}

// resultOf turns a wait status into the reported exit code: the shell's
// convention of 128+signal for a killed program.
func resultOf(ws unix.WaitStatus) Result {
	if ws.Signaled() {
		sig := int(ws.Signal())
		return Result{Code: 128 + sig, Signal: sig}
	}
	return Result{Code: ws.ExitStatus()}
}
