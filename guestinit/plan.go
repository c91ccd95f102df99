package guestinit

import (
	"errors"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
)

// Plan is what init runs.
type Plan struct {
	// Path is the executable, resolved under the root.
	Path string
	// Argv is the program's argument vector; Argv[0] is as the image
	// wrote it (or guest.AgentPath).
	Argv []string
	// Env holds KEY=VALUE entries: the defaults, overridden by
	// /etc/hyphae/env, overridden by hyphae.env. command-line tokens.
	Env []string
	// Dir is the working directory, resolved under the root.
	Dir string
	// Agent reports that Path is the dimension agent, which reads the
	// entrypoint itself.
	Agent bool
}

// defaultEnv is the base layer, for images that set none of these: without
// PATH a shell entrypoint cannot find anything.
func defaultEnv() []guest.EnvVar {
	return []guest.EnvVar{
		{Key: "PATH", Value: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
		{Key: "HOME", Value: "/root"},
		{Key: "TERM", Value: "linux"},
	}
}

// LoadPlan reads the image's /etc/hyphae files under root and combines them
// with the hyphae.env. tokens of the kernel command line, which win over
// the env file. When root holds /sbin/dimension-agent the plan runs the
// agent instead of the entrypoint, with the same environment and working
// directory. Errors carry code E304.
func LoadPlan(root, cmdline string) (Plan, error) {
	fileEnv, err := readEnvFile(root)
	if err != nil {
		return Plan{}, err
	}
	cmdEnv := guest.ParseCmdlineEnv(cmdline)
	for _, v := range cmdEnv {
		if strings.ContainsAny(v.Key, "=\x00") || strings.ContainsRune(v.Value, 0) {
			return Plan{}, errcode.Wrap(errcode.InitFatal,
				errcode.New(errcode.InvalidEnv, "variable %q holds '=' or NUL in its key or NUL in its value", v.Key),
				"bad %s token on the kernel command line", guest.CmdlineEnvPrefix)
		}
	}
	merged := guest.MergeEnv(defaultEnv(), fileEnv, cmdEnv)
	env := make([]string, len(merged))
	pathVar := ""
	for i, v := range merged {
		env[i] = v.String()
		if v.Key == "PATH" {
			pathVar = v.Value
		}
	}
	workdir, err := readWorkdir(root)
	if err != nil {
		return Plan{}, err
	}
	plan := Plan{Env: env, Dir: filepath.Join(root, workdir)}
	if st, err := os.Stat(plan.Dir); err != nil || !st.IsDir() {
		if err == nil {
			err = errcode.New(errcode.InitFatal, "not a directory")
		}
		return Plan{}, errcode.Wrap(errcode.InitFatal, err, "working directory %s", workdir)
	}

	agent := filepath.Join(root, guest.AgentPath)
	if st, err := os.Stat(agent); err == nil && st.Mode().IsRegular() {
		plan.Path, plan.Argv, plan.Agent = agent, []string{guest.AgentPath}, true
		return plan, nil
	}

	b, err := os.ReadFile(filepath.Join(root, guest.EntrypointPath))
	if err != nil {
		return Plan{}, errcode.Wrap(errcode.InitFatal, err, "cannot read %s", guest.EntrypointPath)
	}
	argv, err := guest.DecodeEntrypoint(b)
	if err != nil {
		return Plan{}, errcode.Wrap(errcode.InitFatal, err, "bad %s", guest.EntrypointPath)
	}
	exe, err := lookPath(root, workdir, argv[0], pathVar)
	if err != nil {
		return Plan{}, err
	}
	plan.Path, plan.Argv = exe, argv
	return plan, nil
}

func readEnvFile(root string) ([]guest.EnvVar, error) {
	b, err := os.ReadFile(filepath.Join(root, guest.EnvPath))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, errcode.Wrap(errcode.InitFatal, err, "cannot read %s", guest.EnvPath)
	}
	vars, err := guest.DecodeEnvFile(b)
	if err != nil {
		return nil, errcode.Wrap(errcode.InitFatal, err, "bad %s", guest.EnvPath)
	}
	return vars, nil
}

// readWorkdir returns the image's working directory, "/" when it sets
// none. It must be absolute: a relative one has nothing to be relative to.
func readWorkdir(root string) (string, error) {
	b, err := os.ReadFile(filepath.Join(root, guest.WorkdirPath))
	if errors.Is(err, fs.ErrNotExist) {
		return "/", nil
	}
	if err != nil {
		return "", errcode.Wrap(errcode.InitFatal, err, "cannot read %s", guest.WorkdirPath)
	}
	dir := strings.TrimRight(string(b), "\r\n")
	switch {
	case dir == "":
		return "/", nil
	case !path.IsAbs(dir) || strings.ContainsRune(dir, 0):
		return "", errcode.New(errcode.InitFatal, "%s holds %q, which is not an absolute path", guest.WorkdirPath, dir)
	}
	return path.Clean(dir), nil
}

// lookPath resolves the program under root the way execvp would inside
// the image: a name with a slash is taken as is (relative to the working
// directory), any other is searched in the program's PATH, not init's own.
func lookPath(root, workdir, name, pathVar string) (string, error) {
	if strings.Contains(name, "/") {
		p := name
		if !path.IsAbs(p) {
			p = path.Join(workdir, p)
		}
		full := filepath.Join(root, p)
		if err := checkExecutable(full); err != nil {
			return "", errcode.Wrap(errcode.InitFatal, err, "cannot run %s", name)
		}
		return full, nil
	}
	for _, dir := range filepath.SplitList(pathVar) {
		if !path.IsAbs(dir) {
			continue // a relative PATH entry would depend on the working directory; execvp's "." semantics are a trap
		}
		full := filepath.Join(root, dir, name)
		if checkExecutable(full) == nil {
			return full, nil
		}
	}
	return "", errcode.New(errcode.InitFatal, "program %q not found in PATH=%s", name, pathVar)
}

func checkExecutable(p string) error {
	st, err := os.Stat(p)
	if err != nil {
		return err
	}
	if !st.Mode().IsRegular() {
		return errcode.New(errcode.InitFatal, "%s is not a regular file", p)
	}
	if st.Mode().Perm()&0o111 == 0 {
		return errcode.New(errcode.InitFatal, "%s is not executable", p)
	}
	return nil
}
