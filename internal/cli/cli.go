// Package cli is the hyphae command line: cobra commands that parse flags
// and arguments, call the library packages (registry, image, …) and print
// their results either as text for people or, with --json, as JSON for
// programs.
//
// Exit codes: 0 success, 1 an error (rendered as "Error: E402: …" plus a
// hint on stderr, or as {"error":{…}} on stdout with --json), 2 a usage
// error (bad flags or arguments).
package cli

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/registry"
)

// Exit codes.
const (
	ExitOK    = 0
	ExitError = 1
	ExitUsage = 2
)

// EnvHome names the data directory when --home is not given.
const EnvHome = "HYPHAE_HOME"

// Env is the process environment the CLI runs in; tests substitute their
// own streams.
type Env struct {
	Stdin          io.Reader
	Stdout, Stderr io.Writer
	// Getenv reads environment variables (os.Getenv when nil).
	Getenv func(string) string
}

// Execute runs hyphae with the process's arguments and streams, and returns
// the exit code. SIGINT and SIGTERM cancel the context, so that long steps
// stop and clean up.
func Execute(ctx context.Context) int {
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	return Run(ctx, os.Args[1:], Env{Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr})
}

// Run runs hyphae with args and returns the exit code.
func Run(ctx context.Context, args []string, env Env) int {
	if env.Getenv == nil {
		env.Getenv = os.Getenv
	}
	a := &app{env: env}
	root := a.rootCommand()
	root.SetArgs(args)
	root.SetIn(env.Stdin)
	root.SetOut(env.Stdout)
	root.SetErr(env.Stderr)
	cmd, err := root.ExecuteContextC(ctx)
	if err == nil {
		return ExitOK
	}
	if !a.started && !a.json {
		// cobra stops before parsing flags when it cannot even find the
		// command; honour --json for that error too.
		a.json = slices.Contains(args, "--json") || slices.Contains(args, "--json=true")
	}
	return a.renderError(cmd, err)
}

// app holds the global flags and what PersistentPreRunE derived from them.
type app struct {
	env      Env
	json     bool
	quiet    bool
	home     string
	logLevel string
	logger   *slog.Logger
	// started is set once flags and arguments passed validation: an
	// error before that is a usage error.
	started bool
}

func (a *app) rootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:   "hyphae",
		Short: "Build content-addressed microVM images and run them",
		Long: `hyphae turns a project directory (JavaScript, Rust, Go), a prebuilt program or a
container image archive into a bootable, content-addressed ext4 image, and
keeps a local registry of images, kernels and VMs.

Data lives in --home: $HYPHAE_HOME, else $XDG_DATA_HOME/hyphae, else
~/.local/share/hyphae (registry.db, images/, kernels/).`,
		Example: `  hyphae check
  hyphae build ./examples/hello-go --name hello
  hyphae list images --json`,
		SilenceErrors:     true,
		SilenceUsage:      true,
		CompletionOptions: cobra.CompletionOptions{DisableDefaultCmd: true},
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			a.started = true
			return a.setup()
		},
	}
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError(err) })
	// Suggest only near-certain typos ("lgs" → logs): with cobra's default
	// of 2, short unrelated words already match some command.
	root.SuggestionsMinimumDistance = 1
	f := root.PersistentFlags()
	f.BoolVar(&a.json, "json", false, "print machine-readable JSON on stdout")
	f.BoolVarP(&a.quiet, "quiet", "q", false, "print only essential output (no progress)")
	f.StringVar(&a.home, "home", "", "data directory (default $HYPHAE_HOME, else $XDG_DATA_HOME/hyphae, else ~/.local/share/hyphae)")
	f.StringVar(&a.logLevel, "log-level", "warn", "log level: debug, info, warn or error")

	root.AddCommand(
		a.checkCommand(),
		a.buildCommand(),
		a.importCommand(),
		a.listCommand(),
		a.inspectCommand(),
		a.rmCommand(),
		a.gcCommand(),
		a.runCommand(),
		a.logsCommand(),
		a.stopCommand(),
		a.kernelCommand(),
	)
	return root
}

