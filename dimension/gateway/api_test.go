package gateway

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/hyphae-run/hyphae/dimension/runner"
	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/errcode"
)

func TestErrorEnvelopes(t *testing.T) {
	e := newEnv(t, envOptions{maxBody: 1024})
	_, key := e.newUser("frank")
	tests := []struct {
		name         string
		method, path string
		body         any
		status       int
		code         string
	}{
		{"unknown route", "GET", "/nope", nil, http.StatusNotFound, CodeNotFound},
		{"unknown nested route", "GET", "/runs/x/y/z", nil, http.StatusNotFound, CodeNotFound},
		{"wrong method", "DELETE", "/run", nil, http.StatusMethodNotAllowed, CodeBadRequest},
		{"wrong method on a pattern", "PUT", "/bundles/abc", nil, http.StatusMethodNotAllowed, CodeBadRequest},
		{"malformed JSON", "POST", "/run", `{"bundle_id":`, http.StatusBadRequest, CodeBadRequest},
		{"not JSON", "POST", "/run", `hello`, http.StatusBadRequest, CodeBadRequest},
		{"trailing data", "POST", "/run", `{"bundle_id":"x"} {}`, http.StatusBadRequest, CodeBadRequest},
		{"empty body", "POST", "/run", ``, http.StatusBadRequest, CodeBadRequest},
		{"wrong type", "POST", "/run", `{"bundle_id":7}`, http.StatusUnprocessableEntity, CodeValidation},
		{"array body", "POST", "/run", `[1]`, http.StatusUnprocessableEntity, CodeValidation},
		{"unknown field", "POST", "/run", `{"bundle_id":"x","bogus":1}`, http.StatusUnprocessableEntity, CodeValidation},
		{"missing bundle", "POST", "/run", `{"payload":{}}`, http.StatusUnprocessableEntity, CodeValidation},
		{"bad mode", "POST", "/run", `{"bundle_id":"x","mode":"later"}`, http.StatusUnprocessableEntity, CodeValidation},
		{"negative timeout", "POST", "/run", `{"bundle_id":"x","timeout_secs":-1}`, http.StatusUnprocessableEntity, CodeValidation},
		{"negative boot timeout", "POST", "/run", `{"bundle_id":"x","boot_timeout_secs":-1}`, http.StatusUnprocessableEntity, CodeValidation},
		{"unknown bundle", "POST", "/run", `{"bundle_id":"ghost"}`, http.StatusNotFound, CodeNotFound},
		{"bad bundle ref", "POST", "/run", `{"bundle_id":"Bad Name!"}`, http.StatusUnprocessableEntity, CodeValidation},
		{"body over the cap", "POST", "/run", `{"bundle_id":"x","payload":"` + strings.Repeat("a", 2048) + `"}`, http.StatusRequestEntityTooLarge, CodePayloadTooLarge},
		{"bad path id", "GET", "/invocations/bad!id", nil, http.StatusUnprocessableEntity, CodeValidation},
		{"bad run id", "GET", "/runs/%20x/events", nil, http.StatusUnprocessableEntity, CodeValidation},
		{"unknown invocation", "GET", "/invocations/inv_nope", nil, http.StatusNotFound, CodeNotFound},
		{"unknown events", "GET", "/runs/inv_nope/events", nil, http.StatusNotFound, CodeNotFound},
		{"unknown stop", "POST", "/run/inv_nope/stop", nil, http.StatusNotFound, CodeNotFound},
		{"unknown job", "GET", "/bundles/jobs/job_nope", nil, http.StatusNotFound, CodeNotFound},
		{"unknown bundle get", "GET", "/bundles/ghost", nil, http.StatusNotFound, CodeNotFound},
		{"unknown bundle delete", "DELETE", "/bundles/ghost", nil, http.StatusNotFound, CodeNotFound},
		{"upload not multipart", "POST", "/bundles/upload", `{}`, http.StatusBadRequest, CodeBadRequest},
		{"push not multipart", "POST", "/bundles/push", `{}`, http.StatusBadRequest, CodeBadRequest},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := e.do(tt.method, tt.path, key, tt.body)
			r.apiError(t, tt.status, tt.code)
			if tt.status == http.StatusMethodNotAllowed && r.header.Get("Allow") == "" {
				t.Error("405 without Allow")
			}
		})
	}
	// A wrong Content-Type is refused before the body is read.
	req, _ := http.NewRequest("POST", e.url+"/run", strings.NewReader(`{"bundle_id":"x"}`))
	req.Header.Set("Content-Type", "text/plain")
	e.send(req, key).apiError(t, http.StatusBadRequest, CodeBadRequest)
	// Unauthenticated requests to unknown routes are 404, not 401: the
	// route table is no secret.
	e.do("GET", "/nope", "", nil).apiError(t, http.StatusNotFound, CodeNotFound)
}

