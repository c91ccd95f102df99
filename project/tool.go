package project

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/internal/tailbuf"
)

// tailSize bounds how much of a failing build's output goes into the error.
const tailSize = 4 << 10

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
	stderr := tailbuf.New(tailSize)
	cmd.Stderr = stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("%s: %w\n%s", t, err, stderr.Lines())
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
	tail := tailbuf.New(tailSize)
	var out io.Writer = tail
	if opts.Progress != nil {
		out = io.MultiWriter(tail, opts.Progress)
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
		return wrapHint(errcode.ProjectBuildFailed, err, t.hint, "`%s` in %s failed:\n%s", t, t.dir, tail.Lines())
	}
	return nil
}
