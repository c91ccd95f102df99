package runner

import (
	"context"
	"encoding/json"
	"errors"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hyphae-run/hyphae/dimension/events"
	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/errcode"
)

// A run appends started → payload_delivered → the bundle's events in
// order → stderr → stdout-final → process_exited → completed, updates its
// row, and tears down exactly once.
func TestRunEventSequence(t *testing.T) {
	e := newEnv(t)
	fb := &fakeBackend{t: t, mode: "echo"}
	r := e.runner(t, fb, 4)
	req := e.request(t, `{"msg":"hi"}`)
	out := r.Run(t.Context(), nil, req)
	if out.Status != StatusCompleted || out.ExitCode != 0 || string(out.Stdout) != `{"msg":"hi"}` || out.Err != nil {
		t.Fatalf("outcome %+v", out)
	}
	evs := e.events(t, req.RunID)
	// The events socket and the stderr pipe are separate streams, so a
	// stderr line may land between bundle events; each stream keeps its
	// own order, and stdout-final comes after both.
	got := labels(evs)
	if want := []string{"state:started", "state:payload_delivered"}; !reflect.DeepEqual(got[:2], want) {
		t.Fatalf("events %v", got)
	}
	if want := []string{"stdout-final", "state:process_exited", "state:completed"}; !reflect.DeepEqual(got[len(got)-3:], want) {
		t.Fatalf("events %v", got)
	}
	var bundleEvs []events.Event
	var stderr []string
	for _, ev := range evs[2 : len(evs)-3] {
		if ev.Kind == "stderr" {
			stderr = append(stderr, string(ev.Body))
		} else {
			bundleEvs = append(bundleEvs, ev)
		}
	}
	if got := labels(bundleEvs); !reflect.DeepEqual(got, []string{"progress", "progress", "progress", "result"}) {
		t.Fatalf("bundle events %v", got)
	}
	if !reflect.DeepEqual(stderr, []string{"echoed 12 bytes"}) {
		t.Fatalf("stderr %q", stderr)
	}
	stdoutFinal := evs[len(evs)-3]
	for i, ev := range bundleEvs[:3] {
		var b struct{ Step int }
		if json.Unmarshal(ev.Body, &b); b.Step != i+1 {
			t.Fatalf("progress %d body %s", i, ev.Body)
		}
	}
	for _, ev := range evs {
		if ev.RunID != req.RunID || ev.WorkerID != "w-test" || ev.BundleID != e.bnd.ID || ev.UserID != e.user.ID {
			t.Fatalf("event identity %+v", ev)
		}
		if _, ok := ev.Attrs[AttrMock]; ok {
			t.Fatalf("a VM run's event claims mock: %+v", ev)
		}
	}
	if evs[0].Attrs[AttrVMM] != "fake" || stateBody(evs[0])["processing_timeout_ms"].(float64) != 20000 {
		t.Fatalf("started %+v %s", evs[0].Attrs, evs[0].Body)
	}
	if res := bundleEvs[3]; res.Attrs["k"] != "v" || string(res.Body) != `{"msg":"hi"}` {
		t.Fatalf("result event %+v %s", res.Attrs, res.Body)
	}
	if string(stdoutFinal.Body) != `{"msg":"hi"}` || stdoutFinal.ContentType != "application/octet-stream" {
		t.Fatalf("stdout-final %q (%s)", stdoutFinal.Body, stdoutFinal.ContentType)
	}
	if pe := stateBody(evs[len(evs)-2]); pe["exit_code"].(float64) != 0 || pe["success"] != true {
		t.Fatalf("process_exited %v", pe)
	}
	c := completed(t, evs)
	if c["status"] != StatusCompleted || c["exit_code"].(float64) != 0 || c["duration_ms"].(float64) != float64(out.DurationMs) {
		t.Fatalf("completed %v (outcome %d ms)", c, out.DurationMs)
	}
	inv := e.invocation(t, req.RunID)
	if inv.Status != store.StatusCompleted || inv.ExitCode == nil || *inv.ExitCode != 0 || inv.WorkerID != "w-test" ||
		inv.StartedAt == nil || inv.CompletedAt == nil || inv.DurationMS == nil || *inv.DurationMS != out.DurationMs {
		t.Fatalf("invocation %+v", inv)
	}
	if s, c := fb.counts(); s != 1 || c != 1 {
		t.Fatalf("sessions started %d, closed %d", s, c)
	}
	if r.Running() != 0 {
		t.Fatalf("Running() = %d after the run", r.Running())
	}
}

