// Package project turns a project directory into the files its image needs.
//
// Detect names a project's kind from its marker file (package.json,
// Cargo.toml, go.mod). Stage builds the project when it is compiled and
// writes what the image needs into a staging directory, the root of the
// future image; StageBinary does the same for one prebuilt program. Every
// write goes through an os.Root opened on the stage, so nothing — a
// symlink in the project, a hostile path — can make them write outside it.
//
// JavaScript: the project is copied to /app, node_modules included,
// without the paths listed by ExcludedPaths (version control and caches,
// matched at the project root). Symlinks are copied as symlinks and never
// followed, even when they point outside the project. The runtime is the
// host's node (or Options.Node) resolved to its real file and staged at
// /usr/bin/node with its loader (at its PT_INTERP path) and its
// shared-library closure, found in pure Go the way the loader finds it
// (DT_NEEDED, DT_RPATH/DT_RUNPATH with $ORIGIN, /etc/ld.so.cache, the
// standard directories) and staged at the path where it was found. The
// image has no ld.so.cache, so a library outside the standard directories
// is announced through LD_LIBRARY_PATH in Result.Env.
//
// The JavaScript entrypoint comes from package.json: scripts.start, then
// main, then index.js. The image has no shell and no npm, so scripts.start
// is interpreted, not run by sh: it must be one simple command, `node
// [OPTIONS] FILE [ARGS...]` or a program whose shebang runs node (a
// node_modules/.bin entry such as `next start`, or a script of the
// project), which node then runs directly. VAR=value words in front become
// environment variables; NODE_ENV is production unless set that way.
// Anything that needs a shell (&&, pipes, redirections, $ expansions,
// globs) is an errcode.NoEntrypoint error with a hint to pass
// --entrypoint, which beats an image that fails at boot.
//
// Rust: `cargo build --release` for the musl target when installed, else
// for the gnu target with +crt-static, into cargo's own target directory
// (incremental rebuilds). Go: `CGO_ENABLED=0 go build -trimpath
// -buildvcs=false` of the root main package or the only one under cmd/.
// Both programs must come out static and go to /app/<name>.
//
// The staged tree is reproducible for unchanged input — file contents and
// modes are copied exactly, mtimes of copied files kept, programs built
// reproducibly — because a later step hashes it to decide whether a cached
// image is still valid.
package project

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
)

// Kind is the kind of a project, named after its language.
type Kind string

// Project kinds.
const (
	KindJavaScript Kind = "javascript" // package.json
	KindRust       Kind = "rust"       // Cargo.toml
	KindGo         Kind = "go"         // go.mod
	KindBinary     Kind = "binary"     // one prebuilt program (StageBinary)
)

// AppDir is where the program (and for JavaScript the whole project) goes
// in the image.
const AppDir = "/app"

// NodePath is where the Node.js runtime goes in the image.
const NodePath = "/usr/bin/node"

// markers maps each marker file to its kind, in the order Detect reports
// them.
var markers = []struct {
	file string
	kind Kind
}{
	{"package.json", KindJavaScript},
	{"Cargo.toml", KindRust},
	{"go.mod", KindGo},
}

// Detect names the kind of the project in dir by its marker file. No marker
// is an errcode.NoProjectMarker error; more than one is an
// errcode.AmbiguousProject error naming what was found.
func Detect(dir string) (Kind, error) {
	st, err := os.Stat(dir)
	if err != nil {
		return "", errcode.Wrap(errcode.InvalidArgument, err, "project directory %s cannot be read", dir)
	}
	if !st.IsDir() {
		return "", errcode.New(errcode.InvalidArgument, "%s is not a directory", dir).
			WithHint("for a prebuilt program use `hyphae build --binary " + dir + "`")
	}
	var found []string
	var kind Kind
	for _, m := range markers {
		st, err := os.Stat(filepath.Join(dir, m.file))
		if err == nil && st.Mode().IsRegular() {
			found = append(found, m.file)
			kind = m.kind
		}
	}
	switch len(found) {
	case 0:
		names := make([]string, len(markers))
		for i, m := range markers {
			names[i] = m.file
		}
		return "", errcode.New(errcode.NoProjectMarker, "no project marker found in %s (looked for %s)", dir, strings.Join(names, ", ")).
			WithHint("add one of those files, or use `hyphae build --binary FILE` for a prebuilt program")
	case 1:
		return kind, nil
	default:
		return "", errcode.New(errcode.AmbiguousProject, "ambiguous project in %s: found %s", dir, strings.Join(found, " and ")).
			WithHint("build from a directory that holds only one of them")
	}
}

