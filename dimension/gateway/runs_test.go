package gateway

import (
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hyphae-run/hyphae/dimension/events"
	"github.com/hyphae-run/hyphae/dimension/runner"
	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/protocol"
	"github.com/hyphae-run/hyphae/protocol/pb"
)

func TestSyncRun(t *testing.T) {
	e := newEnv(t, envOptions{})
	u, key := e.newUser("gina")
	e.seedBundle(u.ID, "echo", fx.echoDigest, store.Manifest{})

	tests := []struct {
		name     string
		payload  string
		status   string
		exitCode int
	}{
		{"exit 0", `{"msg":"hi <there> & you"}`, runner.StatusCompleted, 0},
		{"exit 3", `{"msg":"bye","exit_code":3}`, runner.StatusFailed, 3},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var res runResult
			e.do("POST", "/run", key, `{"bundle_id":"echo:latest","mode":"sync","payload":`+tt.payload+`}`).ok(t, http.StatusOK, &res)
			if res.Stdout != tt.payload || res.ExitCode != tt.exitCode || res.Status != tt.status {
				t.Fatalf("result %+v", res)
			}
			if res.EventsURL != "/runs/"+res.InvocationID+"/events" {
				t.Fatalf("events_url %q", res.EventsURL)
			}
			var inv invocationView
			e.do("GET", "/invocations/"+res.InvocationID, key, nil).ok(t, http.StatusOK, &inv)
			if string(inv.Status) != tt.status || inv.ExitCode == nil || *inv.ExitCode != tt.exitCode ||
				inv.Mode != store.ModeSync || inv.BundleRef != "echo:latest" || inv.Owner != u.ID || inv.WorkerID != "test-worker" {
				t.Fatalf("invocation %+v", inv)
			}
			// The run's stream is complete and replays in full.
			evs := e.openStream(key, res.InvocationID, "").rest(t)
			if c := completedOf(t, evs); c.Status != tt.status || c.ExitCode != tt.exitCode {
				t.Fatalf("completed %+v", c)
			}
		})
	}
	// mode defaults to sync; the payload defaults to null, which echo-go
	// echoes.
	var res runResult
	e.do("POST", "/run", key, map[string]string{"bundle_id": "echo"}).ok(t, http.StatusOK, &res)
	if res.Stdout != "null" || res.ExitCode != 0 {
		t.Fatalf("default run %+v", res)
	}
}

// An async run's stream: state events, the bundle's events, stderr,
// stdout-final, process_exited, completed, in that order, ids 1..n, each
// data object carrying the run's identity; and the mock flag.
func TestAsyncRunEvents(t *testing.T) {
	e := newEnv(t, envOptions{})
	u, key := e.newUser("hank")
	b := e.seedBundle(u.ID, "echo", fx.echoDigest, store.Manifest{})
	id := e.startRun(key, "echo", map[string]string{"msg": "async"})
	evs := e.openStream(key, id, "").rest(t)

	// The bundle's events and its stderr travel on different channels
	// (the events socket, the stderr pipe), so the agent relays each in
	// order but may interleave the two; everything else is fixed.
	got := kindsOf(evs)
	var bundleEvents, rest []string
	for _, k := range got {
		if k == "progress" || k == "result" {
			bundleEvents = append(bundleEvents, k)
		} else {
			rest = append(rest, k)
		}
	}
	if !reflect.DeepEqual(bundleEvents, []string{"progress", "progress", "progress", "result"}) ||
		!reflect.DeepEqual(rest, []string{"state:started", "state:payload_delivered", "stderr", "stdout-final", "state:process_exited", "state:completed"}) ||
		got[0] != "state:started" || got[1] != "state:payload_delivered" {
		t.Fatalf("events %v", got)
	}
	byKind := map[string]events.Event{}
	for _, ev := range evs {
		byKind[ev.Kind] = ev
	}
	for i, ev := range evs {
		if ev.Seq != uint64(i+1) || ev.RunID != id || ev.UserID != u.ID || ev.BundleID != b.ID || ev.WorkerID != "test-worker" {
			t.Fatalf("event %d: %+v", i, ev)
		}
		if ev.Attrs[runner.AttrMock] != "true" {
			t.Fatalf("event %d (%s) is not flagged mock: %v", i, ev.Kind, ev.Attrs)
		}
	}
	var result struct {
		Echo map[string]string `json:"echo"`
	}
	if err := json.Unmarshal(byKind["result"].Body, &result); err != nil || result.Echo["msg"] != "async" {
		t.Fatalf("result body %s", byKind["result"].Body)
	}
	if string(byKind["stdout-final"].Body) != `{"msg":"async"}` {
		t.Fatalf("stdout-final %q", byKind["stdout-final"].Body)
	}
	if !strings.HasPrefix(string(byKind["stderr"].Body), "echo-go: echoed") {
		t.Fatalf("stderr %q", byKind["stderr"].Body)
	}
	if c := completedOf(t, evs); c.Status != runner.StatusCompleted || c.ExitCode != 0 {
		t.Fatalf("completed %+v", c)
	}
	inv := e.finalInvocation(key, id)
	if inv.Status != store.StatusCompleted || inv.Mode != store.ModeAsync || inv.DurationMS == nil {
		t.Fatalf("invocation %+v", inv)
	}
	// ?from_seq= resumes like Last-Event-ID.
	r := e.do("GET", "/runs/"+id+"/events?from_seq=abc", key, nil)
	r.apiError(t, http.StatusUnprocessableEntity, CodeValidation)
}