// How each ending is reported: status, exit code, reason, row, teardown.
func TestRunEndings(t *testing.T) {
	tests := []struct {
		name     string
		fb       *fakeBackend
		payload  string
		tweak    func(*Request)
		status   string
		exit     int
		reason   string
		sequence []string // nil: not checked
		// errHas is what the outcome's error must say (what the backend
		// or the console printed); detail, the runner error event's
		// detail.
		errHas, detail string
	}{
		{name: "non-zero exit", fb: &fakeBackend{mode: "echo"}, payload: `{"exit_code":3}`, status: StatusFailed, exit: 3, reason: "exit_code"},
		{name: "processing timeout", fb: &fakeBackend{mode: "sleep"}, tweak: func(r *Request) { r.ProcessingTimeout = 500 * time.Millisecond },
			status: StatusTimedOut, exit: 42, reason: "processing_timeout",
			sequence: []string{"state:started", "state:payload_delivered", "sleeping", "stderr", "stdout-final", "state:process_exited", "state:completed"}},
		{name: "boot timeout", fb: &fakeBackend{boot: "hang"}, tweak: func(r *Request) { r.BootTimeout = 200 * time.Millisecond },
			status: StatusTimedOut, exit: -1, reason: "boot_timeout", sequence: []string{"state:started", "state:completed"}},
		{name: "boot failure", fb: &fakeBackend{boot: "fail"}, status: StatusFailed, exit: -1, reason: "boot_failed",
			sequence: []string{"state:started", "state:completed"}, errHas: "kernel panic"},
		{name: "garbage from the guest", fb: &fakeBackend{boot: "garbage"}, status: StatusFailed, exit: -1, reason: "channel_failed",
			sequence: []string{"state:started", "state:payload_delivered", "error", "state:completed"},
			errHas:   "the console ends:\nfake console", detail: "fake console"},
		{name: "agent error", fb: &fakeBackend{argv: []string{"/nonexistent/bundle"}}, status: StatusFailed, exit: -1, reason: "agent_error",
			sequence: []string{"state:started", "state:payload_delivered", "error", "state:process_exited", "state:completed"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			fb := tt.fb
			fb.t = t
			r := e.runner(t, fb, 2)
			payload := tt.payload
			if payload == "" {
				payload = "{}"
			}
			req := e.request(t, payload)
			if tt.tweak != nil {
				tt.tweak(&req)
			}
			out := r.Run(t.Context(), nil, req)
			if out.Status != tt.status || out.ExitCode != tt.exit || out.Reason != tt.reason {
				t.Fatalf("outcome %+v, want %s/%d/%s", out, tt.status, tt.exit, tt.reason)
			}
			if tt.errHas != "" && (out.Err == nil || !strings.Contains(out.Err.Error(), tt.errHas)) {
				t.Fatalf("outcome error %v does not say %q", out.Err, tt.errHas)
			}
			evs := e.events(t, req.RunID)
			if tt.sequence != nil && !reflect.DeepEqual(labels(evs), tt.sequence) {
				t.Fatalf("events %v\nwant %v", labels(evs), tt.sequence)
			}
			if tt.detail != "" {
				i := slices.IndexFunc(evs, func(ev events.Event) bool { return ev.Kind == KindError })
				var body struct{ Code, Detail string }
				if i < 0 || json.Unmarshal(evs[i].Body, &body) != nil || body.Code != tt.reason || body.Detail != tt.detail {
					t.Fatalf("error event of %v: %+v, want detail %q", labels(evs), body, tt.detail)
				}
			}
			c := completed(t, evs)
			if c["status"] != tt.status || c["exit_code"].(float64) != float64(tt.exit) {
				t.Fatalf("completed %v", c)
			}
			inv := e.invocation(t, req.RunID)
			if string(inv.Status) != tt.status || (tt.exit >= 0) != (inv.ExitCode != nil) {
				t.Fatalf("invocation %+v", inv)
			}
			if s, c := fb.counts(); s != c {
				t.Fatalf("sessions started %d, closed %d", s, c)
			}
			if r.Running() != 0 {
				t.Fatal("a run is still counted")
			}
		})
	}
}

