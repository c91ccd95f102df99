// Package image is hyphae's build pipeline: it turns a project directory, a
// prebuilt program or a `docker save` archive into a registered,
// content-addressed ext4 image.
//
// Every build runs the same steps:
//
//  1. stage the tree in a fresh temp directory (package project for
//     projects and programs, package archive for archives);
//  2. write hyphae's own files into it (rootfs.WriteHyphaeFiles): the
//     static hyphae-init as /sbin/init, optionally dimension-agent, and the
//     entrypoint, env and workdir files;
//  3. size the filesystem (rootfs.PlanSize) and name the tree by its content
//     (rootfs.TreeDigest, salted with the mkfs parameters and
//     rootfs.FormatVersion);
//  4. when the store already holds that digest and its file, reuse it
//     without running mkfs (Result.Cached), unless Force is set;
//  5. otherwise run mkfs.ext4 into a temp file inside the images
//     directory and let the store move it to images/sha256-<hex>.ext4
//     while it registers the digest and points name:tag at it, atomically.
//
// The digest covers everything the image holds, so a change in any shipped
// file, the entrypoint, the environment, the working directory, the Node.js
// runtime or the hyphae-init binary yields a new image, and nothing else
// does. Project builds get every timestamp set to rootfs.Epoch so that a
// rebuild of unchanged sources hits the cache; archives keep the mtimes
// they carry.
//
// Failure leaves nothing: the staging directory is always removed, the temp
// image file is removed on any error, and nothing is registered until mkfs
// has succeeded.
package image

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"

	"github.com/mattn/go-isatty"

	"github.com/hyphae-run/hyphae/archive"
	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
	"github.com/hyphae-run/hyphae/guestbin"
	"github.com/hyphae-run/hyphae/project"
	"github.com/hyphae-run/hyphae/registry"
	"github.com/hyphae-run/hyphae/rootfs"
)

// Store is what the pipeline needs from the registry (implemented by
// *registry.Registry).
type Store interface {
	// ImagePath is where the image file of digest lives.
	ImagePath(digest string) string
	// ImageByDigest returns the registered image of digest, or an
	// errcode.NotFound error.
	ImageByDigest(ctx context.Context, digest string) (registry.Image, error)
	// PutImage registers the digest (when new) and points name:tag at it,
	// atomically; when img.Path names a temp file in the images directory
	// it moves that file into place in the same step.
	PutImage(ctx context.Context, img registry.Image) error
}

// Builder runs builds and imports into one store.
type Builder struct {
	Store Store
	// Logger receives progress detail; nil discards.
	Logger *slog.Logger
	// Progress is where progress lines go (stderr); they are shown only
	// when it is a terminal.
	Progress io.Writer
}

// BuildOptions describe one `hyphae build`. Exactly one of Dir and Binary is
// set.
type BuildOptions struct {
	Dir, Binary string
	// Name defaults to the project directory's or the binary's base name,
	// Tag to "latest".
	Name, Tag string
	// Entrypoint, when set, replaces the project's (see SplitCommand for
	// the CLI's string form).
	Entrypoint []string
	// Env is added to the project's environment, overriding equal keys.
	Env []guest.EnvVar
	// SizeMiB, when > 0, replaces the computed image size.
	SizeMiB int
	// Force rebuilds even when the image is cached.
	Force bool
	// WithAgent ships dimension-agent as /sbin/dimension-agent.
	WithAgent bool
	// DryRun stages and digests but neither runs mkfs nor registers.
	DryRun bool
	// Node is the node executable for a JavaScript project ("" = PATH).
	Node string
}

// ImportOptions describe one `hyphae import`.
type ImportOptions struct {
	// Archive is the path of a `docker save` archive, or "-" to read it
	// from Stdin.
	Archive string
	Stdin   io.Reader
	// Name defaults to the archive's file name without extensions (and
	// is required for "-"), Tag to "latest".
	Name, Tag string
	WithAgent bool
	Force     bool
	// Env is added to the image config's Env, overriding equal keys.
	Env     []guest.EnvVar
	SizeMiB int
}

// Result is what a build or import produced; it is the JSON that
// `hyphae build --json` prints.
type Result struct {
	Name       string   `json:"name"`
	Tag        string   `json:"tag"`
	Digest     string   `json:"digest"`
	Path       string   `json:"path"`
	SizeBytes  int64    `json:"size_bytes"`
	Cached     bool     `json:"cached"`
	Entrypoint []string `json:"entrypoint"`
	DryRun     bool     `json:"dry_run,omitempty"`
}