// A reader that reconnects with Last-Event-ID while the run is still going
// gets exactly the events after that id: no gap, no duplicate.
func TestReconnectMidStream(t *testing.T) {
	e := newEnv(t, envOptions{})
	u, key := e.newUser("ivy")
	e.seedBundle(u.ID, "bundle", fx.bundleDigest, store.Manifest{})
	gate := filepath.Join(t.TempDir(), "gate")
	id := e.startRun(key, "bundle", map[string]string{"mode": "gate", "gate": gate})

	first := e.openStream(key, id, "")
	// Read up to the second tick: the run is now parked at its gate.
	seen := first.waitFor(t, func(ev events.Event) bool { return ev.Kind == "tick" && string(ev.Body) == "2" })
	first.close()
	last := seen[len(seen)-1].Seq

	second := e.openStream(key, id, strconv.FormatUint(last, 10))
	if err := os.WriteFile(gate, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	rest := second.rest(t)

	full := e.openStream(key, id, "").rest(t)
	if !reflect.DeepEqual(append(append([]events.Event{}, seen...), rest...), full) {
		t.Fatalf("first part %v + resumed %v != full %v", kindsOf(seen), kindsOf(rest), kindsOf(full))
	}
	if rest[0].Seq != last+1 {
		t.Fatalf("resumed at %d after %d", rest[0].Seq, last)
	}
	var ticks []string
	for _, ev := range full {
		if ev.Kind == "tick" {
			ticks = append(ticks, string(ev.Body))
		}
	}
	if !reflect.DeepEqual(ticks, []string{"1", "2", "3", "4", "5", "6"}) {
		t.Fatalf("ticks %v", ticks)
	}
	// Resuming after the last event of a finished run leaves nothing:
	// 204, so that an EventSource stops reconnecting.
	if r := e.do("GET", "/runs/"+id+"/events?from_seq="+strconv.Itoa(len(full)), key, nil); r.status != http.StatusNoContent || len(r.body) != 0 {
		t.Fatalf("resume after the end: %d %q", r.status, r.body)
	}
}

func TestStopRun(t *testing.T) {
	e := newEnv(t, envOptions{})
	u, key := e.newUser("jack")
	e.seedBundle(u.ID, "bundle", fx.bundleDigest, store.Manifest{})
	id := e.startRun(key, "bundle", map[string]string{"mode": "sleep"})
	s := e.openStream(key, id, "")
	s.waitFor(t, isKind("sleeping"))
	var h healthResponse
	e.do("GET", "/health", "", nil).ok(t, http.StatusOK, &h)
	if h.RunningVMs != 1 {
		t.Fatalf("health counts %d running, want 1", h.RunningVMs)
	}

	var stopped map[string]string
	e.do("POST", "/run/"+id+"/stop", key, nil).ok(t, http.StatusAccepted, &stopped)
	if stopped["status"] != "stopping" || stopped["invocation_id"] != id {
		t.Fatalf("stop answer %v", stopped)
	}
	evs := s.rest(t)
	if c := completedOf(t, evs); c.Status != runner.StatusStopped || c.ExitCode != 42 || c.Reason != "stop_requested" {
		t.Fatalf("completed %+v (events %v)", c, kindsOf(evs))
	}
	inv := e.finalInvocation(key, id)
	if inv.Status != store.StatusStopped || inv.Error != "stop_requested" {
		t.Fatalf("invocation %+v", inv)
	}
	// Stopping a finished run is a conflict.
	e.do("POST", "/run/"+id+"/stop", key, nil).apiError(t, http.StatusConflict, CodeConflict)
}

// Permits count running runs, not requests or SSE readers: at capacity a
// run is refused with 503 and Retry-After, readers still connect, and
// the permit comes back when the run ends.
func TestCapacity(t *testing.T) {
	e := newEnv(t, envOptions{maxConcurrent: 1})
	u, key := e.newUser("kate")
	e.seedBundle(u.ID, "bundle", fx.bundleDigest, store.Manifest{})
	e.seedBundle(u.ID, "echo", fx.echoDigest, store.Manifest{})
	id := e.startRun(key, "bundle", map[string]string{"mode": "sleep"})
	s := e.openStream(key, id, "")
	s.waitFor(t, isKind("sleeping"))
	// More readers of the run hold nothing.
	for range 3 {
		e.openStream(key, id, "").waitFor(t, isKind("sleeping"))
	}
	for _, mode := range []string{"sync", "async"} {
		r := e.do("POST", "/run", key, map[string]any{"bundle_id": "echo", "mode": mode})
		r.apiError(t, http.StatusServiceUnavailable, CodeCapacityExceeded)
		if r.header.Get("Retry-After") == "" {
			t.Fatal("503 capacity_exceeded without Retry-After")
		}
	}
	// An unknown bundle is 404 even at capacity: no permit is involved.
	e.do("POST", "/run", key, map[string]any{"bundle_id": "ghost"}).apiError(t, http.StatusNotFound, CodeNotFound)
	// Unauthenticated callers never reach the permit check.
	e.do("POST", "/run", "", map[string]any{"bundle_id": "echo"}).apiError(t, http.StatusUnauthorized, CodeUnauthorized)

	e.do("POST", "/run/"+id+"/stop", key, nil).ok(t, http.StatusAccepted, nil)
	s.rest(t)
	// The stream ends with the completed event, a moment before the
	// runner's teardown gives the permit back: wait on the runner.
	waitIdle(t, e)
	var res runResult
	e.do("POST", "/run", key, map[string]any{"bundle_id": "echo", "payload": 1}).ok(t, http.StatusOK, &res)
	if res.Stdout != "1" {
		t.Fatalf("run after capacity freed: %+v", res)
	}
}

// waitIdle waits until the runner has no run in progress (teardown done).
func waitIdle(t *testing.T, e *env) {
	t.Helper()
	ctx, cancel := contextWithTestTimeout()
	defer cancel()
	for e.run.Running() > 0 {
		select {
		case <-ctx.Done():
			t.Fatalf("runs still in progress: %d", e.run.Running())
		case <-tick():
		}
	}
}

// Another user's run, stream, invocation, stop and bundles answer 404,
// exactly as missing ones do.
func TestOwnershipIsolation(t *testing.T) {
	e := newEnv(t, envOptions{})
	a, keyA := e.newUser("alice")
	_, keyB := e.newUser("bob")
	bundleA := e.seedBundle(a.ID, "echo", fx.echoDigest, store.Manifest{})
	e.seedBundle(a.ID, "bundle", fx.bundleDigest, store.Manifest{})
	id := e.startRun(keyA, "bundle", map[string]string{"mode": "sleep"})
	s := e.openStream(keyA, id, "")
	s.waitFor(t, isKind("sleeping"))

	for _, rt := range []struct{ method, path string }{
		{"GET", "/invocations/" + id},
		{"GET", "/runs/" + id + "/events"},
		{"POST", "/run/" + id + "/stop"},
		{"GET", "/bundles/" + bundleA.ID},
		{"GET", "/bundles/echo"},
		{"DELETE", "/bundles/echo:latest"},
		{"DELETE", "/bundles/" + bundleA.ID},
	} {
		t.Run(rt.method+" "+rt.path, func(t *testing.T) {
			e.do(rt.method, rt.path, keyB, nil).apiError(t, http.StatusNotFound, CodeNotFound)
		})
	}
	// B cannot run A's bundle, by name or by id.
	e.do("POST", "/run", keyB, map[string]string{"bundle_id": "echo"}).apiError(t, http.StatusNotFound, CodeNotFound)
	e.do("POST", "/run", keyB, map[string]string{"bundle_id": bundleA.ID}).apiError(t, http.StatusNotFound, CodeNotFound)
	var list struct{ Bundles []store.Bundle }
	e.do("GET", "/bundles", keyB, nil).ok(t, http.StatusOK, &list)
	if len(list.Bundles) != 0 {
		t.Fatalf("B sees %v", list.Bundles)
	}
	// Nothing of A's was touched: the run is still going, the bundle there.
	var inv invocationView
	e.do("GET", "/invocations/"+id, keyA, nil).ok(t, http.StatusOK, &inv)
	if inv.Status != store.StatusRunning {
		t.Fatalf("A's run is %s", inv.Status)
	}
	e.do("GET", "/bundles/echo", keyA, nil).ok(t, http.StatusOK, nil)
	e.do("POST", "/run/"+id+"/stop", keyA, nil).ok(t, http.StatusAccepted, nil)
	s.rest(t)
}

// A run past its processing timeout completes as timed_out; the sync
// caller gets 504 gateway_timeout with the invocation in the details.
func TestSyncTimeout(t *testing.T) {
	e := newEnv(t, envOptions{})
	u, key := e.newUser("liam")
	e.seedBundle(u.ID, "bundle", fx.bundleDigest, store.Manifest{})
	r := e.do("POST", "/run", key, map[string]any{"bundle_id": "bundle", "payload": map[string]string{"mode": "sleep"}, "timeout_secs": 1})
	body := r.apiError(t, http.StatusGatewayTimeout, CodeGatewayTimeout)
	raw, _ := json.Marshal(body.Details)
	var res runResult
	if err := json.Unmarshal(raw, &res); err != nil || res.Status != runner.StatusTimedOut || res.InvocationID == "" {
		t.Fatalf("details %s", raw)
	}
	inv := e.finalInvocation(key, res.InvocationID)
	if inv.Status != store.StatusTimedOut {
		t.Fatalf("invocation %+v", inv)
	}
}

// A run's timeouts: the request's boot_timeout_secs and timeout_secs over
// the manifest's over the server defaults, each clamped to the server's
// maximum. The started event says what the run got.
func TestRunTimeouts(t *testing.T) {
	e := newEnv(t, envOptions{limits: runner.Limits{BootTimeout: 10 * time.Second, ProcessingTimeout: 20 * time.Second,
		MaxBootTimeout: 30 * time.Second, MaxProcessingTimeout: 40 * time.Second}})
	u, key := e.newUser("tina")
	e.seedBundle(u.ID, "plain", fx.echoDigest, store.Manifest{})
	e.seedBundle(u.ID, "tuned", fx.echoDigest, store.Manifest{BootTimeoutSecs: 12, ProcessingTimeoutSecs: 22})
	tests := []struct {
		name              string
		bundle            string
		request           map[string]int
		bootMs, processMs float64
	}{
		{"server defaults", "plain", nil, 10000, 20000},
		{"manifest", "tuned", nil, 12000, 22000},
		{"request over manifest", "tuned", map[string]int{"boot_timeout_secs": 15, "timeout_secs": 25}, 15000, 25000},
		{"request boot only", "tuned", map[string]int{"boot_timeout_secs": 5}, 5000, 22000},
		{"request over defaults", "plain", map[string]int{"boot_timeout_secs": 25, "timeout_secs": 35}, 25000, 35000},
		{"clamped to the maxima", "tuned", map[string]int{"boot_timeout_secs": 100, "timeout_secs": 100}, 30000, 40000},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			body := map[string]any{"bundle_id": tt.bundle, "payload": 1}
			for k, v := range tt.request {
				body[k] = v
			}
			var res runResult
			e.do("POST", "/run", key, body).ok(t, http.StatusOK, &res)
			evs := e.openStream(key, res.InvocationID, "").rest(t)
			var started struct {
				Phase     string  `json:"phase"`
				BootMs    float64 `json:"boot_timeout_ms"`
				ProcessMs float64 `json:"processing_timeout_ms"`
			}
			if err := json.Unmarshal(evs[0].Body, &started); err != nil || started.Phase != "started" {
				t.Fatalf("first event %s: %v", evs[0].Body, err)
			}
			if started.BootMs != tt.bootMs || started.ProcessMs != tt.processMs {
				t.Fatalf("timeouts %v ms / %v ms, want %v / %v", started.BootMs, started.ProcessMs, tt.bootMs, tt.processMs)
			}
		})
	}
}

