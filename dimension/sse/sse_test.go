package sse

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"
	"time"

	"github.com/hyphae-run/hyphae/dimension/events"
	"github.com/hyphae-run/hyphae/errcode"
)

// hangGuard bounds waits so that a bug fails the test instead of hanging
// it; it is not a timing assertion.
const hangGuard = 2 * time.Minute

func testCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), hangGuard)
	t.Cleanup(cancel)
	return ctx
}

func state(run string, seq uint64, phase string) events.Event {
	return events.Event{RunID: run, Seq: seq, TsMs: 1000 + int64(seq), Kind: events.KindState,
		ContentType: "application/json", Body: fmt.Appendf(nil, `{"phase":%q}`, phase)}
}

// chanServer serves Stream over the events fed to the returned channel
// and reports the handler's result.
func chanServer(t *testing.T, opts Options) (url string, feed chan<- events.Event, result <-chan error) {
	t.Helper()
	ch := make(chan events.Event)
	res := make(chan error, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		res <- Stream(w, r, ch, opts)
	}))
	t.Cleanup(srv.Close)
	return srv.URL, ch, res
}

func get(t *testing.T, url string, header http.Header) *http.Response {
	t.Helper()
	req, err := http.NewRequestWithContext(testCtx(t), http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = resp.Body.Close() })
	return resp
}

