package runner

import (
	"context"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/hyphae-run/hyphae/dimension/store"
)

// Mock mode end to end: the real dimension-agent binary, as a host
// process on a socketpair, runs examples/echo-go unpacked from its real
// image; every event says mock=true. Teardown leaves only the unpacked
// image, which Close removes.
func TestMockBackend(t *testing.T) {
	imgs := buildImages(t)
	work := t.TempDir()
	mb, err := NewMockBackend(MockOptions{AgentBinary: filepath.Join(imgs.libexec, "dimension-agent"), WorkDir: work, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	e := newEnv(t)
	r := e.runner(t, mb, 4)
	if !r.Mock() {
		t.Fatal("Mock() is false")
	}

	t.Run("echo", func(t *testing.T) {
		e.image = imgs.echo
		req := e.request(t, `{"msg":"hi","exit_code":3}`)
		out := r.Run(t.Context(), nil, req)
		if out.Status != StatusFailed || out.ExitCode != 3 || out.Reason != "exit_code" || string(out.Stdout) != `{"msg":"hi","exit_code":3}` {
			t.Fatalf("outcome %+v", out)
		}
		evs := e.events(t, req.RunID)
		kinds := map[string]int{}
		for _, ev := range evs {
			if ev.Attrs[AttrMock] != "true" {
				t.Fatalf("event without mock=true: %s %+v", label(ev), ev.Attrs)
			}
			kinds[label(ev)]++
		}
		want := map[string]int{"state:started": 1, "state:payload_delivered": 1, "progress": 3, "result": 1, "stderr": 1,
			"stdout-final": 1, "state:process_exited": 1, "state:completed": 1}
		if !reflect.DeepEqual(kinds, want) {
			t.Fatalf("events %v", labels(evs))
		}
		if !strings.Contains(string(evs[0].Body), `"mock":true`) || evs[0].Attrs[AttrVMM] != "mock" {
			t.Fatalf("started %s %v", evs[0].Body, evs[0].Attrs)
		}
		if inv := e.invocation(t, req.RunID); inv.Status != store.StatusFailed || *inv.ExitCode != 3 {
			t.Fatalf("invocation %+v", inv)
		}
	})

	t.Run("stop", func(t *testing.T) {
		e.image = imgs.sleeper
		req := e.request(t, `{}`)
		res := make(chan Outcome, 1)
		go func() { res <- r.Run(context.Background(), nil, req) }()
		waitForKind(t, e, req.RunID, "sleeping")
		if err := r.Stop(req.RunID); err != nil {
			t.Fatal(err)
		}
		out := <-res
		if out.Status != StatusStopped || out.ExitCode != 42 {
			t.Fatalf("outcome %+v", out)
		}
	})

	t.Run("timeout", func(t *testing.T) {
		e.image = imgs.sleeper
		req := e.request(t, `{}`)
		req.ProcessingTimeout = 500 * time.Millisecond
		if out := r.Run(t.Context(), nil, req); out.Status != StatusTimedOut || out.Reason != "processing_timeout" {
			t.Fatalf("outcome %+v", out)
		}
	})

	t.Run("entrypoint override", func(t *testing.T) {
		e.image = imgs.echo
		req := e.request(t, `{"msg":"over"}`)
		req.Manifest.Entrypoint = []string{"/app/echo-go", "ignored-arg"}
		if out := r.Run(t.Context(), nil, req); out.Status != StatusCompleted || string(out.Stdout) != `{"msg":"over"}` {
			t.Fatalf("outcome %+v", out)
		}
	})

	t.Run("not an image", func(t *testing.T) {
		e.image = filepath.Join(t.TempDir(), "junk.ext4")
		os.WriteFile(e.image, []byte("junk"), 0o644)
		req := e.request(t, `{}`)
		if out := r.Run(t.Context(), nil, req); out.Status != StatusFailed || out.Reason != "boot_failed" || out.Err == nil {
			t.Fatalf("outcome %+v", out)
		}
	})

	// Each run's directory is gone; the two unpacked images remain until
	// Close.
	left, _ := filepath.Glob(filepath.Join(work, "*"))
	if len(left) != 2 || !strings.HasPrefix(filepath.Base(left[0]), "image-") || !strings.HasPrefix(filepath.Base(left[1]), "image-") {
		t.Fatalf("work dir holds %v after the runs", left)
	}
	if err := mb.Close(); err != nil {
		t.Fatal(err)
	}
	if left, _ := filepath.Glob(filepath.Join(work, "*")); len(left) != 0 {
		t.Fatalf("work dir holds %v after Close", left)
	}
}
