package events

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/hyphae-run/hyphae/errcode"
)

// hangGuard bounds every wait in these tests, so that a bug shows as a
// failure rather than a stuck test binary. It is not a timing assertion.
const hangGuard = 2 * time.Minute

func testCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), hangGuard)
	t.Cleanup(cancel)
	return ctx
}

func openEmbedded(t *testing.T, dir string, opts Options) *Log {
	t.Helper()
	opts.StoreDir = dir
	l, err := Open(testCtx(t), opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { _ = l.Close() })
	return l
}

func bundleEvent(run string, i int) Event {
	return Event{
		RunID: run, Kind: "bundle", ContentType: "application/json",
		Body:     fmt.Appendf(nil, `{"i": %d}`, i),
		Attrs:    map[string]string{"n": fmt.Sprint(i)},
		WorkerID: "w1", BundleID: "echo:latest", UserID: "u1",
	}
}

func completedEvent(run string) Event {
	return Event{RunID: run, Kind: KindState, ContentType: "application/json",
		Body: []byte(`{"phase":"completed","status":"completed","exit_code":0,"duration_ms":5}`)}
}

func mustAppend(t *testing.T, l *Log, ev Event) uint64 {
	t.Helper()
	seq, err := l.Append(testCtx(t), ev)
	if err != nil {
		t.Fatalf("Append %s/%s: %v", ev.RunID, ev.Kind, err)
	}
	return seq
}

// writeRun appends n bundle events and, when complete, the completed event.
func writeRun(t *testing.T, l *Log, run string, n int, complete bool) {
	t.Helper()
	for i := 1; i <= n; i++ {
		if seq := mustAppend(t, l, bundleEvent(run, i)); seq != uint64(i) {
			t.Fatalf("Append #%d of %s returned seq %d", i, run, seq)
		}
	}
	if complete {
		mustAppend(t, l, completedEvent(run))
	}
}

// collect reads a subscription until it ends and returns what it got.
func collect(t *testing.T, s *Subscription) []Event {
	t.Helper()
	var got []Event
	guard := time.After(hangGuard)
	for {
		select {
		case ev, ok := <-s.Events():
			if !ok {
				if err := s.Err(); err != nil {
					t.Fatalf("subscription ended with %v after %d events", err, len(got))
				}
				return got
			}
			got = append(got, ev)
		case <-guard:
			t.Fatalf("subscription still open after %s (%d events)", hangGuard, len(got))
		}
	}
}

func subscribe(t *testing.T, l *Log, run string, after uint64) *Subscription {
	t.Helper()
	s, err := l.Subscribe(testCtx(t), run, after)
	if err != nil {
		t.Fatalf("Subscribe(%s, %d): %v", run, after, err)
	}
	t.Cleanup(s.Close)
	return s
}

// checkSeqs fails unless got holds exactly the per-run sequences from..to.
func checkSeqs(t *testing.T, got []Event, from, to uint64) {
	t.Helper()
	if want := int(to - from + 1); len(got) != want {
		t.Fatalf("got %d events, want %d (seqs %d..%d)", len(got), want, from, to)
	}
	for i, ev := range got {
		if ev.Seq != from+uint64(i) {
			t.Fatalf("event %d has seq %d, want %d", i, ev.Seq, from+uint64(i))
		}
	}
}

func TestAppendSubscribeRoundTrip(t *testing.T) {
	l := openEmbedded(t, t.TempDir(), Options{})
	run := "run-1"
	writeRun(t, l, run, 20, false)
	stderr := Event{RunID: run, TsMs: 1700000000123, Kind: "stderr", ContentType: "text/plain; charset=utf-8",
		Body: []byte("line\twith tab")}
	if seq := mustAppend(t, l, stderr); seq != 21 {
		t.Fatalf("stderr seq %d, want 21", seq)
	}
	mustAppend(t, l, completedEvent(run))

	got := collect(t, subscribe(t, l, run, 0))
	checkSeqs(t, got, 1, 22)
	want := bundleEvent(run, 7)
	ev := got[6]
	if ev.Kind != want.Kind || ev.ContentType != want.ContentType || string(ev.Body) != string(want.Body) ||
		ev.Attrs["n"] != "7" || ev.WorkerID != "w1" || ev.BundleID != "echo:latest" || ev.UserID != "u1" || ev.TsMs == 0 {
		t.Errorf("event 7 = %+v, want fields of %+v", ev, want)
	}
	if e := got[20]; e.Kind != "stderr" || e.TsMs != stderr.TsMs || string(e.Body) != "line\twith tab" {
		t.Errorf("stderr event = %+v", e)
	}
	if !got[21].IsCompleted() {
		t.Errorf("last event is not the completed one: %+v", got[21])
	}
}

