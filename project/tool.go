package project

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"

	"github.com/hyphae-run/hyphae/errcode"
)

// tailSize bounds how much of a failing build's output goes into the error.
const tailSize = 4 << 10

// tailBuffer keeps the last tailSize bytes written to it.
type tailBuffer struct{ buf []byte }

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.buf = append(t.buf, p...)
	if over := len(t.buf) - tailSize; over > 0 {
		t.buf = append(t.buf[:0], t.buf[over:]...)
	}
	return len(p), nil
}

// String returns the kept output, starting at a line boundary when
// something was cut off.
func (t *tailBuffer) String() string {
	b := t.buf
	if len(b) == tailSize {
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			b = b[i+1:]
		}
	}
	return strings.TrimSpace(string(b))
}

// tool is one invocation of a build tool (cargo, go) in a project.
type tool struct {
	dir  string
	env  []string // added to the environment
	name string
	args []string
	hint string // shown when the build fails
}

func (t tool) String() string { return strings.Join(append([]string{t.name}, t.args...), " ") }

func (t tool) command(ctx context.Context) (*exec.Cmd, error) {
	p, err := exec.LookPath(t.name)
	if err != nil {
		return nil, wrapHint(errcode.MissingTool, err, "install "+t.name+" and make sure it is on PATH", "%s is needed to build this project", t.name)
	}
	cmd := exec.CommandContext(ctx, p, t.args...)
	cmd.Dir = t.dir
	cmd.Env = append(os.Environ(), t.env...)
	cmd.Stdin = nil
	return cmd, nil
}

// output runs the tool and returns its stdout. A failure carries the tail
// of its stderr; the caller picks the code.
func (t tool) output(ctx context.Context) ([]byte, error) {
	cmd, err := t.command(ctx)
	if err != nil {
		return nil, err
	}
	var stderr tailBuffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("%s: %w\n%s", t, err, stderr.String())
	}
	return out, nil
}

// build runs the tool as the project's build, copying its output to
// opts.Progress. A failure is an errcode.ProjectBuildFailed error with the
// tail of the output.
func (t tool) build(ctx context.Context, opts Options) error {
	cmd, err := t.command(ctx)
	if err != nil {
		return err
	}
	var tail tailBuffer
	var out io.Writer = &tail
	if opts.Progress != nil {
		out = io.MultiWriter(&tail, opts.Progress)
	}
	cmd.Stdout, cmd.Stderr = out, out
	opts.logger().Debug("running build", "dir", t.dir, "cmd", t.String(), "env", t.env)
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			return errcode.Wrap(errcode.ProjectBuildFailed, ctx.Err(), "`%s` in %s was interrupted", t, t.dir)
		}
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			return errcode.Wrap(errcode.SpawnFailed, err, "starting `%s`", t)
		}
		// The cause (the *exec.ExitError) stays in the chain for callers
		// that want the exit status; it renders after the output's tail.
		return wrapHint(errcode.ProjectBuildFailed, err, t.hint, "`%s` in %s failed:\n%s", t, t.dir, tail.String())
	}
	return nil
}