// The mapping from coded library errors to the envelope, for the codes
// no route above produces on demand.
func TestToAPIError(t *testing.T) {
	tests := []struct {
		err    error
		status int
		code   string
		leaks  bool // the message may carry the error's text
	}{
		{errcode.New(errcode.InvalidArgument, "bad x"), 422, CodeValidation, true},
		{errcode.New(errcode.InvalidManifest, "bad manifest"), 422, CodeValidation, true},
		{errcode.New(errcode.NotFound, "no such"), 404, CodeNotFound, true},
		{errcode.New(errcode.AlreadyExists, "taken"), 409, CodeConflict, true},
		{errcode.New(errcode.LastAdmin, "last"), 409, CodeConflict, true},
		{errcode.New(errcode.Unauthenticated, "who"), 401, CodeUnauthorized, true},
		{errcode.New(errcode.SizeLimit, "big"), 413, CodePayloadTooLarge, true},
		{runner.ErrCapacity, 503, CodeCapacityExceeded, false},
		{errcode.New(errcode.Draining, "draining"), 503, CodeServiceUnavailable, false},
		{errcode.Wrap(errcode.StoreError, errors.New("disk I/O at /secret/path"), "db"), 503, CodeServiceUnavailable, false},
		{errcode.Wrap(errcode.EventLogFailed, errors.New("nats://secret"), "log"), 503, CodeServiceUnavailable, false},
		{errors.New("panic at /secret/path"), 500, CodeInternal, false},
		{fmt.Errorf("wrapped: %w", errcode.New(errcode.NotFound, "x")), 404, CodeNotFound, true},
	}
	for _, tt := range tests {
		t.Run(tt.err.Error(), func(t *testing.T) {
			rec := httptest.NewRecorder()
			writeError(rec, httptest.NewRequest("GET", "/", nil), discard(), tt.err)
			var env envelope
			if err := json.Unmarshal(rec.Body.Bytes(), &env); err != nil {
				t.Fatal(err)
			}
			if rec.Code != tt.status || env.Error.Code != tt.code {
				t.Fatalf("got %d %q, want %d %q", rec.Code, env.Error.Code, tt.status, tt.code)
			}
			if !tt.leaks && bytes.Contains(rec.Body.Bytes(), []byte("secret")) {
				t.Fatalf("the cause reached the client: %s", rec.Body.Bytes())
			}
			if (tt.code == CodeCapacityExceeded) != (rec.Header().Get("Retry-After") != "") {
				t.Fatalf("Retry-After %q for %s", rec.Header().Get("Retry-After"), tt.code)
			}
		})
	}
}

func TestHealth(t *testing.T) {
	e := newEnv(t, envOptions{maxConcurrent: 7})
	var h healthResponse
	e.do("GET", "/health", "", nil).ok(t, http.StatusOK, &h)
	if h.Status != "ok" || !h.Mock || h.RunningVMs != 0 || h.MaxConcurrent != 7 || h.Version != "test" || h.WorkerID != "test-worker" {
		t.Fatalf("health %+v", h)
	}
	e.srv.BeginDrain()
	var d healthResponse
	body := e.do("GET", "/health", "", nil).apiError(t, http.StatusServiceUnavailable, CodeServiceUnavailable)
	raw, _ := json.Marshal(body.Details)
	if err := json.Unmarshal(raw, &d); err != nil || d.Status != "draining" {
		t.Fatalf("draining health details %s", raw)
	}
	// New work is refused while draining.
	u, key := e.newUser("rita")
	e.seedBundle(u.ID, "echo", fx.echoDigest, store.Manifest{})
	e.do("POST", "/run", key, map[string]string{"bundle_id": "echo"}).apiError(t, http.StatusServiceUnavailable, CodeServiceUnavailable)
	e.postMultipart("/bundles/upload", key, map[string]string{"name": "x"}, map[string]string{"image": fx.echoArchive}).
		apiError(t, http.StatusServiceUnavailable, CodeServiceUnavailable)
}

// A handler that panics still answers: the 500 internal_error envelope
// (the panic logged with its stack, never sent) when nothing was written,
// an aborted response when it had begun. The server keeps serving.
func TestHandlerPanic(t *testing.T) {
	e := newEnv(t, envOptions{})
	_, key := e.newUser("pete")
	mux := http.NewServeMux()
	mux.Handle("GET /panic", e.srv.handle(func(http.ResponseWriter, *http.Request) error { panic("secret boom") }))
	mux.Handle("GET /authed-panic", e.srv.authenticated(false, func(http.ResponseWriter, *http.Request) error { panic("boom behind auth") }))
	mux.Handle("GET /late-panic", e.srv.handle(func(w http.ResponseWriter, _ *http.Request) error {
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write([]byte(`{"partial":`))
		_ = http.NewResponseController(w).Flush()
		panic("boom mid-body")
	}))
	ts := httptest.NewServer(mux)
	t.Cleanup(ts.Close)
	pe := &env{t: t, url: ts.URL}
	for _, path := range []string{"/panic", "/authed-panic"} {
		body := pe.do("GET", path, key, nil).apiError(t, http.StatusInternalServerError, CodeInternal)
		if strings.Contains(body.Message, "boom") {
			t.Fatalf("the panic reached the client: %+v", body)
		}
	}
	req, _ := http.NewRequest("GET", ts.URL+"/late-panic", nil)
	if resp, err := http.DefaultClient.Do(req); err == nil {
		_, err = io.ReadAll(resp.Body)
		resp.Body.Close()
		if err == nil {
			t.Fatal("a response cut short by a panic read as complete")
		}
	}
	logs := e.logs.String()
	for _, want := range []string{"handler panicked", "secret boom", "boom behind auth", "boom mid-body", "TestHandlerPanic"} {
		if !strings.Contains(logs, want) {
			t.Fatalf("the log lacks %q:\n%s", want, logs)
		}
	}
	// The real server is unharmed.
	e.do("GET", "/health", "", nil).ok(t, http.StatusOK, nil)
}