func TestResumeAfterSeq(t *testing.T) {
	l := openEmbedded(t, t.TempDir(), Options{})
	// Interleave three runs so that a run's stream sequences are not
	// contiguous and the binary search has other runs' messages to skip.
	runs := []string{"a", "b", "c"}
	const n = 60
	for i := 1; i <= n; i++ {
		for _, r := range runs {
			mustAppend(t, l, bundleEvent(r, i))
		}
	}
	for _, r := range runs {
		mustAppend(t, l, completedEvent(r))
	}
	for _, after := range []uint64{0, 1, 2, 30, 59, 60} {
		t.Run(fmt.Sprint(after), func(t *testing.T) {
			got := collect(t, subscribe(t, l, "b", after))
			checkSeqs(t, got, after+1, n+1)
			for _, ev := range got {
				if ev.RunID != "b" {
					t.Fatalf("event of run %s in run b's stream", ev.RunID)
				}
			}
		})
	}
	// Resuming at or past the completed event ends at once.
	for _, after := range []uint64{n + 1, n + 100} {
		if got := collect(t, subscribe(t, l, "b", after)); len(got) != 0 {
			t.Errorf("after %d: got %d events, want none", after, len(got))
		}
	}
}

// TestMidRunSubscribersNoGapNoDuplicate is the bug this log replaces: a
// reader joining while the run writes must see every event after its
// resume point exactly once, in order.
func TestMidRunSubscribersNoGapNoDuplicate(t *testing.T) {
	rounds, events, readers := 3, 2000, 20
	if testing.Short() {
		rounds = 1
	}
	l := openEmbedded(t, t.TempDir(), Options{})
	for round := range rounds {
		run := fmt.Sprintf("mid-%d", round)
		rng := rand.New(rand.NewPCG(uint64(round), 42))
		// Readers join after the writer has appended joinAt[i] events and
		// resume after a random point at or before it.
		// A third of them replay from the start.
		joinAt, afters := make([]int, readers), make([]uint64, readers)
		for i := range joinAt {
			joinAt[i] = rng.IntN(events)
			if joinAt[i] > 0 && rng.IntN(3) != 0 {
				afters[i] = 1 + rng.Uint64N(uint64(joinAt[i]))
			}
		}
		results := make([][]Event, readers)
		var wg sync.WaitGroup
		progress := make([]chan struct{}, events+1)
		for i := range progress {
			progress[i] = make(chan struct{})
		}
		for i := range readers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-progress[joinAt[i]]
				s, err := l.Subscribe(testCtx(t), run, afters[i])
				if err != nil {
					t.Errorf("Subscribe: %v", err)
					return
				}
				defer s.Close()
				for ev := range s.Events() {
					results[i] = append(results[i], ev)
				}
				if err := s.Err(); err != nil {
					t.Errorf("reader %d: %v", i, err)
				}
			}()
		}
		close(progress[0])
		for i := 1; i <= events; i++ {
			var ev Event
			if i == events {
				ev = completedEvent(run)
			} else {
				ev = bundleEvent(run, i)
			}
			mustAppend(t, l, ev)
			close(progress[i])
		}
		wg.Wait()
		for i := range readers {
			t.Run(fmt.Sprintf("round%d/reader%d", round, i), func(t *testing.T) {
				checkSeqs(t, results[i], afters[i]+1, uint64(events))
			})
		}
	}
}

func TestCompletedEndsAndSealsTheRun(t *testing.T) {
	l := openEmbedded(t, t.TempDir(), Options{})
	run := "sealed"
	live := subscribe(t, l, run, 0) // before the run has any event
	writeRun(t, l, run, 3, true)
	checkSeqs(t, collect(t, live), 1, 4)

	for range 3 {
		_, err := l.Append(testCtx(t), bundleEvent(run, 99))
		if !errcode.HasCode(err, errcode.RunFinished) {
			t.Fatalf("Append after completed: %v, want %s", err, errcode.RunFinished)
		}
	}
	// Neither the run nor the refused appends left writer state behind.
	l.mu.Lock()
	cached := len(l.runs)
	l.mu.Unlock()
	if cached != 0 {
		t.Errorf("%d runs' writer state cached after they completed", cached)
	}
	// A state event that is not "completed" does not end a subscription.
	other := "other"
	mustAppend(t, l, Event{RunID: other, Kind: KindState, ContentType: "application/json", Body: []byte(`{"phase":"started"}`)})
	mustAppend(t, l, completedEvent(other))
	checkSeqs(t, collect(t, subscribe(t, l, other, 0)), 1, 2)
}

