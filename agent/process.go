package agent

import (
	"errors"
	"os"
	"os/exec"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/hyphae-run/hyphae/errcode"
)

// child is the running bundle: the leader of its own process group, so
// that a stop or the end of the run reaches everything it started.
type child struct {
	cmd            *exec.Cmd
	stdin          *os.File // write end, owned by the payload writer
	stdout, stderr *os.File // read ends, owned by their readers

	mu     sync.Mutex
	reaped bool // once true, the pid (and so the group id) may be reused
}

// startChild starts prog with its stdio on fresh pipes.
func startChild(prog *Program, env []string) (*child, error) {
	path, err := prog.resolve()
	if err != nil {
		return nil, err
	}
	var files []*os.File
	closeAll := func() {
		for _, f := range files {
			f.Close()
		}
	}
	pipe := func() (r, w *os.File, err error) {
		r, w, err = os.Pipe()
		if err == nil {
			files = append(files, r, w)
		}
		return r, w, err
	}
	inR, inW, err1 := pipe()
	outR, outW, err2 := pipe()
	errR, errW, err3 := pipe()
	if err := errors.Join(err1, err2, err3); err != nil {
		closeAll()
		return nil, errcode.Wrap(errcode.SpawnFailed, err, "creating pipes for %s", prog.Argv[0])
	}
	cmd := &exec.Cmd{
		Path:        path,
		Args:        prog.Argv,
		Env:         env,
		Dir:         prog.dir(),
		Stdin:       inR,
		Stdout:      outW,
		Stderr:      errW,
		SysProcAttr: &syscall.SysProcAttr{Setpgid: true},
	}
	if err := cmd.Start(); err != nil {
		closeAll()
		return nil, errcode.Wrap(errcode.SpawnFailed, err, "starting %s", prog.Argv[0])
	}
	// The child holds its own copies; ours must go so that EOF arrives
	// when the child's side closes.
	inR.Close()
	outW.Close()
	errW.Close()
	return &child{cmd: cmd, stdin: inW, stdout: outR, stderr: errR}, nil
}

// signal sends sig to the child's whole process group, unless the leader
// has been reaped (its pid could then name someone else's group).
func (c *child) signal(sig syscall.Signal) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.reaped {
		_ = syscall.Kill(-c.cmd.Process.Pid, sig)
	}
}

// wait blocks until the leader exits, kills whatever it left behind in its
// group (the run is over when the entrypoint exits), reaps it and returns
// its exit code (128+signal when a signal killed it) and the signal.
func (c *child) wait() (code, sig int, err error) {
	pid := c.cmd.Process.Pid
	var info unix.Siginfo
	for {
		// WNOWAIT leaves the leader a zombie, so its pid cannot be
		// reused while the group is killed.
		err = unix.Waitid(unix.P_PID, pid, &info, unix.WEXITED|unix.WNOWAIT, nil)
		if err != unix.EINTR {
			break
		}
	}
	c.signal(syscall.SIGKILL)
	c.mu.Lock()
	c.reaped = true
	c.mu.Unlock()
	werr := c.cmd.Wait()
	if err != nil && werr != nil {
		var exitErr *exec.ExitError
		if !errors.As(werr, &exitErr) {
			return -1, 0, errcode.Wrap(errcode.ProcessFailed, werr, "waiting for the bundle")
		}
	}
	ws, ok := c.cmd.ProcessState.Sys().(syscall.WaitStatus)
	if !ok {
		return c.cmd.ProcessState.ExitCode(), 0, nil
	}
	if ws.Signaled() {
		return 128 + int(ws.Signal()), int(ws.Signal()), nil
	}
	return ws.ExitStatus(), 0, nil
}
