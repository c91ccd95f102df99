package rootfs

import (
	"errors"
	"io"
	"io/fs"
	"os"
	"path"
	"strings"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
)

// EpochUnix (2000-01-01T00:00:00Z) is the modification time given to the
// files hyphae writes into an image, and by package image to every entry of
// a project build, so that staging the same input twice gives the same
// tree. It is also the clock mkfs.ext4 is told to read
// (E2FSPROGS_FAKE_TIME).
const EpochUnix int64 = 946684800

// Epoch returns EpochUnix as a time.Time.
func Epoch() time.Time { return time.Unix(EpochUnix, 0) }

// maxSymlinkHops bounds symlink resolution inside the tree, like the
// kernel's own limit (MAXSYMLINKS).
const maxSymlinkHops = 40

// Files are hyphae's own files for one image.
type Files struct {
	// Init is the host path of the static hyphae-init binary; it becomes
	// /sbin/init.
	Init string
	// Agent is the host path of the static dimension-agent binary, copied
	// to /sbin/dimension-agent; "" ships no agent.
	Agent string
	// Entrypoint is the program's argv (/etc/hyphae/entrypoint).
	Entrypoint []string
	// Env is the program's environment (/etc/hyphae/env).
	Env []guest.EnvVar
	// Workdir is the program's working directory (/etc/hyphae/workdir);
	// "" means "/".
	Workdir string
}

// WriteHyphaeFiles writes f into the tree at root.
//
// The tree may come from an untrusted image, so every write goes through an
// os.Root (nothing can land outside root) and follows these rules:
//   - A file hyphae writes (/sbin/init, /sbin/dimension-agent, the files in
//     /etc/hyphae) replaces whatever entry is at its path — a symlink, a
//     hard link shared with another file, a directory — with a new regular
//     file; it never writes through the old entry. /etc/resolv.conf is
//     replaced the same way unless it is already a regular file, which is
//     kept.
//   - /etc/hyphae, which hyphae owns, is made a real directory: a symlink
//     or file there is removed first.
//   - The system directories /etc and /sbin are resolved the way the guest
//     kernel will resolve them, with the tree as "/": a symlink such as
//     /sbin -> usr/sbin or /sbin -> /usr/sbin (usr-merged distributions) is
//     followed when it leads to a directory inside the tree, so the image's
//     other programs stay where they are. A symlink that does not resolve
//     to a directory there (dangling, looping, pointing at a file) is
//     replaced by a real directory.
//
// The files are given mode 0755 (binaries) or 0644, and Epoch() as mtime.
func WriteHyphaeFiles(root string, f Files) error {
	if f.Init == "" {
		return errcode.New(errcode.GuestBinaryMissing, "no hyphae-init binary given")
	}
	entry, err := guest.EncodeEntrypoint(f.Entrypoint)
	if err != nil {
		return err
	}
	env, err := guest.EncodeEnvFile(f.Env)
	if err != nil {
		return err
	}
	workdir := f.Workdir
	if workdir == "" {
		workdir = "/"
	}
	if !path.IsAbs(workdir) || strings.ContainsAny(workdir, "\x00\n") {
		return errcode.New(errcode.InvalidArgument, "working directory %q must be an absolute path on one line", workdir)
	}

	r, err := os.OpenRoot(root)
	if err != nil {
		return errcode.Wrap(errcode.StagingFailed, err, "open staging tree")
	}
	defer r.Close()
	w := &writer{r: r}

	sbin := w.systemDir("sbin")
	etc := w.systemDir("etc")
	// hyphae-init mounts over these; they must exist in the image because
	// the root may be read-only at boot (Firecracker attaches it so).
	for _, mnt := range [...]string{"dev", "proc", "sys", "run", "tmp"} {
		w.systemDir(mnt)
	}
	cfg := w.ownDir(path.Join(etc, "hyphae"))
	w.copyFile(path.Join(sbin, "init"), f.Init)
	if f.Agent != "" {
		w.copyFile(path.Join(sbin, "dimension-agent"), f.Agent)
	}
	w.writeFile(path.Join(cfg, "entrypoint"), entry, false)
	w.writeFile(path.Join(cfg, "env"), env, false)
	w.writeFile(path.Join(cfg, "workdir"), []byte(workdir+"\n"), false)
	w.writeFile(path.Join(etc, "resolv.conf"), nil, true)
	if w.err != nil {
		return errcode.Wrap(errcode.StagingFailed, w.err, "write hyphae files")
	}
	return nil
}

