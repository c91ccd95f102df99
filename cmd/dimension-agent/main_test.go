package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/hyphae-run/hyphae/guest"
	"github.com/hyphae-run/hyphae/guestbin"
	"github.com/hyphae-run/hyphae/internal/testenv"
	"github.com/hyphae-run/hyphae/protocol"
	"github.com/hyphae-run/hyphae/protocol/pb"
)

// The static binary, as hyphae-init would start it, serves a request over a
// serial line (a pty here) and runs the entrypoint from the image files.
func TestStaticAgentOverSerial(t *testing.T) {
	dir := testenv.GuestBinaries(t, guestbin.Agent)
	bin := filepath.Join(dir, guestbin.Agent)
	if err := guestbin.CheckStatic(bin); err != nil {
		t.Fatal(err)
	}

	root := t.TempDir()
	ep, _ := guest.EncodeEntrypoint([]string{"/bin/sh", "-c", `echo "warming up" >&2; cat; exit 7`})
	os.MkdirAll(filepath.Join(root, guest.ConfigDir), 0o755)
	os.WriteFile(filepath.Join(root, guest.EntrypointPath), ep, 0o644)

	master, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		testenv.Unavailable(t, "no /dev/ptmx")
	}
	defer master.Close()
	rc, _ := master.SyscallConn()
	var n int
	rc.Control(func(fd uintptr) {
		unix.IoctlSetPointerInt(int(fd), unix.TIOCSPTLCK, 0)
		n, err = unix.IoctlGetInt(int(fd), unix.TIOCGPTN)
	})
	if err != nil {
		t.Fatal(err)
	}
	sockDir, _ := os.MkdirTemp("", "agc")
	defer os.RemoveAll(sockDir)

	cmd := exec.Command(bin, "-channel", "serial:/dev/pts/"+strconv.Itoa(n), "-root", root)
	cmd.Env = append(os.Environ(), "DIMENSION_EVENTS_SOCK="+filepath.Join(sockDir, "ev.sock"))
	cmd.Stderr = t.Output()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w, r := protocol.NewWriter(master), protocol.NewReader(master)
	if ready, err := r.ReadEnvelope(); err != nil || !protocol.IsEmpty(ready) {
		cmd.Process.Kill()
		t.Fatalf("first frame %v, %v; want the empty readiness frame", ready, err)
	}
	if err := w.WriteEnvelope(&pb.Envelope{RequestId: "x", Payload: &pb.Envelope_Request{Request: &pb.Request{Payload: []byte(`{"k":"v"}`)}}}); err != nil {
		t.Fatal(err)
	}
	var stderr, stdout string
	var done *pb.Done
	for done == nil {
		env, err := r.ReadEnvelope()
		if err != nil {
			cmd.Process.Kill()
			t.Fatal(err)
		}
		switch o := env.GetOutbound(); o.GetKind() {
		case "stderr":
			stderr = string(o.GetBody())
		case "stdout-final":
			stdout = string(o.GetBody())
		}
		done = env.GetDone()
	}
	err = cmd.Wait()
	if stderr != "warming up" || stdout != `{"k":"v"}` || done.GetExitCode() != 7 {
		t.Fatalf("stderr %q stdout %q done %v", stderr, stdout, done)
	}
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 7 {
		t.Fatalf("agent exit: %v, want code 7", err)
	}
}