// A payload travels in one Request frame: one whose frame would be over
// protocol.MaxFrameSize is refused with 413 before a permit is taken (here
// every permit is), while one exactly at the cap is delivered whole.
func TestPayloadFrameLimit(t *testing.T) {
	e := newEnv(t, envOptions{maxConcurrent: 1, maxBody: 2 * protocol.MaxFrameSize})
	u, key := e.newUser("fred")
	e.seedBundle(u.ID, "echo", fx.echoDigest, store.Manifest{})
	// The Request envelope of a P-byte payload for an "inv_" + 32 hex run
	// id is P + 48 bytes: request_id (tag, length, 36) = 38, the request
	// field's tag and 4-byte length = 5, the payload's tag and 4-byte
	// length = 5. Checked against the protocol's own encoder.
	atLimit := protocol.MaxFrameSize - 48
	frame := func(n int) error {
		_, err := protocol.AppendFrame(nil, &pb.Envelope{RequestId: store.NewID(store.InvocationIDPrefix),
			Payload: &pb.Envelope_Request{Request: &pb.Request{Payload: make([]byte, n)}}})
		return err
	}
	if frame(atLimit) != nil || frame(atLimit+1) == nil {
		t.Fatalf("the frame arithmetic is off: %v, %v", frame(atLimit), frame(atLimit+1))
	}
	body := func(payloadLen int) string {
		return `{"bundle_id":"echo","mode":"async","payload":"` + strings.Repeat("a", payloadLen-2) + `"}`
	}
	permit, err := e.run.Acquire()
	if err != nil {
		t.Fatal(err)
	}
	defer permit.Release() // idempotent; a failing test must not hold the drain
	e.do("POST", "/run", key, body(atLimit+1)).apiError(t, http.StatusRequestEntityTooLarge, CodePayloadTooLarge)
	// At the cap the size check passes: only capacity refuses it.
	e.do("POST", "/run", key, body(atLimit)).apiError(t, http.StatusServiceUnavailable, CodeCapacityExceeded)
	permit.Release()
	var acc runAccepted
	e.do("POST", "/run", key, body(atLimit)).ok(t, http.StatusAccepted, &acc)
	evs := e.openStream(key, acc.InvocationID, "").rest(t)
	for _, ev := range evs {
		if label(ev) != "state:payload_delivered" {
			continue
		}
		var b struct{ Bytes int }
		if err := json.Unmarshal(ev.Body, &b); err != nil || b.Bytes != atLimit {
			t.Fatalf("payload_delivered %s, want %d bytes", ev.Body, atLimit)
		}
		return
	}
	t.Fatalf("the payload at the cap was not delivered: %v", kindsOf(evs))
}
