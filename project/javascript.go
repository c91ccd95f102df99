package project

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"path/filepath"

	"github.com/dustin/go-humanize"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
)

// rootFiles answers projectFiles questions from the project directory
// through an os.Root, so that a symlink pointing outside the project is
// never followed.
type rootFiles struct{ root *os.Root }

func (r rootFiles) isFile(rel string) bool {
	st, err := r.root.Stat(rel)
	return err == nil && st.Mode().IsRegular()
}

func (r rootFiles) firstLine(rel string) string {
	f, err := r.root.Open(rel)
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 512), 4096)
	if sc.Scan() {
		return sc.Text()
	}
	return ""
}

// stageJavaScript copies the project to /app and node with its closure to
// /usr/bin/node. The entrypoint is derived first, so that a project that
// could not start fails before 100 MB are copied.
func stageJavaScript(ctx context.Context, dir string, root *os.Root, opts Options) (Result, error) {
	src, err := os.OpenRoot(dir)
	if err != nil {
		return Result{}, errcode.Wrap(errcode.StagingFailed, err, "opening project %s", dir)
	}
	defer src.Close()
	data, err := src.ReadFile("package.json")
	if err != nil {
		return Result{}, errcode.Wrap(errcode.InvalidManifest, err, "reading %s", filepath.Join(dir, "package.json"))
	}
	entry, err := parsePackageJSON(data, rootFiles{src})
	if err != nil {
		return Result{}, err
	}
	node, err := findNode(opts.Node)
	if err != nil {
		return Result{}, err
	}

	progressf(opts, "copying project %s to %s", dir, AppDir)
	stats, err := copyTree(ctx, dir, root, imageName(AppDir), func(rel string) bool { return isExcluded(filepath.ToSlash(rel)) }, opts)
	if err != nil {
		return Result{}, err
	}
	progressf(opts, "copied %s", stats)

	progressf(opts, "copying node runtime %s", node)
	n, err := copyHostFile(root, node, imageName(NodePath))
	if err != nil {
		return Result{}, errcode.Wrap(errcode.StagingFailed, err, "copying %s", node)
	}
	libEnv, libBytes, err := stageClosure(ctx, root, node, opts)
	if err != nil {
		return Result{}, errcode.Wrap(errcode.RuntimeNotFound, err, "staging the libraries of %s", node)
	}
	opts.logger().Info("staged JavaScript project", "dir", dir, "files", stats.files, "node", node,
		"runtime_bytes", n+libBytes, "runtime", humanize.IBytes(uint64(n+libBytes)))

	env := guest.MergeEnv([]guest.EnvVar{{Key: "NODE_ENV", Value: "production"}}, entry.env, libEnv)
	return Result{Kind: KindJavaScript, Entrypoint: entry.argv, Workdir: AppDir, Env: env}, nil
}

// findNode resolves the node to ship — the given path, or node from PATH —
// to its real path and checks it is an ELF program for this machine.
func findNode(node string) (string, error) {
	hint := "install Node.js, or pass --node PATH to a node executable"
	if node == "" {
		p, err := exec.LookPath("node")
		if err != nil {
			return "", wrapHint(errcode.RuntimeNotFound, err, hint, "node not found on PATH")
		}
		node = p
	}
	abs, err := filepath.Abs(node)
	if err == nil {
		abs, err = filepath.EvalSymlinks(abs)
	}
	if err != nil {
		return "", wrapHint(errcode.RuntimeNotFound, err, hint, "node runtime %s", node)
	}
	if _, err := inspectProgram(abs); err != nil {
		return "", wrapHint(errcode.RuntimeNotFound, err, "pass --node PATH to the node executable itself (not a wrapper script such as a version manager's shim)", "node runtime %s cannot be shipped", node)
	}
	return abs, nil
}
