package project

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guestbin"
)

// cargoMetadata is the part of `cargo metadata --format-version 1` that
// binary selection needs.
type cargoMetadata struct {
	Packages []struct {
		Name         string  `json:"name"`
		ManifestPath string  `json:"manifest_path"`
		DefaultRun   *string `json:"default_run"`
		Targets      []struct {
			Name string   `json:"name"`
			Kind []string `json:"kind"`
		} `json:"targets"`
	} `json:"packages"`
	TargetDirectory string `json:"target_directory"`
}

// cargoBin is one binary target of a workspace.
type cargoBin struct{ pkg, name string }

// selectBin picks the binary to ship: the only one, or the root package's
// default-run. rootManifest is the project's Cargo.toml.
func (m cargoMetadata) selectBin(rootManifest string) (cargoBin, error) {
	var bins []cargoBin
	var defaultRun string
	for _, p := range m.Packages {
		for _, t := range p.Targets {
			if slices.Contains(t.Kind, "bin") {
				bins = append(bins, cargoBin{p.Name, t.Name})
			}
		}
		if p.DefaultRun != nil && filepath.Clean(p.ManifestPath) == filepath.Clean(rootManifest) {
			defaultRun = *p.DefaultRun
		}
	}
	if len(bins) == 1 {
		return bins[0], nil
	}
	if len(bins) == 0 {
		return cargoBin{}, errcode.New(errcode.NoEntrypoint, "%s has no binary target", rootManifest).
			WithHint("add src/main.rs or a [[bin]] section")
	}
	names := make([]string, len(bins))
	for i, b := range bins {
		names[i] = b.name
		if b.name == defaultRun {
			return b, nil
		}
	}
	return cargoBin{}, errcode.New(errcode.AmbiguousProject, "%s has %d binary targets (%s) and no default-run", rootManifest, len(bins), strings.Join(names, ", ")).
		WithHint("set `default-run = \"NAME\"` in the [package] section of Cargo.toml")
}

// rustTarget returns the target triple to build for: musl when its
// standard library is installed (static by nature), else the gnu target,
// made static with +crt-static.
func rustTarget(ctx context.Context, dir string) string {
	arch := "x86_64"
	if runtime.GOARCH == "arm64" {
		arch = "aarch64"
	}
	musl := arch + "-unknown-linux-musl"
	if out, err := (tool{dir: dir, name: "rustc", args: []string{"--print", "sysroot"}}).output(ctx); err == nil {
		if st, err := os.Stat(filepath.Join(strings.TrimSpace(string(out)), "lib", "rustlib", musl)); err == nil && st.IsDir() {
			return musl
		}
	}
	return arch + "-unknown-linux-gnu"
}

// cargoHome is where cargo keeps registry sources, remapped out of binaries.
func cargoHome() string {
	if h := os.Getenv("CARGO_HOME"); h != "" {
		return h
	}
	home, _ := os.UserHomeDir()
	return filepath.Join(home, ".cargo")
}

// rustFlags returns CARGO_ENCODED_RUSTFLAGS for a static, reproducible
// build: the user's flags (CARGO_ENCODED_RUSTFLAGS, else RUSTFLAGS), then
// +crt-static and path remapping of the project, cargo's home and the
// target directory, so that the binary does not depend on where the
// project sits. With --target, cargo applies these to the program only,
// not to build scripts or proc-macros (which must stay dynamic).
func rustFlags(projectDir, targetDir string) string {
	var flags []string
	if enc := os.Getenv("CARGO_ENCODED_RUSTFLAGS"); enc != "" {
		flags = strings.Split(enc, "\x1f")
	} else {
		flags = strings.Fields(os.Getenv("RUSTFLAGS"))
	}
	flags = append(flags,
		"-C", "target-feature=+crt-static",
		"--remap-path-prefix="+projectDir+"=/build",
		"--remap-path-prefix="+cargoHome()+"=/cargo",
	)
	if rel, err := filepath.Rel(projectDir, targetDir); err != nil || !filepath.IsLocal(rel) {
		// A target directory elsewhere (CARGO_TARGET_DIR) holds build
		// script output that include!() may embed.
		flags = append(flags, "--remap-path-prefix="+targetDir+"=/target")
	}
	return strings.Join(flags, "\x1f")
}

// cargoSelect reads the metadata of the cargo project in dir (an absolute
// path) and picks its binary.
func cargoSelect(ctx context.Context, dir string) (cargoMetadata, cargoBin, error) {
	var meta cargoMetadata
	out, err := (tool{dir: dir, name: "cargo", args: []string{"metadata", "--no-deps", "--format-version", "1"}}).output(ctx)
	if err != nil {
		if errcode.HasCode(err, errcode.MissingTool) {
			return meta, cargoBin{}, err
		}
		return meta, cargoBin{}, errcode.Wrap(errcode.InvalidManifest, err, "reading %s", filepath.Join(dir, "Cargo.toml"))
	}
	if err := json.Unmarshal(out, &meta); err != nil {
		return meta, cargoBin{}, errcode.Wrap(errcode.InvalidManifest, err, "parsing cargo metadata of %s", dir)
	}
	bin, err := meta.selectBin(filepath.Join(dir, "Cargo.toml"))
	return meta, bin, err
}

// stageRust builds the project with cargo and stages its binary.
func stageRust(ctx context.Context, dir string, root *os.Root, opts Options) (Result, error) {
	abs, err := filepath.Abs(dir)
	if err == nil {
		abs, err = filepath.EvalSymlinks(abs)
	}
	if err != nil {
		return Result{}, errcode.Wrap(errcode.InvalidArgument, err, "project directory %s", dir)
	}
	meta, bin, err := cargoSelect(ctx, abs)
	if err != nil {
		return Result{}, err
	}
	target := rustTarget(ctx, abs)
	build := tool{
		dir:  abs,
		env:  []string{"CARGO_ENCODED_RUSTFLAGS=" + rustFlags(abs, meta.TargetDirectory)},
		name: "cargo",
		args: []string{"build", "--release", "--target", target, "--package", bin.pkg, "--bin", bin.name},
	}
	progressf(opts, "building %s with `%s`", bin.name, build)
	if !strings.HasSuffix(target, "-musl") {
		build.hint = fmt.Sprintf("if linking failed: a static glibc build needs the static libraries of libc6-dev; or install the musl target (rustup target add %s)",
			strings.Replace(target, "-gnu", "-musl", 1))
	}
	if err := build.build(ctx, opts); err != nil {
		return Result{}, err
	}
	artifact := filepath.Join(meta.TargetDirectory, target, "release", bin.name)
	if err := guestbin.CheckStatic(artifact); err != nil {
		return Result{}, errcode.Wrap(errcode.ProjectBuildFailed, err, "cargo built %s", artifact)
	}
	return placeProgram(root, artifact, bin.name, KindRust, opts)
}

// placeProgram copies a built program to /app/<name> and returns its
// Result.
func placeProgram(root *os.Root, built, name string, kind Kind, opts Options) (Result, error) {
	dest := AppDir + "/" + name
	n, err := copyHostFile(root, built, imageName(dest))
	if err != nil {
		return Result{}, errcode.Wrap(errcode.StagingFailed, err, "copying %s", built)
	}
	progressf(opts, "staged %s (%d bytes) as %s", name, n, dest)
	return Result{Kind: kind, Entrypoint: []string{dest}, Workdir: AppDir}, nil
}
