package agent

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
)

// defaultPath is the search path when the bundle's environment sets none.
const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Program is what the agent runs: the bundle's entrypoint.
type Program struct {
	// Argv is the program and its arguments; Argv[0] without a slash is
	// looked up in the PATH of Env.
	Argv []string
	// Env is the bundle's environment, before the agent adds
	// DIMENSION_EVENTS_SOCK.
	Env []guest.EnvVar
	// Dir is the working directory ("" = "/").
	Dir string
}

// LoadProgram reads the entrypoint, env file and workdir of the image
// whose hyphae files live under root ("/" in the guest), and merges the
// environment: base, then /etc/hyphae/env, then the hyphae.env. tokens of
// the kernel command line. Missing env and workdir files are allowed.
func LoadProgram(root string, base []guest.EnvVar, cmdline string) (*Program, error) {
	at := func(p string) string { return filepath.Join(root, p) }
	raw, err := os.ReadFile(at(guest.EntrypointPath))
	if err != nil {
		return nil, errcode.Wrap(errcode.NoEntrypoint, err, "reading %s", guest.EntrypointPath)
	}
	argv, err := guest.DecodeEntrypoint(raw)
	if err != nil {
		return nil, err
	}
	var fileEnv []guest.EnvVar
	switch b, err := os.ReadFile(at(guest.EnvPath)); {
	case err == nil:
		if fileEnv, err = guest.DecodeEnvFile(b); err != nil {
			return nil, err
		}
	case !errors.Is(err, fs.ErrNotExist):
		return nil, errcode.Wrap(errcode.InvalidEnv, err, "reading %s", guest.EnvPath)
	}
	dir := "/"
	switch b, err := os.ReadFile(at(guest.WorkdirPath)); {
	case err == nil:
		if d := strings.TrimSpace(string(b)); d != "" {
			dir = d
		}
	case !errors.Is(err, fs.ErrNotExist):
		return nil, errcode.Wrap(errcode.InvalidArgument, err, "reading %s", guest.WorkdirPath)
	}
	return &Program{
		Argv: argv,
		Env:  guest.MergeEnv(base, fileEnv, guest.ParseCmdlineEnv(cmdline)),
		Dir:  dir,
	}, nil
}

// EnvFromOS converts os.Environ-style entries, skipping malformed ones
// (the kernel passes init odd entries such as "BOOT_IMAGE=...").
func EnvFromOS(entries []string) []guest.EnvVar {
	var out []guest.EnvVar
	for _, e := range entries {
		if v, err := guest.ParseEnvVar(e); err == nil {
			out = append(out, v)
		}
	}
	return out
}

// resolve finds argv[0] in the program's own PATH (not the agent's), so
// that an image's PATH decides which binary runs.
func (p *Program) resolve() (string, error) {
	name := p.Argv[0]
	if strings.Contains(name, "/") {
		return name, nil
	}
	path := defaultPath
	for _, v := range p.Env {
		if v.Key == "PATH" {
			path = v.Value
		}
	}
	for _, dir := range filepath.SplitList(path) {
		if dir == "" {
			dir = "."
		}
		cand := filepath.Join(dir, name)
		if !filepath.IsAbs(cand) {
			cand = filepath.Join(p.dir(), cand)
		}
		if st, err := os.Stat(cand); err == nil && st.Mode().IsRegular() && st.Mode().Perm()&0o111 != 0 {
			return cand, nil
		}
	}
	return "", errcode.New(errcode.SpawnFailed, "%s not found in PATH %s", name, path)
}

func (p *Program) dir() string {
	if p.Dir == "" {
		return "/"
	}
	return p.Dir
}

func (p *Program) environ(extra ...guest.EnvVar) []string {
	merged := guest.MergeEnv(p.Env, extra)
	out := make([]string, len(merged))
	for i, v := range merged {
		out[i] = v.String()
	}
	return out
}