func TestSecondWriterIsDetected(t *testing.T) {
	l := openEmbedded(t, t.TempDir(), Options{})
	run := "contested"
	writeRun(t, l, run, 2, false)
	// Another writer (here a raw publish, as another process would do)
	// appends behind this Log's back.
	m := nats.NewMsg(subject(run))
	m.Header.Set(hdrSeq, "3")
	m.Header.Set(hdrMeta, `{"ts_ms":1,"kind":"intruder"}`)
	if _, err := l.js.PublishMsg(testCtx(t), m); err != nil {
		t.Fatal(err)
	}
	_, err := l.Append(testCtx(t), bundleEvent(run, 3))
	if !errcode.HasCode(err, errcode.Conflict) {
		t.Fatalf("Append after a foreign write: %v, want %s", err, errcode.Conflict)
	}
	// The Log reloads its counter and continues after the foreign event.
	if seq := mustAppend(t, l, bundleEvent(run, 4)); seq != 4 {
		t.Fatalf("seq after reload = %d, want 4", seq)
	}
	mustAppend(t, l, completedEvent(run))
	got := collect(t, subscribe(t, l, run, 0))
	checkSeqs(t, got, 1, 5)
	if got[2].Kind != "intruder" {
		t.Errorf("event 3 = %+v", got[2])
	}
}

func TestRunsDoNotMix(t *testing.T) {
	l := openEmbedded(t, t.TempDir(), Options{})
	subA, subB := subscribe(t, l, "run-a", 0), subscribe(t, l, "run-b", 0)
	var wg sync.WaitGroup
	for _, r := range []string{"run-a", "run-b"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 1; i <= 300; i++ {
				if _, err := l.Append(testCtx(t), bundleEvent(r, i)); err != nil {
					t.Errorf("Append: %v", err)
					return
				}
			}
			if _, err := l.Append(testCtx(t), completedEvent(r)); err != nil {
				t.Errorf("Append: %v", err)
			}
		}()
	}
	wg.Wait()
	for run, s := range map[string]*Subscription{"run-a": subA, "run-b": subB} {
		got := collect(t, s)
		checkSeqs(t, got, 1, 301)
		for _, ev := range got[:300] {
			var b struct{ I int }
			if ev.RunID != run || json.Unmarshal(ev.Body, &b) != nil || uint64(b.I) != ev.Seq {
				t.Fatalf("run %s got %+v", run, ev)
			}
		}
	}
}

func TestSlowSubscriberDoesNotBlockTheWriter(t *testing.T) {
	l := openEmbedded(t, t.TempDir(), Options{SubscriberBuffer: 16})
	run := "flood"
	stalled := subscribe(t, l, run, 0) // never read until the writer is done
	fast := subscribe(t, l, run, 0)
	fastGot := make(chan []Event)
	go func() {
		var got []Event
		for ev := range fast.Events() {
			got = append(got, ev)
		}
		fastGot <- got
	}()
	const n = 10000
	ctx := testCtx(t)
	for i := 1; i <= n; i++ {
		if _, err := l.Append(ctx, bundleEvent(run, i)); err != nil {
			t.Fatalf("Append #%d with a stalled subscriber: %v", i, err)
		}
	}
	mustAppend(t, l, completedEvent(run))
	checkSeqs(t, <-fastGot, 1, n+1)
	// The stalled reader lost nothing: it gets every event once it reads.
	checkSeqs(t, collect(t, stalled), 1, n+1)
}