// staged is a tree ready for hyphae's files, and how it came to be.
type staged struct {
	dir        string
	source     string // registry.Image.Source
	files      rootfs.Files
	fixedTimes bool // set every timestamp to rootfs.Epoch (project builds)
}

// target is where and how a staged tree is to be stored.
type target struct {
	name, tag string
	sizeMiB   int
	force     bool
	dryRun    bool
}

// Build stages a project directory (o.Dir) or a prebuilt program
// (o.Binary), and stores it as an image.
func (b *Builder) Build(ctx context.Context, o BuildOptions) (Result, error) {
	if (o.Dir == "") == (o.Binary == "") {
		return Result{}, errcode.New(errcode.InvalidArgument, "give a project directory or --binary FILE, not both or neither")
	}
	src := o.Dir
	if src == "" {
		src = o.Binary
	}
	t, err := newTarget(o.Name, o.Tag, defaultName(src), o.SizeMiB, o.Force, o.DryRun)
	if err != nil {
		return Result{}, err
	}
	files, err := guestFiles(o.WithAgent)
	if err != nil {
		return Result{}, err
	}
	stage, err := newStage()
	if err != nil {
		return Result{}, err
	}
	defer removeTree(stage)

	popts := project.Options{Node: o.Node, Logger: b.logger(), Progress: b.terminal()}
	var res project.Result
	if o.Dir != "" {
		res, err = project.Stage(ctx, o.Dir, stage, popts)
	} else {
		res, err = project.StageBinary(ctx, o.Binary, stage, popts)
	}
	if err != nil {
		return Result{}, err
	}
	files.Entrypoint = res.Entrypoint
	if len(o.Entrypoint) > 0 {
		files.Entrypoint = o.Entrypoint
	}
	files.Env = guest.MergeEnv(res.Env, o.Env)
	files.Workdir = res.Workdir
	return b.store(ctx, staged{dir: stage, source: string(res.Kind), files: files, fixedTimes: true}, t)
}

// Import unpacks a `docker save` archive and stores it as an image. The
// image config's Entrypoint followed by Cmd becomes the entrypoint, Env
// (with o.Env over it) the environment and WorkingDir ("/" when empty) the
// working directory. A config User is not applied: hyphae-init runs the
// program as root, and the import logs a warning.
func (b *Builder) Import(ctx context.Context, o ImportOptions) (Result, error) {
	if o.Archive == "" {
		return Result{}, errcode.New(errcode.InvalidArgument, "no archive given")
	}
	def := ""
	if o.Archive != "-" {
		def = defaultName(o.Archive)
	}
	t, err := newTarget(o.Name, o.Tag, def, o.SizeMiB, o.Force, false)
	if err != nil {
		return Result{}, err
	}
	files, err := guestFiles(o.WithAgent)
	if err != nil {
		return Result{}, err
	}
	archivePath := o.Archive
	if o.Archive == "-" {
		if o.Stdin == nil {
			return Result{}, errcode.New(errcode.InvalidArgument, "archive \"-\" needs standard input")
		}
		archivePath, err = archive.Spool(ctx, o.Stdin, "", 0)
		if err != nil {
			return Result{}, err
		}
		defer os.Remove(archivePath)
	}
	im, err := archive.Open(ctx, archivePath, archive.Options{Logger: b.logger()})
	if err != nil {
		return Result{}, err
	}
	cfg := im.Config()
	files.Entrypoint = append(append([]string(nil), cfg.Entrypoint...), cfg.Cmd...)
	if len(files.Entrypoint) == 0 || files.Entrypoint[0] == "" {
		return Result{}, errcode.New(errcode.NoEntrypoint, "image %s has no Entrypoint or Cmd", o.Archive).
			WithHint("rebuild the image with an ENTRYPOINT or CMD")
	}
	var env []guest.EnvVar
	for _, kv := range cfg.Env {
		v, err := guest.ParseEnvVar(kv)
		if err != nil {
			return Result{}, errcode.Wrap(errcode.MalformedArchive, err, "image config Env entry %q", kv)
		}
		env = append(env, v)
	}
	files.Env = guest.MergeEnv(env, o.Env)
	files.Workdir = cfg.WorkingDir
	if files.Workdir != "" && !path.IsAbs(files.Workdir) {
		files.Workdir = "/" + files.Workdir // Docker resolves a relative WorkingDir against "/"
	}
	if cfg.User != "" && cfg.User != "root" && cfg.User != "0" && !strings.HasPrefix(cfg.User, "0:") {
		b.logger().Warn("the image config's User is not applied; the program runs as root", "user", cfg.User)
	}

	stage, err := newStage()
	if err != nil {
		return Result{}, err
	}
	defer removeTree(stage)
	progress := b.unpackProgress()
	err = im.Unpack(ctx, stage, progress.update)
	progress.done()
	if err != nil {
		return Result{}, err
	}
	return b.store(ctx, staged{dir: stage, source: "archive", files: files}, t)
}

