package guestinit

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/hyphae-run/hyphae/guest"
	"github.com/hyphae-run/hyphae/guestbin"
	"github.com/hyphae-run/hyphae/internal/testenv"
	"github.com/hyphae-run/hyphae/internal/testenv/pid1"
)

// The namespace harness (package pid1) boots the real, static hyphae-init
// as PID 1 of a fresh PID and mount namespace, chrooted into a root
// directory built like an image, with the static probe program
// (testdata/probe) as entrypoint.

// testImage describes the root directory a boot runs in.
type testImage struct {
	entrypoint []string // nil: no /etc/hyphae/entrypoint
	env        string   // /etc/hyphae/env, "" for none
	workdir    string   // /etc/hyphae/workdir, "" for none
	agent      bool     // install the probe as /sbin/dimension-agent
}

type harness struct {
	init, probe string
}

func newHarness(t *testing.T) harness {
	t.Helper()
	pid1.Requires(t)
	testenv.GuestBinaries(t, guestbin.Init)
	init, err := guestbin.Locate(guestbin.Init)
	if err != nil {
		t.Fatal(err)
	}
	probe := filepath.Join(t.TempDir(), "probe")
	cmd := exec.Command("go", "build", "-trimpath", "-o", probe, "./testdata/probe")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building the probe: %v\n%s", err, out)
	}
	return harness{init: init, probe: probe}
}

// root builds the image directory.
func (h harness) root(t *testing.T, img testImage) string {
	t.Helper()
	root := t.TempDir()
	for _, d := range []string{"sbin", "bin", "etc/hyphae", "app/sub", "dev", "proc", "sys", "run", "tmp"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	copyFile(t, h.init, filepath.Join(root, guest.InitPath))
	copyFile(t, h.probe, filepath.Join(root, "bin/probe"))
	if img.agent {
		copyFile(t, h.probe, filepath.Join(root, guest.AgentPath))
	}
	if img.entrypoint != nil {
		writeFile(t, filepath.Join(root, guest.EntrypointPath), entrypoint(t, img.entrypoint...))
	}
	if img.env != "" {
		writeFile(t, filepath.Join(root, guest.EnvPath), img.env)
	}
	if img.workdir != "" {
		writeFile(t, filepath.Join(root, guest.WorkdirPath), img.workdir+"\n")
	}
	return root
}

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, 0o755); err != nil {
		t.Fatal(err)
	}
}