func TestStreamWireFormat(t *testing.T) {
	url, feed, result := chanServer(t, Options{Heartbeat: time.Hour})
	go func() {
		feed <- state("r1", 1, "started")
		feed <- events.Event{RunID: "r1", Seq: 2, TsMs: 1002, Kind: "stderr", ContentType: "text/plain; charset=utf-8",
			Body: []byte("oops\n"), Attrs: map[string]string{"stream": "2"}, WorkerID: "w", BundleID: "echo:1", UserID: "u"}
		feed <- events.Event{RunID: "r1", Seq: 3, TsMs: 1003, Kind: "greeting", ContentType: "application/json",
			Body: []byte("{\n \"hello\": \"world\"\n}")}
		feed <- events.Event{RunID: "r1", Seq: 4, TsMs: 1004, Kind: events.KindState, ContentType: "application/json",
			Body: []byte(`{"phase":"completed","status":"completed","exit_code":0,"duration_ms":12}`)}
	}()
	resp := get(t, url, nil)
	for k, want := range map[string]string{"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"} {
		if got := resp.Header.Get(k); got != want {
			t.Errorf("header %s = %q, want %q", k, got, want)
		}
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	want := "id: 1\nevent: state\n" +
		`data: {"run_id":"r1","ts_ms":1001,"content_type":"application/json","body":{"phase":"started"},"attrs":{},"worker_id":"","bundle_id":"","user_id":""}` + "\n\n" +
		"id: 2\nevent: stderr\n" +
		`data: {"run_id":"r1","ts_ms":1002,"content_type":"text/plain; charset=utf-8","body":"oops\n","attrs":{"stream":"2"},"worker_id":"w","bundle_id":"echo:1","user_id":"u"}` + "\n\n" +
		"id: 3\nevent: greeting\n" +
		`data: {"run_id":"r1","ts_ms":1003,"content_type":"application/json","body":{"hello":"world"},"attrs":{},"worker_id":"","bundle_id":"","user_id":""}` + "\n\n" +
		"id: 4\nevent: state\n" +
		`data: {"run_id":"r1","ts_ms":1004,"content_type":"application/json","body":{"phase":"completed","status":"completed","exit_code":0,"duration_ms":12},"attrs":{},"worker_id":"","bundle_id":"","user_id":""}` + "\n\n"
	if string(body) != want {
		t.Errorf("body =\n%s\nwant\n%s", body, want)
	}
	if err := <-result; err != nil {
		t.Errorf("Stream returned %v after the completed event", err)
	}
}

// Heartbeats come on a fixed tick, also while events flow without a
// pause: the feeder never lets the stream idle, yet heartbeats arrive
// between events.
func TestStreamHeartbeatWhileBusy(t *testing.T) {
	url, feed, result := chanServer(t, Options{Heartbeat: 50 * time.Millisecond})
	stop := make(chan struct{})
	go func() {
		seq := uint64(1)
		for {
			select {
			case feed <- events.Event{RunID: "r", Seq: seq, Kind: "tick", ContentType: "application/json", Body: []byte("1")}:
				seq++
			case <-stop:
				feed <- state("r", seq, "completed")
				return
			}
		}
	}()
	r := NewReader(get(t, url, nil).Body)
	// Far more events than flow in one heartbeat interval (each is a
	// flushed write): a stream that carries none by then has none.
	const patience = 100000
	heartbeats, n, busyGaps := 0, 0, 0
	for heartbeats < 3 {
		f, err := r.Next()
		if err != nil {
			t.Fatalf("Next after %d heartbeats: %v", heartbeats, err)
		}
		if !f.IsComment() {
			if n++; n > patience {
				t.Fatalf("%d events in a row without a heartbeat", n)
			}
			continue
		}
		if heartbeats > 0 && n > 0 {
			busyGaps++
		}
		heartbeats++
		n = 0
	}
	close(stop)
	if busyGaps == 0 {
		t.Fatal("no events flowed between the heartbeats: the stream was not busy")
	}
	for {
		if _, err := r.Next(); err != nil {
			if !errors.Is(err, io.EOF) {
				t.Fatal(err)
			}
			break
		}
	}
	if err := <-result; err != nil {
		t.Fatal(err)
	}
}

func TestStreamHeartbeat(t *testing.T) {
	url, feed, result := chanServer(t, Options{Heartbeat: 10 * time.Millisecond})
	go func() { feed <- state("r", 1, "started") }()
	r := NewReader(get(t, url, nil).Body)
	next := func() Frame {
		t.Helper()
		f, err := r.Next()
		if err != nil {
			t.Fatalf("Next: %v", err)
		}
		return f
	}
	if f := next(); f.ID != "1" || f.Event != "state" {
		t.Fatalf("first frame %+v", f)
	}
	// The run is quiet now: the stream must carry heartbeats.
	for range 3 {
		if f := next(); !f.IsComment() || f.Comment != "heartbeat" {
			t.Fatalf("idle stream sent %+v, want a heartbeat", f)
		}
	}
	go func() { feed <- state("r", 2, "completed") }()
	for {
		f := next()
		if f.IsComment() {
			continue
		}
		if f.ID != "2" {
			t.Fatalf("frame %+v after heartbeats", f)
		}
		break
	}
	if _, err := r.Next(); !errors.Is(err, io.EOF) {
		t.Fatalf("after completed: %v, want EOF", err)
	}
	if err := <-result; err != nil {
		t.Fatal(err)
	}
}

func TestStreamEnds(t *testing.T) {
	t.Run("client disconnects", func(t *testing.T) {
		url, feed, result := chanServer(t, Options{})
		ctx, cancel := context.WithCancel(testCtx(t))
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		go func() { feed <- state("r", 1, "started") }()
		if f, err := NewReader(resp.Body).Next(); err != nil || f.ID != "1" {
			t.Fatalf("first frame %+v, %v", f, err)
		}
		cancel()
		if err := <-result; !errors.Is(err, context.Canceled) {
			t.Fatalf("Stream after disconnect returned %v", err)
		}
	})
	t.Run("subscription closes early", func(t *testing.T) {
		ch := make(chan events.Event)
		close(ch)
		rec := httptest.NewRecorder()
		err := Stream(rec, httptest.NewRequest(http.MethodGet, "/runs/r/events", nil), ch, Options{})
		if !errcode.HasCode(err, errcode.EventLogFailed) {
			t.Fatalf("Stream on a closed subscription: %v, want %s", err, errcode.EventLogFailed)
		}
		if rec.Body.Len() != 0 || rec.Header().Get("Content-Type") != "text/event-stream" {
			t.Errorf("recorder got %q with headers %v", rec.Body.String(), rec.Header())
		}
	})
}

func TestParseResume(t *testing.T) {
	tests := []struct {
		header, query string
		want          uint64
		bad           bool
	}{
		{"", "", 0, false},
		{"17", "", 17, false},
		{" 17 ", "", 17, false},
		{"", "from_seq=5", 5, false},
		{"9", "from_seq=5", 9, false}, // a reconnect's header wins over the original URL
		{"18446744073709551615", "", 1<<64 - 1, false},
		{"abc", "", 0, true},
		{"-1", "", 0, true},
		{"+3", "", 0, true},
		{"1.5", "", 0, true},
		{"18446744073709551616", "", 0, true},
		{"", "from_seq=x", 0, true},
		{"", "from_seq=0x10", 0, true},
	}
	for _, tt := range tests {
		r := httptest.NewRequest(http.MethodGet, "/runs/r/events?"+tt.query, nil)
		if tt.header != "" {
			r.Header.Set("Last-Event-ID", tt.header)
		}
		got, err := ParseResume(r)
		if tt.bad {
			if !errcode.HasCode(err, errcode.InvalidArgument) {
				t.Errorf("ParseResume(%q, %q) = %d, %v; want %s", tt.header, tt.query, got, err, errcode.InvalidArgument)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("ParseResume(%q, %q) = %d, %v; want %d", tt.header, tt.query, got, err, tt.want)
		}
	}
}

// TestResumeOverTheLog is the gateway's path end to end in one process: a
// run writing to the real event log, a client that reads part of the
// stream and disconnects, and a reconnect with Last-Event-ID (or
// from_seq) that must get exactly the rest.
func TestResumeOverTheLog(t *testing.T) {
	log, err := events.Open(testCtx(t), events.Options{StoreDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = log.Close() })
	mux := http.NewServeMux()
	mux.HandleFunc("GET /runs/{id}/events", func(w http.ResponseWriter, r *http.Request) {
		after, err := ParseResume(r)
		if err != nil {
			http.Error(w, err.Error(), http.StatusUnprocessableEntity)
			return
		}
		sub, err := log.Subscribe(r.Context(), r.PathValue("id"), after)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		defer sub.Close()
		_ = Stream(w, r, sub.Events(), Options{Heartbeat: time.Hour})
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)

	const run, total = "resume-1", 200
	done := make(chan error, 1)
	go func() { // the run's writer, concurrent with the readers
		for i := 1; i < total; i++ {
			ev := events.Event{RunID: run, Kind: "bundle", ContentType: "application/json", Body: fmt.Appendf(nil, `{"i":%d}`, i)}
			if _, err := log.Append(testCtx(t), ev); err != nil {
				done <- err
				return
			}
		}
		_, err := log.Append(testCtx(t), events.Event{RunID: run, Kind: events.KindState, ContentType: "application/json",
			Body: []byte(`{"phase":"completed","status":"completed","exit_code":0,"duration_ms":1}`)})
		done <- err
	}()

	// read returns the ids of the events on one connection, stopping after
	// limit events (0: to the end).
	read := func(header http.Header, query string, limit int) []uint64 {
		t.Helper()
		ctx, cancel := context.WithCancel(testCtx(t))
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL+"/runs/"+run+"/events"+query, nil)
		for k, v := range header {
			req.Header[k] = v
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var ids []uint64
		r := NewReader(resp.Body)
		for limit == 0 || len(ids) < limit {
			f, err := r.Next()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("reading the stream: %v", err)
			}
			if f.IsComment() {
				continue
			}
			id, err := strconv.ParseUint(f.ID, 10, 64)
			if err != nil {
				t.Fatalf("frame id %q", f.ID)
			}
			ev, err := events.ParseData(id, f.Event, []byte(f.Data))
			if err != nil || ev.RunID != run {
				t.Fatalf("frame data %q: %v", f.Data, err)
			}
			ids = append(ids, id)
		}
		return ids
	}
	want := func(ids []uint64, from, to uint64) {
		t.Helper()
		if len(ids) != int(to-from+1) {
			t.Fatalf("got %d ids (%v…), want %d..%d", len(ids), ids[:min(len(ids), 5)], from, to)
		}
		for i, id := range ids {
			if id != from+uint64(i) {
				t.Fatalf("id #%d = %d, want %d", i, id, from+uint64(i))
			}
		}
	}

	first := read(nil, "", 37)
	want(first, 1, 37)
	want(read(http.Header{"Last-Event-Id": {"37"}}, "", 0), 38, total)
	want(read(nil, "?from_seq=150", 0), 151, total)
	// Resuming after the completed event: nothing, and the stream closes.
	if ids := read(http.Header{"Last-Event-Id": {strconv.Itoa(total)}}, "", 0); len(ids) != 0 {
		t.Fatalf("resume after the end got %v", ids)
	}
	if err := <-done; err != nil {
		t.Fatalf("writer: %v", err)
	}
}