// store runs steps 2–5 of the package doc on a staged tree.
func (b *Builder) store(ctx context.Context, s staged, t target) (Result, error) {
	log := b.logger()
	start := time.Now()
	if err := rootfs.WriteHyphaeFiles(s.dir, s.files); err != nil {
		return Result{}, err
	}
	if s.fixedTimes {
		if err := rootfs.NormalizeTimes(ctx, s.dir, rootfs.Epoch()); err != nil {
			return Result{}, err
		}
	}
	usage, err := rootfs.Measure(ctx, s.dir)
	if err != nil {
		return Result{}, err
	}
	plan, err := rootfs.PlanSize(usage, t.sizeMiB)
	if err != nil {
		return Result{}, err
	}
	mkfs := rootfs.MkfsOptions{Plan: plan, Label: "hyphae", Progress: b.terminal(), Logger: log}
	digest, err := rootfs.TreeDigest(ctx, s.dir, mkfs.Params())
	if err != nil {
		return Result{}, err
	}
	mkfs.Seed = digest
	final := b.Store.ImagePath(digest)
	res := Result{Name: t.name, Tag: t.tag, Digest: digest, Path: final, Entrypoint: s.files.Entrypoint, DryRun: t.dryRun}
	img := registry.Image{Digest: digest, Name: t.name, Tag: t.tag, Source: s.source, Entrypoint: s.files.Entrypoint}

	registered, size, err := b.cached(ctx, digest, final)
	if err != nil {
		return Result{}, err
	}
	log.Info("staged", "ref", t.name+":"+t.tag, "digest", digest, "entries", usage.Entries,
		"bytes", usage.Bytes, "size_mib", plan.SizeBytes>>20, "cached", size >= 0, "digest_time", time.Since(start))
	if t.dryRun {
		res.Cached = size >= 0
		res.SizeBytes = plan.SizeBytes
		if size >= 0 {
			res.SizeBytes = size
		}
		return res, nil
	}
	if size >= 0 && !t.force {
		img.SizeBytes, img.Path = size, final
		if err := b.Store.PutImage(ctx, img); err != nil {
			return Result{}, err
		}
		res.Cached, res.SizeBytes = true, size
		return res, nil
	}

	tmp, err := tempImagePath(filepath.Dir(final))
	if err != nil {
		return Result{}, err
	}
	start = time.Now()
	if err := rootfs.MakeExt4(ctx, s.dir, tmp, mkfs); err != nil {
		return Result{}, err
	}
	log.Info("mkfs.ext4 done", "digest", digest, "elapsed", time.Since(start))
	defer os.Remove(tmp) // gone already once the store moved it into place
	img.SizeBytes, img.Path = plan.SizeBytes, tmp
	if registered && size >= 0 {
		// --force over a registered image: replace its file in one
		// rename (a VM that has the old one open keeps reading it).
		if err := os.Rename(tmp, final); err != nil {
			return Result{}, errcode.Wrap(errcode.RegistryError, err, "replace image file %s", final)
		}
		img.Path = final
	}
	if err := b.Store.PutImage(ctx, img); err != nil {
		return Result{}, err
	}
	res.SizeBytes = plan.SizeBytes
	return res, nil
}

// cached reports whether digest is registered and, when its file is also in
// place, the file's size (else -1).
func (b *Builder) cached(ctx context.Context, digest, final string) (registered bool, size int64, err error) {
	if _, err := b.Store.ImageByDigest(ctx, digest); err != nil {
		if errcode.HasCode(err, errcode.NotFound) {
			return false, -1, nil
		}
		return false, -1, err
	}
	st, err := os.Stat(final)
	if err != nil || !st.Mode().IsRegular() {
		b.logger().Warn("registered image file is missing; rebuilding it", "digest", digest, "path", final)
		return true, -1, nil
	}
	return true, st.Size(), nil
}