func writeFile(t *testing.T, p, content string) {
	t.Helper()
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestPID1InNamespace(t *testing.T) {
	h := newHarness(t)
	report := []string{"/bin/probe", "report"}
	tests := []struct {
		name    string
		img     testImage
		cmdline string
		// signalOn sends sig (default SIGTERM) to init when this line
		// appears.
		signalOn string
		sig      syscall.Signal
		want     []string
		status   guest.Status
		// fatal is a substring of the fatal message, for fatal boots.
		fatal string
		check func(t *testing.T, root string)
	}{
		{
			name:    "mounts, env precedence, workdir, stdin",
			img:     testImage{entrypoint: report, env: "A=file\nB=file\nHOME=/app\n", workdir: "/app/sub"},
			cmdline: "console=ttyS0 reboot=k hyphae.env.B=from%20cmdline hyphae.env.C=c panic=-1",
			want: []string{
				"probe: env.A=file", "probe: env.B=from cmdline", "probe: env.C=c",
				"probe: env.HOME=/app", "probe: env.TERM=linux",
				"probe: env.PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
				"probe: cwd=/app/sub", "probe: ppid=1", "probe: stdin.rdev=1:3", "probe: stdin.read=0 EOF",
				"probe: mount=/dev devtmpfs", "probe: mount=/proc proc", "probe: mount=/sys sysfs",
				"probe: mount=/sys/fs/cgroup cgroup2", "probe: mount=/run tmpfs", "probe: mount=/tmp tmpfs",
			},
			status: guest.Status{ExitCode: 0},
		},
		{
			name:   "init mounts proc itself; no command line env",
			img:    testImage{entrypoint: report, env: "B=file\n"},
			want:   []string{"probe: env.B=file", "probe: env.C=<unset>", "probe: cwd=/", "probe: mount=/proc proc"},
			status: guest.Status{ExitCode: 0},
		},
		{
			name:    "resolv.conf from hyphae.dns",
			img:     testImage{entrypoint: report},
			cmdline: "hyphae.dns=192.0.2.53,2001:db8::35,bogus",
			want:    []string{"probe: resolv=nameserver 192.0.2.53;nameserver 2001:db8::35;"},
			status:  guest.Status{ExitCode: 0},
		},
		{
			name:   "resolv.conf untouched without hyphae.dns",
			img:    testImage{entrypoint: report},
			want:   []string{"probe: resolv=<none>"},
			status: guest.Status{ExitCode: 0},
		},
		{name: "exit 3", img: testImage{entrypoint: []string{"/bin/probe", "exit", "3"}}, status: guest.Status{ExitCode: 3}},
		{name: "killed by SIGKILL", img: testImage{entrypoint: []string{"/bin/probe", "kill9"}}, status: guest.Status{ExitCode: 137, Signal: 9}},
		{
			name:   "orphans reaped",
			img:    testImage{entrypoint: []string{"probe", "orphans", "5"}},
			want:   []string{"probe: orphans.reaped=5"},
			status: guest.Status{ExitCode: 0},
		},
		{
			name:     "SIGTERM forwarded",
			img:      testImage{entrypoint: []string{"/bin/probe", "trap"}},
			signalOn: "probe: ready=1",
			want:     []string{"probe: signal=terminated"},
			status:   guest.Status{ExitCode: 0},
		},
		{
			// Ctrl-Alt-Del reaches PID 1 as SIGINT; the program hears SIGTERM.
			name:     "SIGINT forwarded as SIGTERM",
			img:      testImage{entrypoint: []string{"/bin/probe", "trap"}},
			signalOn: "probe: ready=1",
			sig:      syscall.SIGINT,
			want:     []string{"probe: signal=terminated"},
			status:   guest.Status{ExitCode: 0},
		},
		{
			name:    "agent runs instead of the entrypoint",
			img:     testImage{entrypoint: report, env: "A=file\n", workdir: "/app", agent: true},
			cmdline: "hyphae.env.A=cmdline",
			want:    []string{"probe: agent.entrypoint=/bin/probe report", "probe: agent.env.A=cmdline", "probe: agent.cwd=/app"},
			status:  guest.Status{ExitCode: 0},
		},
		{name: "missing entrypoint", img: testImage{}, fatal: "E304: cannot read /etc/hyphae/entrypoint"},
		{name: "program not found", img: testImage{entrypoint: []string{"nosuch"}}, fatal: `E304: program "nosuch" not found in PATH=`},
		{name: "bad overlay", img: testImage{entrypoint: report}, cmdline: "hyphae.overlay=bogus", fatal: "E304: hyphae.overlay=bogus: want tmpfs or a block device path"},
		{
			name:    "tmpfs overlay root",
			img:     testImage{entrypoint: []string{"/bin/probe", "write-root"}},
			cmdline: "hyphae.overlay=tmpfs hyphae.env.A=1",
			want: []string{"probe: readback=written in the guest", "probe: mount=/ overlay", "probe: mount=/proc proc",
				"probe: mount=/dev devtmpfs", "probe: mount=/run tmpfs", "probe: mount=/tmp tmpfs"},
			status: guest.Status{ExitCode: 0},
			check: func(t *testing.T, root string) {
				if _, err := os.Stat(filepath.Join(root, "overlay-probe")); !errors.Is(err, os.ErrNotExist) {
					t.Fatalf("the write reached the lower root: stat = %v", err)
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := h.root(t, tt.img)
			signalled := false
			res := pid1.Boot(t, root, pid1.Options{Cmdline: tt.cmdline, OnLine: func(line string, initPid int) {
				if tt.signalOn != "" && line == tt.signalOn && !signalled {
					signalled = true
					sig := tt.sig
					if sig == 0 {
						sig = syscall.SIGTERM
					}
					if err := syscall.Kill(initPid, sig); err != nil {
						t.Errorf("%v to init %d: %v", sig, initPid, err)
					}
				}
			}})
			console := strings.Join(res.Lines, "\n")
			for _, w := range tt.want {
				if !res.Has(w) {
					t.Errorf("console lacks %q", w)
				}
			}
			st := res.Status(t)
			switch {
			case tt.fatal != "":
				if st.ExitCode != -1 || !strings.Contains(st.Fatal, tt.fatal) {
					t.Errorf("status %+v, want a fatal line containing %q", st, tt.fatal)
				}
			case st != tt.status:
				t.Errorf("status %+v, want %+v", st, tt.status)
			}
			if !res.EndedByReboot() {
				t.Errorf("namespace ended with %v, want init killed by reboot(2) (SIGHUP)", res.State)
			}
			if tt.check != nil {
				tt.check(t, root)
			}
			if t.Failed() {
				t.Logf("console:\n%s\nstderr:\n%s", console, res.Stderr)
			}
		})
	}
}

// TestRefusesWhenNotPID1 runs the binary by hand.
func TestRefusesWhenNotPID1(t *testing.T) {
	testenv.GuestBinaries(t, guestbin.Init)
	init, err := guestbin.Locate(guestbin.Init)
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd := exec.Command(init)
	cmd.Stderr = &stderr
	err = cmd.Run()
	var exitErr *exec.ExitError
	if !errors.As(err, &exitErr) || exitErr.ExitCode() != 2 {
		t.Fatalf("run by hand: %v, want exit status 2", err)
	}
	if !strings.Contains(stderr.String(), "refusing to run as pid") {
		t.Fatalf("stderr = %q, want a refusal", stderr.String())
	}
}

// TestDeviceOverlayPersists boots twice with hyphae.overlay on a real ext4
// block device (a loop device): the first boot's write lands on the device,
// not in the lower root, and the second boot sees it.
func TestDeviceOverlayPersists(t *testing.T) {
	h := newHarness(t)
	mkfs := testenv.RequiresTool(t, "mkfs.ext4")
	losetup := testenv.RequiresTool(t, "losetup")
	debugfs := testenv.RequiresTool(t, "debugfs")

	img := filepath.Join(t.TempDir(), "upper.ext4")
	if err := os.WriteFile(img, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 64<<20); err != nil {
		t.Fatal(err)
	}
	// No journal: after init's sync() every block is where debugfs,
	// which does not replay a journal, will look for it.
	if out, err := exec.Command(mkfs, "-q", "-F", "-O", "^has_journal", img).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	out, err := exec.Command(losetup, "--find", "--show", img).CombinedOutput()
	if err != nil {
		testenv.Unavailable(t, fmt.Sprintf("no loop device: %v: %s", err, out))
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { _ = exec.Command(losetup, "-d", dev).Run() })

	cmdline := "hyphae.overlay=" + dev
	for _, step := range []struct {
		mode string
		want []string
	}{
		{"write-root", []string{"probe: readback=written in the guest", "probe: mount=/ overlay", "probe: mount=/dev devtmpfs"}},
		{"read-root", []string{"probe: readback=written in the guest"}},
	} {
		root := h.root(t, testImage{entrypoint: []string{"/bin/probe", step.mode}})
		res := pid1.Boot(t, root, pid1.Options{Cmdline: cmdline})
		for _, w := range step.want {
			if !res.Has(w) {
				t.Errorf("%s: console lacks %q", step.mode, w)
			}
		}
		if st := res.Status(t); st != (guest.Status{ExitCode: 0}) {
			t.Errorf("%s: status %+v", step.mode, st)
		}
		if !res.EndedByReboot() {
			t.Errorf("%s: namespace ended with %v", step.mode, res.State)
		}
		if _, err := os.Stat(filepath.Join(root, "overlay-probe")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s: the write reached the lower root: stat = %v", step.mode, err)
		}
		if t.Failed() {
			t.Fatalf("console:\n%s\nstderr:\n%s", strings.Join(res.Lines, "\n"), res.Stderr)
		}
	}
	got, err := exec.Command(debugfs, "-R", "cat /hyphae-overlay/upper/overlay-probe", img).Output()
	if err != nil || string(got) != "written in the guest\n" {
		t.Fatalf("upper layer on the device holds %q, %v", got, err)
	}
}