func TestRetention(t *testing.T) {
	dir := t.TempDir()
	l := openEmbedded(t, dir, Options{})
	info, err := l.StreamInfo(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	c := info.Config
	if c.MaxAge != DefaultMaxAge || c.MaxBytes != DefaultMaxBytes || c.Storage != jetstream.FileStorage ||
		c.Retention != jetstream.LimitsPolicy || c.Discard != jetstream.DiscardOld ||
		len(c.Subjects) != 1 || c.Subjects[0] != "runs.>" {
		t.Fatalf("default stream config = %+v", c)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}

	// Reopening with other limits updates the stream, and the size limit
	// really drops the oldest events.
	const maxBytes = 64 << 10
	l = openEmbedded(t, dir, Options{MaxAge: time.Hour, MaxBytes: maxBytes})
	info, err = l.StreamInfo(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if info.Config.MaxAge != time.Hour || info.Config.MaxBytes != maxBytes {
		t.Fatalf("updated config: max age %s, max bytes %d", info.Config.MaxAge, info.Config.MaxBytes)
	}
	run := "big"
	big := strings.Repeat("x", 1024)
	const n = 500
	for i := 1; i <= n; i++ {
		mustAppend(t, l, Event{RunID: run, Kind: "stderr", ContentType: "text/plain", Body: []byte(big)})
	}
	mustAppend(t, l, completedEvent(run))
	info, err = l.StreamInfo(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Bytes > maxBytes || info.State.Msgs >= n {
		t.Fatalf("stream holds %d messages, %d bytes; want at most %d bytes", info.State.Msgs, info.State.Bytes, maxBytes)
	}
	// What is left is the run's most recent events, contiguous.
	got := collect(t, subscribe(t, l, run, 0))
	if len(got) == 0 || got[len(got)-1].Seq != n+1 {
		t.Fatalf("after retention got %d events", len(got))
	}
	checkSeqs(t, got, got[0].Seq, n+1)
}

func TestInvalidInput(t *testing.T) {
	l := openEmbedded(t, t.TempDir(), Options{})
	for _, id := range []string{"", "a.b", "a b", "*", ">", "runs", "ü", strings.Repeat("a", MaxRunIDLen+1), "a\nb"} {
		if id == "runs" {
			continue // a valid id, listed to show that the prefix is no special case
		}
		if _, err := l.Append(testCtx(t), Event{RunID: id, Kind: "bundle"}); !errcode.HasCode(err, errcode.InvalidArgument) {
			t.Errorf("Append(run %q): %v, want %s", id, err, errcode.InvalidArgument)
		}
		if _, err := l.Subscribe(testCtx(t), id, 0); !errcode.HasCode(err, errcode.InvalidArgument) {
			t.Errorf("Subscribe(run %q): %v, want %s", id, err, errcode.InvalidArgument)
		}
	}
	for _, kind := range []string{"", "a\nb", "a\rb", "nul\x00", strings.Repeat("k", MaxKindLen+1), "\xff"} {
		if _, err := l.Append(testCtx(t), Event{RunID: "r", Kind: kind}); !errcode.HasCode(err, errcode.InvalidArgument) {
			t.Errorf("Append(kind %q): %v, want %s", kind, err, errcode.InvalidArgument)
		}
	}
	// Nothing was stored by the refused appends.
	info, err := l.StreamInfo(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Msgs != 0 {
		t.Errorf("stream holds %d messages after refused appends", info.State.Msgs)
	}
	// An event over the server's payload limit is refused before sending.
	huge := Event{RunID: "r", Kind: "stdout-final", Body: make([]byte, embeddedMaxPayload+1)}
	if _, err := l.Append(testCtx(t), huge); !errcode.HasCode(err, errcode.SizeLimit) {
		t.Errorf("Append(huge): %v, want %s", err, errcode.SizeLimit)
	}
	if _, err := Open(testCtx(t), Options{}); !errcode.HasCode(err, errcode.InvalidArgument) {
		t.Errorf("Open without a store dir: %v, want %s", err, errcode.InvalidArgument)
	}
}

func TestPersistenceAcrossRestart(t *testing.T) {
	dir := t.TempDir()
	l := openEmbedded(t, dir, Options{})
	writeRun(t, l, "kept", 10, false)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Append(testCtx(t), bundleEvent("kept", 11)); !errcode.HasCode(err, errcode.EventLogFailed) {
		t.Errorf("Append after Close: %v, want %s", err, errcode.EventLogFailed)
	}

	l = openEmbedded(t, dir, Options{})
	// The new process's writer continues the run's sequence.
	if seq := mustAppend(t, l, bundleEvent("kept", 11)); seq != 11 {
		t.Fatalf("first seq after restart = %d, want 11", seq)
	}
	mustAppend(t, l, completedEvent("kept"))
	checkSeqs(t, collect(t, subscribe(t, l, "kept", 0)), 1, 12)
}

func TestCloseEndsSubscriptions(t *testing.T) {
	l := openEmbedded(t, t.TempDir(), Options{})
	s := subscribe(t, l, "open-run", 0)
	mustAppend(t, l, bundleEvent("open-run", 1))
	if ev := <-s.Events(); ev.Seq != 1 {
		t.Fatalf("first event seq %d", ev.Seq)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	for range s.Events() {
	}
	if err := s.Err(); err == nil {
		t.Error("a subscription ended by Close reports no error")
	}
}
