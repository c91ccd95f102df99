package project

import (
	"context"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guestbin"
)

// goPackage is the main package to build and the program's name.
type goPackage struct{ dir, name string }

var majorVersion = regexp.MustCompile(`^v[0-9]+$`)

// programName is what `go build` would call the program of importPath:
// its last element, skipping a major-version suffix (example.com/x/v2 → x).
func programName(importPath string) string {
	name := path.Base(importPath)
	if majorVersion.MatchString(name) && path.Dir(importPath) != "." {
		name = path.Base(path.Dir(importPath))
	}
	return name
}

// goList reports the package name and import path of the package pkg.
func goList(ctx context.Context, dir, pkg string) (name, importPath string, err error) {
	out, err := (tool{dir: dir, name: "go", args: []string{"list", "-f", "{{.Name}}\t{{.ImportPath}}", pkg}}).output(ctx)
	if err != nil {
		return "", "", err
	}
	name, importPath, _ = strings.Cut(strings.TrimSpace(string(out)), "\t")
	return name, importPath, nil
}

// goMain finds the main package: the module root, else the only directory
// under cmd/.
func goMain(ctx context.Context, dir string) (goPackage, error) {
	name, importPath, rootErr := goList(ctx, dir, ".")
	if rootErr == nil && name == "main" {
		return goPackage{".", programName(importPath)}, nil
	}
	if errcode.HasCode(rootErr, errcode.MissingTool) {
		return goPackage{}, rootErr
	}
	entries, _ := os.ReadDir(filepath.Join(dir, "cmd"))
	var cmds []string
	for _, e := range entries {
		if e.IsDir() {
			cmds = append(cmds, e.Name())
		}
	}
	switch {
	case len(cmds) == 1:
		pkg := "./cmd/" + cmds[0]
		name, importPath, err := goList(ctx, dir, pkg)
		if err != nil {
			return goPackage{}, errcode.Wrap(errcode.ProjectBuildFailed, err, "listing %s in %s", pkg, dir)
		}
		if name != "main" {
			return goPackage{}, errcode.New(errcode.NoEntrypoint, "%s in %s is package %s, not main", pkg, dir, name)
		}
		return goPackage{pkg, programName(importPath)}, nil
	case len(cmds) > 1:
		return goPackage{}, errcode.New(errcode.AmbiguousProject, "%s has no main package at its root and %d under cmd/ (%s)", dir, len(cmds), strings.Join(cmds, ", ")).
			WithHint("build the one you want (CGO_ENABLED=0 go build ./cmd/NAME) and use `hyphae build --binary`")
	case rootErr != nil:
		return goPackage{}, errcode.Wrap(errcode.ProjectBuildFailed, rootErr, "listing the root package of %s", dir)
	default:
		return goPackage{}, errcode.New(errcode.NoEntrypoint, "%s has no main package at its root (it is package %s) and none under cmd/", dir, name)
	}
}

// stageGo builds the main package with CGO_ENABLED=0 and stages it.
// -trimpath and -buildvcs=false make the binary depend only on the
// sources: a VCS stamp would change with every commit of the enclosing
// repository and defeat the image cache.
func stageGo(ctx context.Context, dir string, root *os.Root, opts Options) (Result, error) {
	pkg, err := goMain(ctx, dir)
	if err != nil {
		return Result{}, err
	}
	tmp, err := os.MkdirTemp("", "hyphae-go-build-")
	if err != nil {
		return Result{}, errcode.Wrap(errcode.StagingFailed, err, "creating a build directory")
	}
	defer os.RemoveAll(tmp)
	out := filepath.Join(tmp, pkg.name)
	build := tool{
		dir:  dir,
		env:  []string{"CGO_ENABLED=0", "GOOS=linux", "GOARCH=" + runtime.GOARCH},
		name: "go",
		args: []string{"build", "-trimpath", "-buildvcs=false", "-o", out, pkg.dir},
	}
	progressf(opts, "building %s with `%s`", pkg.name, build)
	if err := build.build(ctx, opts); err != nil {
		return Result{}, err
	}
	if err := guestbin.CheckStatic(out); err != nil {
		return Result{}, errcode.Wrap(errcode.ProjectBuildFailed, err, "go built %s", pkg.name)
	}
	return placeProgram(root, out, pkg.name, KindGo, opts)
}
