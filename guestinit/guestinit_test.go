package guestinit

import (
	"context"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
	"golang.org/x/sys/unix"
)

func TestResultLine(t *testing.T) {
	tests := []struct {
		name string
		res  Result
		want string
	}{
		{"exit 0", Result{Code: 0}, "hyphae-init: exit code=0"},
		{"exit 3", Result{Code: 3}, "hyphae-init: exit code=3"},
		{"killed", Result{Code: 137, Signal: 9}, "hyphae-init: exit code=137 signal=9"},
		{"fatal", fatal(errcode.New(errcode.InitFatal, "cannot read %s", guest.EntrypointPath)), "hyphae-init: fatal E304: cannot read /etc/hyphae/entrypoint"},
		{"fatal with another code is wrapped", fatal(errcode.New(errcode.NoEntrypoint, "empty")), "hyphae-init: fatal E304: init failed: E408: empty"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			line := tt.res.Line()
			if line != tt.want {
				t.Fatalf("Line() = %q, want %q", line, tt.want)
			}
			st, ok := guest.ParseStatusLine(line)
			if !ok || st.ExitCode != tt.res.Code || st.Signal != tt.res.Signal {
				t.Fatalf("ParseStatusLine(%q) = %+v, %v", line, st, ok)
			}
		})
	}
}

func TestResultOf(t *testing.T) {
	tests := []struct {
		name string
		ws   unix.WaitStatus // raw wait(2) status word
		want Result
	}{
		{"exit 0", 0, Result{Code: 0}},
		{"exit 3", 3 << 8, Result{Code: 3}},
		{"exit 255", 255 << 8, Result{Code: 255}},
		{"SIGKILL", 9, Result{Code: 137, Signal: 9}},
		{"SIGTERM with core bit", 15 | 0x80, Result{Code: 143, Signal: 15}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := resultOf(tt.ws); got != tt.want {
				t.Fatalf("resultOf(%#x) = %+v, want %+v", int(tt.ws), got, tt.want)
			}
		})
	}
}

// shellRoot is an image whose entrypoint is /bin/sh -c script; /bin/sh
// links to the host's shell, so Run can start it without a chroot.
func shellRoot(t *testing.T, script string, files map[string]string) string {
	t.Helper()
	sh, err := filepath.EvalSymlinks("/bin/sh")
	if err != nil {
		t.Skipf("no /bin/sh: %v", err)
	}
	if files == nil {
		files = map[string]string{}
	}
	files[guest.EntrypointPath] = entrypoint(t, "/bin/sh", "-c", script)
	root := imageFiles(t, files)
	if err := os.MkdirAll(filepath.Join(root, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(sh, filepath.Join(root, "bin", "sh")); err != nil {
		t.Fatal(err)
	}
	return root
}

// TestRunInProcess runs programs through Run without mounts: the exit
// status, the environment and the working directory the program sees, and
// stdin on /dev/null.
func TestRunInProcess(t *testing.T) {
	tests := []struct {
		name    string
		script  string
		files   map[string]string
		cmdline string
		want    Result
		output  string // with ROOT standing for the root directory
	}{
		{
			name:    "env, workdir and stdin",
			script:  `echo "A=$A B=$B C=$C HOME=$HOME"; pwd; cat; echo stdin-done`,
			files:   map[string]string{guest.EnvPath: "A=file\nB=file\n", guest.WorkdirPath: "/app", "app/": ""},
			cmdline: "hyphae.env.B=cmdline hyphae.env.C=x%20y",
			want:    Result{Code: 0},
			output:  "A=file B=cmdline C=x y HOME=/root\nROOT/app\nstdin-done\n",
		},
		{name: "exit 3", script: "exit 3", want: Result{Code: 3}},
		{name: "killed by SIGKILL", script: "kill -9 $$", want: Result{Code: 137, Signal: 9}},
		{name: "killed by SIGTERM", script: "kill -15 $$", want: Result{Code: 143, Signal: 15}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := shellRoot(t, tt.script, tt.files)
			out := filepath.Join(t.TempDir(), "console")
			console, err := os.Create(out)
			if err != nil {
				t.Fatal(err)
			}
			defer console.Close()
			cmdline := filepath.Join(t.TempDir(), "cmdline")
			if err := os.WriteFile(cmdline, []byte(tt.cmdline+"\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			res := Run(context.Background(), Config{Root: root, CmdlinePath: cmdline, Stdout: console, Stderr: console})
			if res != tt.want {
				t.Fatalf("Run = %+v, want %+v", res, tt.want)
			}
			got, _ := os.ReadFile(out)
			if want := strings.ReplaceAll(tt.output, "ROOT", root); string(got) != want {
				t.Fatalf("console:\n%s\nwant:\n%s", got, want)
			}
		})
	}
}

func TestRunCancelKillsProgram(t *testing.T) {
	root := shellRoot(t, "exec sleep 600", nil)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	res := Run(ctx, Config{Root: root, CmdlinePath: os.DevNull})
	if res != (Result{Code: 137, Signal: 9}) {
		t.Fatalf("Run = %+v, want the program killed by SIGKILL", res)
	}
}

func TestRunRefusesMountsOutsideRoot(t *testing.T) {
	res := Run(context.Background(), Config{Root: t.TempDir(), CmdlinePath: os.DevNull, MountFilesystems: true})
	if errcode.CodeOf(res.Err) != errcode.InitFatal || res.Code != -1 {
		t.Fatalf("Run = %+v, want a fatal E304", res)
	}
}

// TestBootPrintsThenHalts checks the order PID 1 depends on: the status
// line is on the console before Halt, and Boot does not return.
func TestBootPrintsThenHalts(t *testing.T) {
	tests := []struct {
		name   string
		root   func(t *testing.T) string
		prefix string
	}{
		{"exit status", func(t *testing.T) string { return shellRoot(t, "exit 7", nil) }, "hyphae-init: exit code=7"},
		{"fatal", func(t *testing.T) string { return t.TempDir() }, "hyphae-init: fatal E304: cannot read /etc/hyphae/entrypoint: "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out := filepath.Join(t.TempDir(), "console")
			console, err := os.Create(out)
			if err != nil {
				t.Fatal(err)
			}
			defer console.Close()
			halted := make(chan string, 1)
			returned := make(chan struct{})
			go func() {
				defer close(returned)
				Boot(context.Background(), Config{Root: tt.root(t), CmdlinePath: os.DevNull, Stdout: console, Stderr: console,
					Halt: func() {
						b, _ := os.ReadFile(out)
						halted <- string(b)
						runtime.Goexit() // ends the goroutine the way reboot ends PID 1
					}})
				t.Error("Boot returned")
			}()
			<-returned
			select {
			case got := <-halted:
				if !strings.HasPrefix(got, tt.prefix) || !strings.HasSuffix(got, "\n") || strings.Count(got, "\n") != 1 {
					t.Fatalf("console at halt = %q, want one line starting %q", got, tt.prefix)
				}
			default:
				t.Fatal("Halt was not called")
			}
		})
	}
}
