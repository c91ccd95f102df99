package events

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/internal/testenv"
)

// startNATSServer runs a real nats-server process with JetStream on a
// free loopback port and returns its URL; the process is stopped at the
// end of the test.
func startNATSServer(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("nats-server")
	if err != nil {
		if _, serr := os.Stat("/usr/sbin/nats-server"); serr != nil {
			testenv.Unavailable(t, "nats-server not installed (apt-get install nats-server)")
		}
		bin = "/usr/sbin/nats-server"
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	_ = ln.Close()
	var out bytes.Buffer
	cmd := exec.Command(bin, "-js", "-a", "127.0.0.1", "-p", fmt.Sprint(port), "-sd", filepath.Join(t.TempDir(), "js"))
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting nats-server: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	url := fmt.Sprintf("nats://127.0.0.1:%d", port)
	deadline := time.Now().Add(hangGuard)
	for {
		nc, err := nats.Connect(url, nats.Timeout(time.Second))
		if err == nil {
			nc.Close()
			return url
		}
		if time.Now().After(deadline) {
			t.Fatalf("nats-server did not accept connections: %v\n%s", err, out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestExternalServer covers the DIMENSION_NATS_URL path against a real
// nats-server process, including two writers on one run, which only an
// external server (shared by two Logs) makes possible.
func TestExternalServer(t *testing.T) {
	url := startNATSServer(t)
	open := func() *Log {
		l, err := Open(testCtx(t), Options{URL: url, MaxAge: 2 * time.Hour, MaxBytes: 32 << 20})
		if err != nil {
			t.Fatalf("Open(%s): %v", url, err)
		}
		t.Cleanup(func() { _ = l.Close() })
		return l
	}
	a, b := open(), open()
	info, err := a.StreamInfo(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if info.Config.MaxAge != 2*time.Hour || info.Config.MaxBytes != 32<<20 {
		t.Errorf("stream config on the external server: %+v", info.Config)
	}

	run := "ext"
	live := subscribe(t, b, run, 0)
	writeRun(t, a, run, 5, false)
	// b becomes a second writer of the run: it loads the counter from the
	// stream and appends 6; a's cached counter is now stale.
	if seq := mustAppend(t, b, bundleEvent(run, 6)); seq != 6 {
		t.Fatalf("second writer's seq = %d, want 6", seq)
	}
	if _, err := a.Append(testCtx(t), bundleEvent(run, 6)); !errcode.HasCode(err, errcode.Conflict) {
		t.Fatalf("stale writer: %v, want %s", err, errcode.Conflict)
	}
	if seq := mustAppend(t, a, bundleEvent(run, 7)); seq != 7 {
		t.Fatalf("seq after reload = %d, want 7", seq)
	}
	mustAppend(t, a, completedEvent(run))

	checkSeqs(t, collect(t, live), 1, 8)
	checkSeqs(t, collect(t, subscribe(t, a, run, 3)), 4, 8)
}

func TestExternalServerUnreachable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	url := "nats://" + ln.Addr().String()
	_ = ln.Close() // nothing listens there now
	_, err = Open(testCtx(t), Options{URL: url})
	if !errcode.HasCode(err, errcode.EventLogFailed) {
		t.Fatalf("Open(%s): %v, want %s", url, err, errcode.EventLogFailed)
	}
}

// Credentials in the URLs (a password, a token) stay out of Open's error,
// which the gateway prints and logs.
func TestExternalServerErrorHidesCredentials(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close() // nothing listens there now
	_, err = Open(testCtx(t), Options{URL: "nats://tok-secret@" + addr + ",nats://u:pw-secret@" + addr})
	if !errcode.HasCode(err, errcode.EventLogFailed) {
		t.Fatalf("Open: %v, want %s", err, errcode.EventLogFailed)
	}
	if msg := err.Error(); strings.Contains(msg, "secret") || !strings.Contains(msg, addr) {
		t.Fatalf("Open's error shows credentials or lacks the address: %s", msg)
	}
}