// setup resolves the home directory and the logger.
func (a *app) setup() error {
	var level slog.Level
	if err := level.UnmarshalText([]byte(a.logLevel)); err != nil {
		return usageError(errcode.New(errcode.InvalidArgument, "invalid --log-level %q (want debug, info, warn or error)", a.logLevel))
	}
	a.logger = slog.New(slog.NewTextHandler(a.env.Stderr, &slog.HandlerOptions{Level: level}))
	if a.home == "" {
		h, err := DefaultHome(a.env.Getenv)
		if err != nil {
			return err
		}
		a.home = h
	}
	return nil
}

// DefaultHome returns $HYPHAE_HOME, else $XDG_DATA_HOME/hyphae, else
// $HOME/.local/share/hyphae.
func DefaultHome(getenv func(string) string) (string, error) {
	if h := getenv(EnvHome); h != "" {
		return h, nil
	}
	if x := getenv("XDG_DATA_HOME"); x != "" {
		return filepath.Join(x, "hyphae"), nil
	}
	if h := getenv("HOME"); h != "" {
		return filepath.Join(h, ".local", "share", "hyphae"), nil
	}
	return "", errcode.New(errcode.InvalidArgument, "cannot choose a data directory: HYPHAE_HOME, XDG_DATA_HOME and HOME are all unset").
		WithHint("pass --home DIR or set HYPHAE_HOME")
}

// openRegistry opens the registry in the home directory; the caller closes
// it.
func (a *app) openRegistry(ctx context.Context) (*registry.Registry, error) {
	return registry.Open(ctx, a.home, a.logger)
}

// withRegistry runs fn with an open registry and closes it afterwards.
func (a *app) withRegistry(ctx context.Context, fn func(*registry.Registry) error) error {
	reg, err := a.openRegistry(ctx)
	if err != nil {
		return err
	}
	err = fn(reg)
	if cerr := reg.Close(); err == nil {
		err = cerr
	}
	return err
}

// errUsage marks an error as a usage error (exit 2).
type errUsage struct{ err error }

func (e errUsage) Error() string { return e.err.Error() }
func (e errUsage) Unwrap() error { return e.err }

// usageError wraps err as a usage error, coding it E201 when it carries no
// code of its own (cobra's flag errors).
func usageError(err error) error {
	if errcode.CodeOf(err) == "" {
		err = errcode.Wrap(errcode.InvalidArgument, err, "invalid usage")
	}
	return errUsage{err}
}

// errSilent ends a command with exit 1 after it reported the failure itself
// (hyphae check prints its own report).
var errSilent = errors.New("failure already reported")

// renderError prints err for the user and returns the exit code.
func (a *app) renderError(cmd *cobra.Command, err error) int {
	if errors.Is(err, errSilent) {
		return ExitError
	}
	if ex, ok := exitCodeOf(err); ok {
		// hyphae run exits with its program's code; an error that came
		// with it (a timeout) is still shown.
		if ex.err != nil {
			a.renderError(cmd, ex.err)
		}
		return ex.code
	}
	exit := ExitError
	var u errUsage
	if errors.As(err, &u) || !a.started {
		exit = ExitUsage
		if errcode.CodeOf(err) == "" {
			err = errcode.Wrap(errcode.InvalidArgument, err, "invalid usage")
		}
	}
	code := errcode.CodeOf(err)
	msg := err.Error()
	if code != "" {
		msg = strings.Replace(msg, string(code)+": ", "", 1)
		// cobra's own texts gain little from our prefix: "invalid
		// usage: unknown flag: --x" reads better as "unknown flag: --x".
		msg = strings.TrimPrefix(msg, "invalid usage: ")
	}
	hint := errcode.HintOf(err)
	if hint == "" && exit == ExitUsage && cmd != nil {
		hint = "run '" + cmd.CommandPath() + " --help' for usage"
	}
	if a.json {
		body := map[string]any{"code": string(code), "message": msg}
		if hint != "" {
			body["hint"] = hint
		}
		_ = writeJSON(a.env.Stdout, map[string]any{"error": body})
		return exit
	}
	w := a.env.Stderr
	if code != "" {
		io.WriteString(w, "Error: "+string(code)+": "+msg+"\n")
	} else {
		io.WriteString(w, "Error: "+msg+"\n")
	}
	if hint != "" {
		io.WriteString(w, "Hint: "+hint+"\n")
	}
	return exit
}