// Options tunes Stage and StageBinary.
type Options struct {
	// Node is the node executable to ship with a JavaScript project;
	// "" means the node found on PATH.
	Node string
	// Logger receives warnings and debug detail; nil discards them.
	Logger *slog.Logger
	// Progress, when set, receives short human-readable progress lines and
	// the output of build tools.
	Progress io.Writer
}

func (o Options) logger() *slog.Logger {
	if o.Logger != nil {
		return o.Logger
	}
	return slog.New(slog.DiscardHandler)
}

// Result says how to run what was staged.
type Result struct {
	Kind       Kind
	Entrypoint []string
	Workdir    string
	Env        []guest.EnvVar
}

// Stage builds the project in dir (for Rust and Go) and writes the files
// its image needs into stage, which must be an existing empty directory:
// the program or project under /app and, for JavaScript, the runtime. It
// never writes outside stage. On error stage is emptied again.
func Stage(ctx context.Context, dir, stage string, opts Options) (Result, error) {
	kind, err := Detect(dir)
	if err != nil {
		return Result{}, err
	}
	return withStage(stage, func(root *os.Root) (Result, error) {
		switch kind {
		case KindJavaScript:
			return stageJavaScript(ctx, dir, root, opts)
		case KindRust:
			return stageRust(ctx, dir, root, opts)
		default:
			return stageGo(ctx, dir, root, opts)
		}
	})
}

// StageBinary stages one prebuilt program, which must be an ELF executable
// for this machine, as /app/<name> with entrypoint ["/app/<name>"]. A
// dynamically linked program is staged with its loader and shared-library
// closure, and a warning is logged: static programs are the reliable kind.
func StageBinary(ctx context.Context, file, stage string, opts Options) (Result, error) {
	return withStage(stage, func(root *os.Root) (Result, error) {
		return stageBinary(ctx, file, root, opts)
	})
}

// withStage opens stage, checks that it is empty, runs fill and empties
// stage again when fill fails, so that a failed build leaves nothing behind.
func withStage(stage string, fill func(*os.Root) (Result, error)) (Result, error) {
	entries, err := os.ReadDir(stage)
	if err != nil {
		return Result{}, errcode.Wrap(errcode.StagingFailed, err, "staging directory %s", stage)
	}
	if len(entries) > 0 {
		return Result{}, errcode.New(errcode.StagingFailed, "staging directory %s is not empty", stage)
	}
	root, err := os.OpenRoot(stage)
	if err != nil {
		return Result{}, errcode.Wrap(errcode.StagingFailed, err, "staging directory %s", stage)
	}
	defer root.Close()
	res, err := fill(root)
	if err != nil {
		entries, _ := os.ReadDir(stage)
		var cleanErr error
		for _, e := range entries {
			cleanErr = errors.Join(cleanErr, root.RemoveAll(e.Name()))
		}
		if cleanErr != nil {
			err = errors.Join(err, errcode.Wrap(errcode.StagingFailed, cleanErr, "emptying %s after a failed build", stage))
		}
		return Result{}, err
	}
	return res, nil
}

// wrapHint is errcode.Wrap with a hint for the user.
func wrapHint(code errcode.Code, err error, hint, format string, args ...any) error {
	return &errcode.Error{Code: code, Message: fmt.Sprintf(format, args...), Hint: hint, Err: err}
}