// writer carries the first error through a sequence of writes, so that
// WriteHyphaeFiles reads as the list of what it writes.
type writer struct {
	r   *os.Root
	err error
}

// systemDir returns the symlink-free path, relative to the root, of the
// directory the guest will see at /name, creating or replacing it as
// WriteHyphaeFiles describes.
func (w *writer) systemDir(name string) string {
	if w.err != nil {
		return name
	}
	if p, ok := resolve(w.r, name); ok {
		return p
	}
	return w.ownDir(name)
}

// ownDir makes rel (whose parent is free of symlinks) a real directory,
// removing a symlink or any non-directory in its way, and returns rel.
func (w *writer) ownDir(rel string) string {
	if w.err != nil {
		return rel
	}
	fi, err := w.r.Lstat(rel)
	switch {
	case err == nil && fi.IsDir():
		return rel
	case err == nil:
		if err := w.r.Remove(rel); err != nil {
			w.err = err
			return rel
		}
	case !errors.Is(err, fs.ErrNotExist):
		w.err = err
		return rel
	}
	if err := w.r.Mkdir(rel, 0o755); err != nil {
		w.err = err
	}
	return rel
}

// writeFile creates rel as a new regular file holding data, after removing
// whatever was at rel. With keepRegular an existing regular file is left as
// it is instead.
func (w *writer) writeFile(rel string, data []byte, keepRegular bool) {
	w.create(rel, 0o644, keepRegular, func(dst io.Writer) error {
		_, err := dst.Write(data)
		return err
	})
}

// copyFile creates rel as a new executable file with the content of the
// host file src.
func (w *writer) copyFile(rel, src string) {
	w.create(rel, 0o755, false, func(dst io.Writer) error {
		in, err := os.Open(src)
		if err != nil {
			return err
		}
		defer in.Close()
		_, err = io.Copy(dst, in)
		return err
	})
}

func (w *writer) create(rel string, mode fs.FileMode, keepRegular bool, fill func(io.Writer) error) {
	if w.err != nil {
		return
	}
	fi, err := w.r.Lstat(rel)
	switch {
	case err == nil && keepRegular && fi.Mode().IsRegular():
		return
	case err == nil:
		// Remove, never truncate: the old entry may be a symlink or a
		// hard link that another file of the image shares.
		if err := w.r.RemoveAll(rel); err != nil {
			w.err = err
			return
		}
	case !errors.Is(err, fs.ErrNotExist):
		w.err = err
		return
	}
	out, err := w.r.OpenFile(rel, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		w.err = err
		return
	}
	err = fill(out)
	if err == nil {
		err = out.Chmod(mode) // the umask may have narrowed OpenFile's mode
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = w.r.Chtimes(rel, Epoch(), Epoch())
	}
	w.err = err
}

// resolve follows symlinks in rel the way a process chrooted into r would
// (absolute targets start at r, ".." stops at r) and reports the resulting
// symlink-free relative path when it names an existing directory.
func resolve(r *os.Root, rel string) (string, bool) {
	var done []string
	todo := strings.Split(rel, "/")
	for hops := 0; len(todo) > 0; {
		c := todo[0]
		todo = todo[1:]
		switch c {
		case "", ".":
			continue
		case "..":
			if len(done) > 0 {
				done = done[:len(done)-1]
			}
			continue
		}
		p := path.Join(append(done, c)...)
		fi, err := r.Lstat(p)
		if err != nil {
			return "", false
		}
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			if hops++; hops > maxSymlinkHops {
				return "", false
			}
			target, err := r.Readlink(p)
			if err != nil {
				return "", false
			}
			if path.IsAbs(target) {
				done = nil
			}
			todo = append(strings.Split(target, "/"), todo...)
		case fi.IsDir():
			done = append(done, c)
		default:
			return "", false
		}
	}
	if len(done) == 0 {
		return ".", true
	}
	return path.Join(done...), true
}