// Stop (and cancelling Run's context) ends a run as stopped: the bundle
// gets SIGTERM through the agent and its exit is still reported.
func TestStop(t *testing.T) {
	for _, how := range []string{"Stop", "cancel"} {
		t.Run(how, func(t *testing.T) {
			e := newEnv(t)
			fb := &fakeBackend{t: t, mode: "sleep"}
			r := e.runner(t, fb, 2)
			req := e.request(t, "{}")
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			res := make(chan Outcome, 1)
			go func() { res <- r.Run(ctx, nil, req) }()
			waitForKind(t, e, req.RunID, "sleeping")
			if r.Running() != 1 {
				t.Fatalf("Running() = %d during the run", r.Running())
			}
			if how == "Stop" {
				if err := r.Stop(req.RunID); err != nil {
					t.Fatal(err)
				}
			} else {
				cancel()
			}
			out := <-res
			if out.Status != StatusStopped || out.ExitCode != 42 {
				t.Fatalf("outcome %+v", out)
			}
			evs := e.events(t, req.RunID)
			want := []string{"state:started", "state:payload_delivered", "sleeping", "stderr", "stdout-final", "state:process_exited", "state:completed"}
			if !reflect.DeepEqual(labels(evs), want) || string(evs[3].Body) != "got SIGTERM" {
				t.Fatalf("events %v", labels(evs))
			}
			if c := completed(t, evs); c["status"] != StatusStopped {
				t.Fatalf("completed %v", c)
			}
			if e.invocation(t, req.RunID).Status != store.StatusStopped {
				t.Fatal("row not stopped")
			}
			if s, c := fb.counts(); s != 1 || c != 1 {
				t.Fatalf("sessions started %d, closed %d", s, c)
			}
		})
	}
	e := newEnv(t)
	r := e.runner(t, &fakeBackend{t: t}, 1)
	if err := r.Stop("inv_nope"); !errcode.HasCode(err, errcode.NotFound) {
		t.Fatalf("Stop of an unknown run = %v", err)
	}
}