func newTarget(name, tag, def string, sizeMiB int, force, dryRun bool) (target, error) {
	if name == "" {
		name = def
	}
	if name == "" {
		return target{}, errcode.New(errcode.InvalidName, "no image name given").WithHint("pass --name NAME")
	}
	if tag == "" {
		tag = registry.DefaultTag
	}
	if err := registry.ValidateName(name); err != nil {
		return target{}, err
	}
	if err := registry.ValidateTag(tag); err != nil {
		return target{}, err
	}
	if sizeMiB < 0 {
		return target{}, errcode.New(errcode.InvalidArgument, "--size %d is negative", sizeMiB)
	}
	return target{name: name, tag: tag, sizeMiB: sizeMiB, force: force, dryRun: dryRun}, nil
}

// defaultName derives an image name from a path's base name: extensions
// (.tar, .tar.gz, .exe, …) dropped, lowercased, characters an image name
// cannot hold replaced by '-'. It returns "" when nothing usable is left.
func defaultName(p string) string {
	base := filepath.Base(filepath.Clean(p))
	if base == "." || base == "/" {
		if abs, err := filepath.Abs(p); err == nil {
			base = filepath.Base(abs)
		}
	}
	if i := strings.IndexByte(base[1:], '.'); i >= 0 && !strings.HasPrefix(base, ".") {
		base = base[:i+1]
	}
	name := strings.Map(func(r rune) rune {
		switch {
		case r >= 'A' && r <= 'Z':
			return r + 'a' - 'A'
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9', r == '.', r == '_', r == '-':
			return r
		}
		return '-'
	}, base)
	name = strings.TrimLeft(name, ".-_")
	if len(name) > 128 {
		name = name[:128]
	}
	if registry.ValidateName(name) != nil {
		return ""
	}
	return name
}

// guestFiles locates the guest binaries every image of this build gets.
func guestFiles(withAgent bool) (rootfs.Files, error) {
	var f rootfs.Files
	var err error
	if f.Init, err = guestbin.Locate(guestbin.Init); err != nil {
		return f, err
	}
	if withAgent {
		if f.Agent, err = guestbin.Locate(guestbin.Agent); err != nil {
			return f, err
		}
	}
	return f, nil
}

// newStage makes an empty staging directory. It is the future image's
// root, so it gets the usual 0755 rather than MkdirTemp's 0700.
func newStage() (string, error) {
	dir, err := os.MkdirTemp("", "hyphae-stage-")
	if err != nil {
		return "", errcode.Wrap(errcode.StagingFailed, err, "create staging directory")
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		os.Remove(dir)
		return "", errcode.Wrap(errcode.StagingFailed, err, "create staging directory")
	}
	return dir, nil
}

// removeTree removes a staging tree, also when an image left read-only
// directories in it (which would stop a non-root RemoveAll).
func removeTree(dir string) {
	if os.RemoveAll(dir) == nil {
		return
	}
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			os.Chmod(p, 0o700)
		}
		return nil
	})
	os.RemoveAll(dir)
}

// tempImagePath names a new temp file in the images directory, which the
// registry's GC leaves alone while a build may still be using it.
func tempImagePath(dir string) (string, error) {
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", errcode.Wrap(errcode.StagingFailed, err, "name temp image")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", errcode.Wrap(errcode.RegistryError, err, "create images directory")
	}
	return filepath.Join(dir, registry.TempPrefix+hex.EncodeToString(b[:])+".ext4"), nil
}

func (b *Builder) logger() *slog.Logger {
	if b.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return b.Logger
}

// terminal returns b.Progress when it is a terminal, else nil.
func (b *Builder) terminal() io.Writer {
	if f, ok := b.Progress.(*os.File); ok && isatty.IsTerminal(f.Fd()) {
		return f
	}
	return nil
}

// unpackLine draws "importing: 120/200 MiB" on a terminal, at most five
// times a second.
type unpackLine struct {
	w    io.Writer // nil: draw nothing
	last time.Time
}

func (b *Builder) unpackProgress() *unpackLine { return &unpackLine{w: b.terminal()} }

func (u *unpackLine) update(done, total int64) {
	if u.w == nil || time.Since(u.last) < 200*time.Millisecond {
		return
	}
	u.last = time.Now()
	fmt.Fprintf(u.w, "\r\033[Kimporting: %d/%d MiB", done>>20, total>>20)
}

func (u *unpackLine) done() {
	if u.w != nil && !u.last.IsZero() {
		fmt.Fprint(u.w, "\r\033[K")
	}
}
