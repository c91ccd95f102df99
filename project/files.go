package project

import (
	"context"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"

	"github.com/dustin/go-humanize"

	"github.com/hyphae-run/hyphae/errcode"
)

// excludedPaths are project-relative paths that the JavaScript copy leaves
// out: version control and caches that tools rebuild on demand, which would
// only make images bigger and change their digest without changing what
// runs. They match at the project root only, so that a package in
// node_modules that happens to be called "coverage" is still copied.
var excludedPaths = []string{
	".git",
	".npm",
	".cache",
	".yarn/cache",
	".next/cache",
	"coverage",
	"node_modules/.cache",
}

// ExcludedPaths returns the project-relative paths (slash-separated, from
// the project root) that Stage does not copy for a JavaScript project.
func ExcludedPaths() []string { return append([]string(nil), excludedPaths...) }

func isExcluded(rel string) bool {
	for _, p := range excludedPaths {
		if rel == p {
			return true
		}
	}
	return false
}

// copyStats counts what a copy wrote, for progress lines.
type copyStats struct {
	files, links, dirs int
	bytes              int64
}

func (s copyStats) String() string {
	return fmt.Sprintf("%d files, %d symlinks, %d directories, %s", s.files, s.links, s.dirs, humanize.IBytes(uint64(s.bytes)))
}

// copyTree copies the tree under src into dst (a slash path inside root)
// without following any symlink: symlinks are recreated with the same
// target text, whether they point inside the project or not. Regular files
// keep their content, permission bits (setuid, setgid, sticky included) and
// mtime; directories keep their mode and mtime. Paths for which skip
// returns true are left out with everything below them; other file types
// (sockets, FIFOs, devices) are left out with a warning.
func copyTree(ctx context.Context, src string, root *os.Root, dst string, skip func(rel string) bool, opts Options) (copyStats, error) {
	var stats copyStats
	srcRoot, err := os.OpenRoot(src)
	if err != nil {
		return stats, errcode.Wrap(errcode.StagingFailed, err, "opening project %s", src)
	}
	defer srcRoot.Close()
	type dirFix struct {
		name  string
		mode  fs.FileMode
		mtime time.Time
	}
	var dirs []dirFix
	// A stage inside the project would otherwise be copied into itself.
	stageInfo, err := root.Stat(".")
	if err != nil {
		return stats, errcode.Wrap(errcode.StagingFailed, err, "staging directory")
	}
	err = fs.WalkDir(srcRoot.FS(), ".", func(rel string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if rel != "." && skip(rel) {
			if d.IsDir() {
				return fs.SkipDir
			}
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		name := path.Join(dst, rel)
		switch {
		case d.IsDir() && os.SameFile(info, stageInfo):
			return fs.SkipDir
		case d.IsDir():
			if err := root.MkdirAll(name, 0o700); err != nil {
				return err
			}
			dirs = append(dirs, dirFix{name, info.Mode(), info.ModTime()})
			stats.dirs++
		case d.Type()&fs.ModeSymlink != 0:
			target, err := srcRoot.Readlink(rel)
			if err != nil {
				return err
			}
			if filepath.IsAbs(target) {
				opts.logger().Warn("absolute symlink copied as it is; it resolves against the image's root, not the host's",
					"path", filepath.Join(src, rel), "target", target)
			}
			if err := root.Symlink(target, name); err != nil {
				return err
			}
			stats.links++
		case d.Type().IsRegular():
			f, err := srcRoot.Open(rel)
			if err != nil {
				return err
			}
			n, err := writeFile(root, name, f, info)
			f.Close()
			if err != nil {
				return err
			}
			stats.files++
			stats.bytes += n
		default:
			opts.logger().Warn("not copying special file", "path", filepath.Join(src, rel), "type", d.Type().String())
		}
		return nil
	})
	if err != nil {
		return stats, errcode.Wrap(errcode.StagingFailed, err, "copying %s to %s", src, dst)
	}
	// Directory modes and mtimes are set last, deepest first: writing into a
	// directory changes its mtime, and a read-only directory could not be
	// filled.
	for i := len(dirs) - 1; i >= 0; i-- {
		d := dirs[i]
		if err := root.Chmod(d.name, d.mode.Perm()|d.mode&(fs.ModeSetgid|fs.ModeSticky)); err != nil {
			return stats, errcode.Wrap(errcode.StagingFailed, err, "setting mode of %s", d.name)
		}
		if err := root.Chtimes(d.name, d.mtime, d.mtime); err != nil {
			return stats, errcode.Wrap(errcode.StagingFailed, err, "setting mtime of %s", d.name)
		}
	}
	return stats, nil
}

// writeFile creates name in root (its parent directories too) with the
// content of r and the mode and mtime of info, and returns the bytes
// written. name must not exist yet.
func writeFile(root *os.Root, name string, r io.Reader, info fs.FileInfo) (int64, error) {
	if dir := path.Dir(name); dir != "." {
		if err := root.MkdirAll(dir, 0o755); err != nil {
			return 0, err
		}
	}
	out, err := root.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return 0, err
	}
	n, err := io.Copy(out, r)
	if err == nil {
		// Chmod on the descriptor sets the bits exactly, umask aside.
		err = out.Chmod(info.Mode() & (fs.ModePerm | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky))
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = root.Chtimes(name, info.ModTime(), info.ModTime())
	}
	return n, err
}

// copyHostFile copies the regular file at hostPath (symlinks resolved) to
// name in root.
func copyHostFile(root *os.Root, hostPath, name string) (int64, error) {
	f, err := os.Open(hostPath)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return 0, err
	}
	if !info.Mode().IsRegular() {
		return 0, fmt.Errorf("%s is not a regular file", hostPath)
	}
	return writeFile(root, name, f, info)
}

// imageName turns an absolute image path such as /usr/bin/node into the
// name relative to the stage root.
func imageName(p string) string { return strings.TrimPrefix(path.Clean(p), "/") }

// progressf prints one progress line when progress is wanted.
func progressf(opts Options, format string, args ...any) {
	if opts.Progress != nil {
		fmt.Fprintf(opts.Progress, format+"\n", args...)
	}
}