// waitForKind follows the run live until an event of kind arrives.
func waitForKind(t *testing.T, e *env, runID, kind string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	sub, err := e.log.Subscribe(ctx, runID, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	for ev := range sub.Events() {
		if ev.Kind == kind {
			return
		}
	}
	t.Fatalf("no %s event: %v", kind, sub.Err())
}

// Permits: Acquire never blocks, refuses at capacity with a coded error,
// and Run gives the permit back after teardown.
func TestCapacity(t *testing.T) {
	e := newEnv(t)
	r := e.runner(t, &fakeBackend{t: t, mode: "echo"}, 2)
	p1, err := r.Acquire()
	if err != nil {
		t.Fatal(err)
	}
	p2, err := r.Acquire()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.Acquire(); !errcode.HasCode(err, errcode.CapacityExceeded) || !errors.Is(err, ErrCapacity) {
		t.Fatalf("Acquire at capacity = %v", err)
	}
	// A run without a permit is refused at capacity, and says so.
	req := e.request(t, "{}")
	if out := r.Run(t.Context(), nil, req); out.Status != StatusFailed || out.Reason != "capacity_exceeded" || !errcode.HasCode(out.Err, errcode.CapacityExceeded) {
		t.Fatalf("Run without a permit at capacity = %+v", out)
	}
	if c := completed(t, e.events(t, req.RunID)); c["status"] != StatusFailed {
		t.Fatalf("refused run's completed %v", c)
	}
	if out := r.Run(t.Context(), p1, e.request(t, "{}")); out.Status != StatusCompleted {
		t.Fatalf("run = %+v", out)
	}
	p3, err := r.Acquire()
	if err != nil {
		t.Fatalf("Acquire after a run released its permit: %v", err)
	}
	p2.Release()
	p2.Release() // idempotent: must not free a second slot
	p3.Release()
	for range 2 {
		if _, err := r.Acquire(); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := r.Acquire(); !errcode.HasCode(err, errcode.CapacityExceeded) {
		t.Fatalf("a double Release freed an extra permit: %v", err)
	}
}

// A bundle that floods events gets every one appended, in order, while
// the channel stays bounded (the reader waits for the appender).
func TestFlood(t *testing.T) {
	const n = 10000
	e := newEnv(t)
	fb := &fakeBackend{t: t, mode: "flood", args: []string{strconv.Itoa(n)}}
	r := e.runner(t, fb, 1)
	req := e.request(t, "{}")
	if out := r.Run(t.Context(), nil, req); out.Status != StatusCompleted {
		t.Fatalf("outcome %+v", out)
	}
	evs := e.events(t, req.RunID)
	next := 0
	for _, ev := range evs {
		if ev.Kind != "tick" {
			continue
		}
		if string(ev.Body) != strconv.Itoa(next) {
			t.Fatalf("tick %d has body %s", next, ev.Body)
		}
		next++
	}
	if next != n {
		t.Fatalf("%d ticks appended, want %d", next, n)
	}
}

// The kind "state" belongs to the runner: the agent refuses it from a
// bundle (closing that connection), and the runner refuses it from a guest
// that is not the agent; either way an error event stands in its place
// and the run goes on.
func TestStateKindReserved(t *testing.T) {
	tests := []struct {
		name   string
		fb     *fakeBackend
		want   []string
		source string
	}{
		{"bundle", &fakeBackend{mode: "spoof"},
			[]string{"state:started", "state:payload_delivered", "error", "stdout-final", "state:process_exited", "state:completed"}, "agent"},
		{"guest", &fakeBackend{boot: "forger"},
			[]string{"state:started", "state:payload_delivered", "error", "ok", "state:process_exited", "state:completed"}, "runner"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			tt.fb.t = t
			r := e.runner(t, tt.fb, 1)
			req := e.request(t, "{}")
			if out := r.Run(t.Context(), nil, req); out.Status != StatusCompleted {
				t.Fatalf("outcome %+v", out)
			}
			evs := e.events(t, req.RunID)
			if tt.source == "agent" {
				// The bundle's next event may or may not make it, as the
				// client reconnects after the agent closed the connection.
				evs = slices.DeleteFunc(evs, func(ev events.Event) bool { return ev.Kind == "ok" })
			}
			if !reflect.DeepEqual(labels(evs), tt.want) {
				t.Fatalf("events %v\nwant %v", labels(evs), tt.want)
			}
			var body struct{ Code string }
			if json.Unmarshal(evs[2].Body, &body); evs[2].Attrs[AttrSource] != tt.source || body.Code != "event_rejected" {
				t.Fatalf("error event %+v %s", evs[2].Attrs, evs[2].Body)
			}
		})
	}
}

// A bundle may send events of kind "error", but the "source" attribute
// belongs to the agent's and the runner's own: the runner drops it, so a
// bundle's error cannot pass for theirs. Its other attributes stay.
func TestErrorSourceNotSpoofable(t *testing.T) {
	e := newEnv(t)
	r := e.runner(t, &fakeBackend{t: t, mode: "spoof-error"}, 1)
	req := e.request(t, "{}")
	if out := r.Run(t.Context(), nil, req); out.Status != StatusCompleted {
		t.Fatalf("outcome %+v", out)
	}
	evs := e.events(t, req.RunID)
	want := []string{"state:started", "state:payload_delivered", KindError, "stdout-final", "state:process_exited", "state:completed"}
	if !reflect.DeepEqual(labels(evs), want) {
		t.Fatalf("events %v\nwant %v", labels(evs), want)
	}
	if _, has := evs[2].Attrs[AttrSource]; has || evs[2].Attrs["k"] != "v" {
		t.Fatalf("the bundle's error event has attrs %v", evs[2].Attrs)
	}
}

// Drain refuses new runs, waits for running ones until its context ends,
// then stops them.
func TestDrain(t *testing.T) {
	e := newEnv(t)
	r := e.runner(t, &fakeBackend{t: t, mode: "sleep"}, 2)
	req := e.request(t, "{}")
	res := make(chan Outcome, 1)
	go func() { res <- r.Run(t.Context(), nil, req) }()
	waitForKind(t, e, req.RunID, "sleeping")
	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	r.Drain(ctx)
	if r.Running() != 0 {
		t.Fatal("Drain returned with a run in progress")
	}
	if out := <-res; out.Status != StatusStopped || out.Reason != "draining" {
		t.Fatalf("outcome %+v", out)
	}
	if _, err := r.Acquire(); !errcode.HasCode(err, errcode.Draining) {
		t.Fatalf("Acquire while draining = %v", err)
	}
}

// Bad requests and options are refused with coded errors.
func TestRefusals(t *testing.T) {
	e := newEnv(t)
	if _, err := New(Options{Events: e.log}); !errcode.HasCode(err, errcode.InvalidArgument) {
		t.Fatalf("New without a backend = %v", err)
	}
	fb := &fakeBackend{t: t, mode: "echo"}
	r := e.runner(t, fb, 1)
	if out := r.Run(t.Context(), nil, Request{RunID: "bad id!", ImagePath: e.image}); out.Status != StatusFailed || !errcode.HasCode(out.Err, errcode.InvalidArgument) {
		t.Fatalf("bad run id: %+v", out)
	}
	req := e.request(t, "{}")
	req.ImagePath = ""
	if out := r.Run(t.Context(), nil, req); out.Status != StatusFailed || out.Reason != "invalid_request" {
		t.Fatalf("no image: %+v", out)
	}
	if e.invocation(t, req.RunID).Status != store.StatusFailed {
		t.Fatal("refused run's row not failed")
	}
	if s, _ := fb.counts(); s != 0 {
		t.Fatal("a refused run started a sandbox")
	}
	if _, err := r.Acquire(); err != nil {
		t.Fatalf("refused runs kept their permits: %v", err)
	}
}

func TestResolveTimeouts(t *testing.T) {
	l := Limits{BootTimeout: 30 * time.Second, ProcessingTimeout: 300 * time.Second, MaxBootTimeout: 60 * time.Second, MaxProcessingTimeout: 600 * time.Second}
	tests := []struct {
		name       string
		req        Requested
		m          store.Manifest
		l          Limits
		boot, proc time.Duration
	}{
		{"server defaults", Requested{}, store.Manifest{}, l, 30 * time.Second, 300 * time.Second},
		{"zero limits take package defaults", Requested{}, store.Manifest{}, Limits{}, DefaultBootTimeout, DefaultProcessingTimeout},
		{"manifest", Requested{}, store.Manifest{BootTimeoutSecs: 5, ProcessingTimeoutSecs: 7}, l, 5 * time.Second, 7 * time.Second},
		{"request over manifest", Requested{BootSecs: 8, ProcessingSecs: 9}, store.Manifest{BootTimeoutSecs: 5, ProcessingTimeoutSecs: 7}, l, 8 * time.Second, 9 * time.Second},
		{"request boot only", Requested{BootSecs: 8}, store.Manifest{ProcessingTimeoutSecs: 7}, l, 8 * time.Second, 7 * time.Second},
		{"request processing only", Requested{ProcessingSecs: 9}, store.Manifest{BootTimeoutSecs: 5}, l, 5 * time.Second, 9 * time.Second},
		{"request over default", Requested{BootSecs: 45, ProcessingSecs: 500}, store.Manifest{}, l, 45 * time.Second, 500 * time.Second},
		{"request clamped", Requested{BootSecs: 1000, ProcessingSecs: 10000}, store.Manifest{BootTimeoutSecs: 5, ProcessingTimeoutSecs: 7}, l, 60 * time.Second, 600 * time.Second},
		{"huge request clamped", Requested{BootSecs: 1 << 40, ProcessingSecs: 1 << 40}, store.Manifest{}, l, 60 * time.Second, 600 * time.Second},
		{"manifest clamped", Requested{}, store.Manifest{BootTimeoutSecs: 1000, ProcessingTimeoutSecs: 10000}, l, 60 * time.Second, 600 * time.Second},
		{"default over its max", Requested{}, store.Manifest{}, Limits{BootTimeout: time.Hour, MaxBootTimeout: time.Minute}, time.Minute, DefaultProcessingTimeout},
		{"negative request ignored", Requested{BootSecs: -3, ProcessingSecs: -4}, store.Manifest{}, l, 30 * time.Second, 300 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, p := ResolveTimeouts(tt.req, tt.m, tt.l)
			if b != tt.boot || p != tt.proc {
				t.Fatalf("ResolveTimeouts = %s, %s; want %s, %s", b, p, tt.boot, tt.proc)
			}
		})
	}
}

