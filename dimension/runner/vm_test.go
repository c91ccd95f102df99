package runner

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/internal/testenv"
	"github.com/hyphae-run/hyphae/kernel/kerneltest"
	"github.com/hyphae-run/hyphae/vmm"
	"github.com/hyphae-run/hyphae/vmm/vmmproc"
)

// Real microVMs under QEMU (TCG here) with the Debian test kernel: a run
// of examples/echo-go gives the full event sequence and its stdout; a stop
// mid-run ends as stopped, a processing timeout as timed_out; afterwards
// no QEMU process and no runtime directory is left. Three boots.
func TestVMBackend(t *testing.T) {
	testenv.RequiresTool(t, "qemu-system-x86_64")
	testenv.RequiresTool(t, "qemu-img")
	kern := kerneltest.Path(t)
	imgs := buildImages(t)
	rtDir, err := os.MkdirTemp("", "rvm")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(rtDir)
	t.Setenv(vmmproc.EnvRuntimeDir, rtDir)

	vb, err := NewVMBackend(t.Context(), VMOptions{VMM: vmm.QEMU, Kernel: kern, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	e := newEnv(t)
	r := e.runner(t, vb, 2)
	r.opts.StopGrace = 2 * time.Second
	r.opts.VMStopTimeout = 10 * time.Second
	vmReq := func(t *testing.T, image, payload string) Request {
		e.image = image
		req := e.request(t, payload)
		req.BootTimeout, req.ProcessingTimeout = 60*time.Second, 60*time.Second
		return req
	}

	t.Run("echo", func(t *testing.T) {
		payload := `{"msg":"hello from the host","exit_code":0}`
		req := vmReq(t, imgs.echo, payload)
		out := r.Run(t.Context(), nil, req)
		if out.Status != StatusCompleted || out.ExitCode != 0 || string(out.Stdout) != payload {
			t.Fatalf("outcome %+v", out)
		}
		evs := e.events(t, req.RunID)
		got := labels(evs)
		var bundle, stderr []string
		for _, l := range got[2 : len(got)-3] {
			if l == "stderr" {
				stderr = append(stderr, l)
			} else {
				bundle = append(bundle, l)
			}
		}
		if !reflect.DeepEqual(got[:2], []string{"state:started", "state:payload_delivered"}) ||
			!reflect.DeepEqual(got[len(got)-3:], []string{"stdout-final", "state:process_exited", "state:completed"}) ||
			!reflect.DeepEqual(bundle, []string{"progress", "progress", "progress", "result"}) || len(stderr) != 1 {
			t.Fatalf("events %v", got)
		}
		var res struct {
			Echo map[string]any `json:"echo"`
		}
		for _, ev := range evs {
			if ev.Kind == "result" {
				if err := json.Unmarshal(ev.Body, &res); err != nil || res.Echo["msg"] != "hello from the host" || ev.Attrs["lang"] != "go" {
					t.Fatalf("result %s %v (%v)", ev.Body, ev.Attrs, err)
				}
			}
		}
		if evs[0].Attrs[AttrVMM] != vmm.QEMU {
			t.Fatalf("started attrs %v", evs[0].Attrs)
		}
		if inv := e.invocation(t, req.RunID); inv.Status != store.StatusCompleted || *inv.ExitCode != 0 {
			t.Fatalf("invocation %+v", inv)
		}
	})

	t.Run("stop", func(t *testing.T) {
		req := vmReq(t, imgs.sleeper, `{}`)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		var out Outcome
		go func() { out = r.Run(ctx, nil, req); close(done) }()
		// A failing assertion must not leave the VM running past the test.
		t.Cleanup(func() { cancel(); <-done })
		waitForKind(t, e, req.RunID, "sleeping")
		if err := r.Stop(req.RunID); err != nil {
			t.Fatal(err)
		}
		<-done
		if out.Status != StatusStopped || out.ExitCode != 42 {
			t.Fatalf("outcome %+v", out)
		}
		if c := completed(t, e.events(t, req.RunID)); c["status"] != StatusStopped {
			t.Fatalf("completed %v", c)
		}
	})

	t.Run("timeout", func(t *testing.T) {
		req := vmReq(t, imgs.sleeper, `{}`)
		req.ProcessingTimeout = 3 * time.Second
		out := r.Run(t.Context(), nil, req)
		if out.Status != StatusTimedOut || out.Reason != "processing_timeout" {
			t.Fatalf("outcome %+v", out)
		}
		if inv := e.invocation(t, req.RunID); inv.Status != store.StatusTimedOut {
			t.Fatalf("invocation %+v", inv)
		}
	})

	if left, _ := filepath.Glob(filepath.Join(rtDir, "run-*")); len(left) != 0 {
		t.Fatalf("runtime dirs left: %v", left)
	}
	if pids := qemuUnder(rtDir); len(pids) != 0 {
		t.Fatalf("qemu processes left: %v", pids)
	}
	if r.Running() != 0 {
		t.Fatalf("Running() = %d", r.Running())
	}
}

// qemuUnder lists the QEMU processes whose command line names dir.
func qemuUnder(dir string) []string {
	var out []string
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err == nil && strings.Contains(string(b), "qemu-system") && strings.Contains(string(b), dir) {
			out = append(out, p)
		}
	}
	return out
}
