package guestinit

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
)

// imageFiles writes files (path relative to root → content; a mode of 0o755
// for paths under bin directories) into a fresh root.
func imageFiles(t *testing.T, files map[string]string) string {
	t.Helper()
	root := t.TempDir()
	for p, content := range files {
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		mode := os.FileMode(0o644)
		if filepath.Base(filepath.Dir(p)) == "bin" || p == guest.AgentPath || filepath.Ext(p) == ".sh" {
			mode = 0o755
		}
		if p[len(p)-1] == '/' {
			if err := os.MkdirAll(full, 0o755); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if err := os.WriteFile(full, []byte(content), mode); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func entrypoint(t *testing.T, argv ...string) string {
	t.Helper()
	b, err := guest.EncodeEntrypoint(argv)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

const defaultPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

func TestLoadPlan(t *testing.T) {
	tests := []struct {
		name    string
		files   map[string]string
		cmdline string
		// want holds paths relative to the root.
		want Plan
	}{
		{
			name:  "defaults only",
			files: map[string]string{guest.EntrypointPath: entrypoint(t, "/bin/app", "--flag", ""), "bin/app": ""},
			want:  Plan{Path: "bin/app", Argv: []string{"/bin/app", "--flag", ""}, Env: []string{defaultPath, "HOME=/root", "TERM=linux"}, Dir: ""},
		},
		{
			name: "command line wins over the env file, which wins over the defaults",
			files: map[string]string{
				guest.EntrypointPath: entrypoint(t, "/bin/app"), "bin/app": "",
				guest.EnvPath: "A=file\nB=file\nHOME=/app\n",
			},
			cmdline: "console=ttyS0 hyphae.env.B=from%20cmdline hyphae.env.C=only%3Dcmdline reboot=k",
			want: Plan{Path: "bin/app", Argv: []string{"/bin/app"}, Dir: "",
				Env: []string{defaultPath, "HOME=/app", "TERM=linux", "A=file", "B=from cmdline", "C=only=cmdline"}},
		},
		{
			name: "program found in the image's PATH, working directory cleaned",
			files: map[string]string{
				guest.EntrypointPath: entrypoint(t, "app", "x"), "opt/tool/bin/app": "",
				guest.EnvPath:     "PATH=/nowhere:relative/bin:/opt/tool/bin\n",
				guest.WorkdirPath: "/srv/data/\n", "srv/data/": "",
			},
			want: Plan{Path: "opt/tool/bin/app", Argv: []string{"app", "x"}, Dir: "srv/data",
				Env: []string{"PATH=/nowhere:relative/bin:/opt/tool/bin", "HOME=/root", "TERM=linux"}},
		},
		{
			name: "relative program path is relative to the working directory",
			files: map[string]string{
				guest.EntrypointPath: entrypoint(t, "./start.sh"), "app/start.sh": "",
				guest.WorkdirPath: "/app", "app/": "",
			},
			want: Plan{Path: "app/start.sh", Argv: []string{"./start.sh"}, Dir: "app", Env: []string{defaultPath, "HOME=/root", "TERM=linux"}},
		},
		{
			name:    "agent replaces the entrypoint, keeps env and workdir",
			files:   map[string]string{guest.AgentPath: "", guest.EnvPath: "A=1\n", guest.WorkdirPath: "/w", "w/": ""},
			cmdline: "hyphae.env.A=2",
			want:    Plan{Path: "sbin/dimension-agent", Argv: []string{guest.AgentPath}, Dir: "w", Agent: true, Env: []string{defaultPath, "HOME=/root", "TERM=linux", "A=2"}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := imageFiles(t, tt.files)
			got, err := LoadPlan(root, tt.cmdline)
			if err != nil {
				t.Fatal(err)
			}
			want := tt.want
			want.Path = filepath.Join(root, want.Path)
			want.Dir = filepath.Join(root, want.Dir)
			if got.Path != want.Path || got.Dir != want.Dir || got.Agent != want.Agent ||
				!slices.Equal(got.Argv, want.Argv) || !slices.Equal(got.Env, want.Env) {
				t.Fatalf("got  %+v\nwant %+v", got, want)
			}
		})
	}
}

func TestLoadPlanErrors(t *testing.T) {
	tests := []struct {
		name    string
		files   map[string]string
		cmdline string
		// also is a second code the error chain must carry, if any.
		also errcode.Code
	}{
		{name: "no entrypoint", files: map[string]string{"etc/": ""}},
		{name: "empty entrypoint", files: map[string]string{guest.EntrypointPath: ""}, also: errcode.NoEntrypoint},
		{name: "program missing", files: map[string]string{guest.EntrypointPath: entrypoint(t, "/bin/nope")}},
		{name: "program not in PATH", files: map[string]string{guest.EntrypointPath: entrypoint(t, "nope")}},
		{name: "program not executable", files: map[string]string{guest.EntrypointPath: entrypoint(t, "/data/app"), "data/app": ""}},
		{name: "program is a directory", files: map[string]string{guest.EntrypointPath: entrypoint(t, "/bin/app"), "bin/app/": ""}},
		{name: "bad env file", files: map[string]string{guest.EntrypointPath: entrypoint(t, "/bin/app"), "bin/app": "", guest.EnvPath: "A=1\njunk\n"}, also: errcode.InvalidEnv},
		{name: "relative workdir", files: map[string]string{guest.EntrypointPath: entrypoint(t, "/bin/app"), "bin/app": "", guest.WorkdirPath: "app"}},
		{name: "missing workdir", files: map[string]string{guest.EntrypointPath: entrypoint(t, "/bin/app"), "bin/app": "", guest.WorkdirPath: "/nope"}},
		{name: "workdir is a file", files: map[string]string{guest.EntrypointPath: entrypoint(t, "/bin/app"), "bin/app": "", guest.WorkdirPath: "/bin/app"}},
		{name: "equals in command-line key", files: map[string]string{guest.EntrypointPath: entrypoint(t, "/bin/app"), "bin/app": ""}, cmdline: "hyphae.env.K%3D1=v", also: errcode.InvalidEnv},
		{name: "NUL in command-line value", files: map[string]string{guest.EntrypointPath: entrypoint(t, "/bin/app"), "bin/app": ""}, cmdline: "hyphae.env.K=a%00b", also: errcode.InvalidEnv},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := LoadPlan(imageFiles(t, tt.files), tt.cmdline)
			if errcode.CodeOf(err) != errcode.InitFatal {
				t.Fatalf("err = %v, want code %s", err, errcode.InitFatal)
			}
			if tt.also != "" && !errcode.HasCode(err, tt.also) {
				t.Fatalf("err = %v, want it to carry %s too", err, tt.also)
			}
		})
	}
}