// An event log that refuses everything must not hold the run: it still
// ends and tears down.
func TestEventLogDown(t *testing.T) {
	e := newEnv(t)
	fb := &fakeBackend{t: t, mode: "echo"}
	r, err := New(Options{Backend: fb, Events: failingSink{}, Store: e.st, WorkerID: "w", Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	req := e.request(t, "{}")
	if out := r.Run(t.Context(), nil, req); out.Status != StatusCompleted {
		t.Fatalf("outcome %+v", out)
	}
	if s, c := fb.counts(); s != 1 || c != 1 {
		t.Fatalf("sessions started %d, closed %d", s, c)
	}
	if e.invocation(t, req.RunID).Status != store.StatusCompleted {
		t.Fatal("row not completed")
	}
}

type failingSink struct{}

func (failingSink) Append(context.Context, events.Event) (uint64, error) {
	return 0, errcode.New(errcode.EventLogFailed, "nats is down")
}

// A client that sees `completed` live and then reads the invocation must
// find its final status: the row is written before the event.
func TestRowFinalWhenCompletedIsSeen(t *testing.T) {
	e := newEnv(t)
	r := e.runner(t, &fakeBackend{t: t, mode: "echo"}, 4)
	req := e.request(t, `{"msg":"row"}`)
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	sub, err := e.log.Subscribe(ctx, req.RunID, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	go r.Run(t.Context(), nil, req)
	for ev := range sub.Events() {
		if !ev.IsCompleted() {
			continue
		}
		if inv := e.invocation(t, req.RunID); inv.Status != store.StatusCompleted || inv.CompletedAt == nil {
			t.Fatalf("completed was streamed while the row says %q", inv.Status)
		}
		return
	}
	t.Fatalf("no completed event: %v", sub.Err())
}
