package gateway

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"mime/multipart"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/hyphae-run/hyphae/archive/archivetest"
	"github.com/hyphae-run/hyphae/dimension/events"
	"github.com/hyphae-run/hyphae/dimension/runner"
	"github.com/hyphae-run/hyphae/dimension/sse"
	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/dimension/store/postgres"
	"github.com/hyphae-run/hyphae/dimension/store/sqlite"
	"github.com/hyphae-run/hyphae/guestbin"
	"github.com/hyphae-run/hyphae/image"
	"github.com/hyphae-run/hyphae/internal/testenv"
	"github.com/hyphae-run/hyphae/registry"
)

// testTimeout bounds every wait of a test, so a bug fails instead of
// hanging; it is never what a test asserts.
const testTimeout = 2 * time.Minute

// The shared fixture: guest binaries, the example and behaviour bundles
// built static, their `docker save` archives, and a registry holding both
// imported with the agent. Built once per test binary (mkfs and go build
// are the slow parts).
var fx struct {
	once sync.Once
	err  error
	dir  string
	// regHome is the registry holding the two images.
	regHome string
	// echoArchive holds examples/echo-go, bundleArchive testdata/bundle.
	echoArchive, bundleArchive string
	echoDigest, bundleDigest   string
}

func TestMain(m *testing.M) {
	code := m.Run()
	if fx.dir != "" {
		os.RemoveAll(fx.dir)
	}
	os.Exit(code)
}

// fixture builds the shared fixture on first use.
func fixture(t *testing.T) {
	t.Helper()
	testenv.RequiresTool(t, "mkfs.ext4")
	testenv.RequiresTool(t, "debugfs")
	fx.once.Do(func() { fx.err = buildFixture(t) })
	if fx.err != nil {
		t.Fatalf("building the test fixture: %v", fx.err)
	}
}

func buildFixture(t *testing.T) error {
	root := testenv.ModuleRoot(t)
	dir, err := os.MkdirTemp("", "gateway-test-")
	if err != nil {
		return err
	}
	fx.dir = dir
	libexec := filepath.Join(dir, "libexec")
	build := func(out, pkgDir, pkg string) error {
		cmd := exec.Command("go", "build", "-trimpath", "-o", out, pkg)
		cmd.Dir = pkgDir
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if b, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("go build %s: %v\n%s", pkg, err, b)
		}
		return nil
	}
	for _, n := range []string{"hyphae-init", "dimension-agent"} {
		if err := build(filepath.Join(libexec, n), root, "./cmd/"+n); err != nil {
			return err
		}
	}
	// The guest binaries are found through HYPHAE_LIBEXEC by image imports
	// and by the mock backend, in every test of this binary.
	os.Setenv(guestbin.EnvLibexec, libexec)
	echoBin, bundleBin := filepath.Join(dir, "echo-go"), filepath.Join(dir, "bundle")
	if err := build(echoBin, filepath.Join(root, "examples", "echo-go"), "."); err != nil {
		return err
	}
	if err := build(bundleBin, root, "./dimension/gateway/testdata/bundle"); err != nil {
		return err
	}
	fx.echoArchive = filepath.Join(dir, "echo.tar")
	fx.bundleArchive = filepath.Join(dir, "bundle.tar")
	if err := writeArchive(fx.echoArchive, echoBin, "/bin/echo-go"); err != nil {
		return err
	}
	if err := writeArchive(fx.bundleArchive, bundleBin, "/bin/bundle"); err != nil {
		return err
	}
	fx.regHome = filepath.Join(dir, "hyphae")
	ctx := context.Background()
	reg, err := registry.Open(ctx, fx.regHome, nil)
	if err != nil {
		return err
	}
	defer reg.Close()
	b := image.Builder{Store: reg}
	for _, a := range []struct {
		path, name string
		digest     *string
	}{{fx.echoArchive, "echo", &fx.echoDigest}, {fx.bundleArchive, "bundle", &fx.bundleDigest}} {
		res, err := b.Import(ctx, image.ImportOptions{Archive: a.path, Name: a.name, WithAgent: true})
		if err != nil {
			return fmt.Errorf("importing %s: %w", a.name, err)
		}
		*a.digest = res.Digest
	}
	return nil
}

// writeArchive writes a one-layer docker save archive holding the program
// bin at path, which is also its entrypoint.
func writeArchive(out, bin, path string) error {
	data, err := os.ReadFile(bin)
	if err != nil {
		return err
	}
	return archivetest.Write(out, archivetest.Spec{
		Layers: [][]archivetest.Entry{{
			{Name: "bin/"},
			{Name: strings.TrimPrefix(path, "/"), Mode: 0o755, Body: string(data)},
		}},
		Config: v1.Config{Entrypoint: []string{path}, Env: []string{"PATH=/bin"}},
	})
}

// envOptions vary a test gateway.
type envOptions struct {
	maxConcurrent int
	token         string
	// freshRegistry gives the gateway an empty registry instead of the
	// fixture's.
	freshRegistry bool
	maxBody       int64
	maxUpload     int64
	// databaseURL selects PostgreSQL.
	databaseURL string
	workerID    string
	// metricsPublic serves /metrics without an API key.
	metricsPublic bool
	// limits are the run timeouts' defaults and maxima (zero: runner's).
	limits runner.Limits
}

// env is one gateway under test: a real SQLite (or PostgreSQL) store, a
// real embedded event log, the fixture's registry and the real runner on
// its mock backend, behind an httptest server.
type env struct {
	t      *testing.T
	url    string
	st     store.Store
	events *events.Log
	reg    *registry.Registry
	run    *runner.Runner
	srv    *Server
	// adminKey is the bootstrap admin's key.
	adminKey string
	logs     *lockedBuffer
}

// testLogger returns a logger writing to buf (shown when a test fails).
func testLogger(t *testing.T) (*slog.Logger, *lockedBuffer) {
	buf := &lockedBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("gateway log:\n%s", buf.String())
		}
	})
	return slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelInfo})), buf
}

// lockedBuffer is a bytes.Buffer safe for the handler's concurrent writes.
type lockedBuffer struct {
	mu sync.Mutex
	bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.Buffer.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.Buffer.String()
}

func newEnv(t *testing.T, o envOptions) *env {
	t.Helper()
	fixture(t)
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	log, logs := testLogger(t)
	dir := t.TempDir()
	var st store.Store
	var err error
	if o.databaseURL != "" {
		st, err = postgres.Open(ctx, o.databaseURL, log)
	} else {
		st, err = sqlite.Open(ctx, filepath.Join(dir, "dimension.db"), log)
	}
	if err != nil {
		t.Fatal(err)
	}
	key, created, err := st.EnsureBootstrapAdmin(ctx)
	if err != nil || !created {
		t.Fatalf("bootstrap admin: created=%v err=%v", created, err)
	}
	evlog, err := events.Open(ctx, events.Options{StoreDir: filepath.Join(dir, "nats"), Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	home := fx.regHome
	if o.freshRegistry {
		home = filepath.Join(dir, "hyphae")
	}
	reg, err := registry.Open(ctx, home, log)
	if err != nil {
		t.Fatal(err)
	}
	backend, err := runner.NewMockBackend(runner.MockOptions{WorkDir: filepath.Join(dir, "mock"), Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	if o.workerID == "" {
		o.workerID = "test-worker"
	}
	metrics := NewMetrics()
	counted := metrics.CountEvents(evlog)
	run, err := runner.New(runner.Options{
		Backend: backend, Events: counted, Store: st, MaxConcurrent: o.maxConcurrent, WorkerID: o.workerID,
		StopGrace: 2 * time.Second, Limits: o.limits, Logger: log,
	})
	if err != nil {
		t.Fatal(err)
	}
	uploads := filepath.Join(dir, "uploads")
	if err := os.Mkdir(uploads, 0o700); err != nil {
		t.Fatal(err)
	}
	srv, err := New(Options{
		Store: st, Events: counted, Runner: run, Images: reg, Token: o.token, WorkerID: o.workerID,
		Limits: o.limits, MaxConcurrent: o.maxConcurrent, MaxBodyBytes: o.maxBody, MaxUploadBytes: o.maxUpload,
		UploadDir: uploads, Version: "test", Logger: log, Metrics: metrics, MetricsPublic: o.metricsPublic,
	})
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(srv)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
		defer cancel()
		srv.BeginDrain()
		run.Drain(ctx)
		srv.Wait(ctx)
		ts.CloseClientConnections()
		ts.Close()
		backend.Close()
		reg.Close()
		evlog.Close()
		st.Close()
	})
	return &env{t: t, url: ts.URL, st: st, events: evlog, reg: reg, run: run, srv: srv, adminKey: key, logs: logs}
}

// response is a finished HTTP exchange.
type response struct {
	status int
	header http.Header
	body   []byte
}

// do sends a request with an optional bearer key; body is sent as is when
// it is a []byte or string, else as JSON.
func (e *env) do(method, path, key string, body any) response {
	e.t.Helper()
	var rd io.Reader
	ct := ""
	switch b := body.(type) {
	case nil:
	case []byte:
		rd, ct = bytes.NewReader(b), "application/json"
	case string:
		rd, ct = strings.NewReader(b), "application/json"
	default:
		data, err := json.Marshal(b)
		if err != nil {
			e.t.Fatal(err)
		}
		rd, ct = bytes.NewReader(data), "application/json"
	}
	req, err := http.NewRequest(method, e.url+path, rd)
	if err != nil {
		e.t.Fatal(err)
	}
	if ct != "" {
		req.Header.Set("Content-Type", ct)
	}
	return e.send(req, key)
}

func (e *env) send(req *http.Request, key string) response {
	e.t.Helper()
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	ctx, cancel := context.WithTimeout(req.Context(), testTimeout)
	defer cancel()
	resp, err := http.DefaultClient.Do(req.WithContext(ctx))
	if err != nil {
		e.t.Fatalf("%s %s: %v", req.Method, req.URL.Path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		e.t.Fatalf("%s %s: reading the body: %v", req.Method, req.URL.Path, err)
	}
	return response{status: resp.StatusCode, header: resp.Header, body: data}
}

// ok decodes a response of the wanted status into out (when not nil).
func (r response) ok(t *testing.T, status int, out any) {
	t.Helper()
	if r.status != status {
		t.Fatalf("status %d, want %d; body %s", r.status, status, r.body)
	}
	if out != nil {
		if err := json.Unmarshal(r.body, out); err != nil {
			t.Fatalf("decoding %s: %v", r.body, err)
		}
	}
}

// apiError checks that the response is the error envelope with status and
// code, and returns it.
func (r response) apiError(t *testing.T, status int, code string) envelopeBody {
	t.Helper()
	if r.status != status {
		t.Fatalf("status %d, want %d; body %s", r.status, status, r.body)
	}
	if ct := r.header.Get("Content-Type"); ct != "application/json" {
		t.Fatalf("error Content-Type %q", ct)
	}
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(r.body, &raw); err != nil || len(raw) != 1 || raw["error"] == nil {
		t.Fatalf("not an error envelope: %s", r.body)
	}
	var body map[string]json.RawMessage
	if err := json.Unmarshal(raw["error"], &body); err != nil {
		t.Fatalf("not an error envelope: %s", r.body)
	}
	for _, k := range []string{"code", "message", "details"} {
		if _, ok := body[k]; !ok {
			t.Fatalf("envelope without %q: %s", k, r.body)
		}
	}
	var env envelope
	if err := json.Unmarshal(r.body, &env); err != nil {
		t.Fatal(err)
	}
	if env.Error.Code != code {
		t.Fatalf("error code %q, want %q; body %s", env.Error.Code, code, r.body)
	}
	if env.Error.Message == "" {
		t.Fatalf("empty error message: %s", r.body)
	}
	return env.Error
}

// newUser creates a user through the admin API and returns it with its
// key.
func (e *env) newUser(name string) (store.User, string) {
	e.t.Helper()
	var out userWithKey
	e.do("POST", "/admin/users", e.adminKey, map[string]string{"name": name}).ok(e.t, http.StatusCreated, &out)
	return *out.User, out.APIKey
}

// seedBundle points owner's name:latest at one of the fixture's images.
func (e *env) seedBundle(owner, name, digest string, m store.Manifest) store.Bundle {
	e.t.Helper()
	b, err := e.st.PutBundle(context.Background(), store.Bundle{Owner: owner, Name: name, Tag: "latest", ImageDigest: digest, Manifest: m})
	if err != nil {
		e.t.Fatal(err)
	}
	return b
}

// startRun starts an async run and returns its invocation id.
func (e *env) startRun(key, bundleRef string, payload any) string {
	e.t.Helper()
	var acc runAccepted
	e.do("POST", "/run", key, map[string]any{"bundle_id": bundleRef, "mode": "async", "payload": payload}).
		ok(e.t, http.StatusAccepted, &acc)
	if acc.Status != store.StatusPending || acc.EventsURL != "/runs/"+acc.InvocationID+"/events" {
		e.t.Fatalf("async answer %+v", acc)
	}
	return acc.InvocationID
}

// stream is an open SSE response.
type stream struct {
	resp *http.Response
	rd   *sse.Reader
}

// openStream opens GET /runs/{id}/events, resuming after lastID when it is
// not empty.
func (e *env) openStream(key, id, lastID string) *stream {
	e.t.Helper()
	req, err := http.NewRequest("GET", e.url+"/runs/"+id+"/events", nil)
	if err != nil {
		e.t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+key)
	if lastID != "" {
		req.Header.Set("Last-Event-ID", lastID)
	}
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	e.t.Cleanup(cancel)
	resp, err := http.DefaultClient.Do(req.WithContext(ctx))
	if err != nil {
		e.t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "text/event-stream" {
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		e.t.Fatalf("events: status %d %s: %s", resp.StatusCode, resp.Header.Get("Content-Type"), body)
	}
	s := &stream{resp: resp, rd: sse.NewReader(resp.Body)}
	e.t.Cleanup(s.close)
	return s
}

func (s *stream) close() { s.resp.Body.Close() }

// next returns the stream's next event (comments skipped), parsed.
func (s *stream) next(t *testing.T) (events.Event, error) {
	t.Helper()
	for {
		f, err := s.rd.Next()
		if err != nil {
			return events.Event{}, err
		}
		if f.IsComment() {
			continue
		}
		seq, err := strconv.ParseUint(f.ID, 10, 64)
		if err != nil {
			t.Fatalf("frame id %q: %v", f.ID, err)
		}
		ev, err := events.ParseData(seq, f.Event, []byte(f.Data))
		if err != nil {
			t.Fatalf("frame data %q: %v", f.Data, err)
		}
		return ev, nil
	}
}

// rest reads events until the stream ends, which must be right after the
// completed event.
func (s *stream) rest(t *testing.T) []events.Event {
	t.Helper()
	var evs []events.Event
	for {
		ev, err := s.next(t)
		if err == io.EOF {
			if len(evs) == 0 || !evs[len(evs)-1].IsCompleted() {
				t.Fatalf("stream ended without a completed event: %v", kindsOf(evs))
			}
			return evs
		}
		if err != nil {
			t.Fatalf("reading the stream after %v: %v", kindsOf(evs), err)
		}
		evs = append(evs, ev)
	}
}

// kindsOf lists events as kind or state phase, for messages and
// comparisons.
func kindsOf(evs []events.Event) []string {
	var out []string
	for _, ev := range evs {
		out = append(out, label(ev))
	}
	return out
}

func label(ev events.Event) string {
	if ev.Kind == events.KindState {
		var b struct {
			Phase string `json:"phase"`
		}
		_ = json.Unmarshal(ev.Body, &b)
		return "state:" + b.Phase
	}
	return ev.Kind
}

// completedBody decodes a completed event's body.
type completedBody struct {
	Phase      string `json:"phase"`
	Status     string `json:"status"`
	ExitCode   int    `json:"exit_code"`
	DurationMs int64  `json:"duration_ms"`
	Reason     string `json:"reason"`
}

func completedOf(t *testing.T, evs []events.Event) completedBody {
	t.Helper()
	if len(evs) == 0 || !evs[len(evs)-1].IsCompleted() {
		t.Fatalf("no completed event at the end of %v", kindsOf(evs))
	}
	var c completedBody
	if err := json.Unmarshal(evs[len(evs)-1].Body, &c); err != nil {
		t.Fatal(err)
	}
	return c
}

// waitFor waits for ev to appear in the stream, returning everything read
// up to and including it.
func (s *stream) waitFor(t *testing.T, what func(events.Event) bool) []events.Event {
	t.Helper()
	var evs []events.Event
	for {
		ev, err := s.next(t)
		if err != nil {
			t.Fatalf("stream ended (%v) before the awaited event; got %v", err, kindsOf(evs))
		}
		evs = append(evs, ev)
		if what(ev) {
			return evs
		}
	}
}

func isKind(kind string) func(events.Event) bool {
	return func(ev events.Event) bool { return ev.Kind == kind }
}

// multipartBody builds a multipart/form-data body: fields as text parts,
// files (field → path) as file parts.
func multipartBody(t *testing.T, fields map[string]string, files map[string]string) (io.Reader, string) {
	t.Helper()
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	for k, v := range fields {
		if err := mw.WriteField(k, v); err != nil {
			t.Fatal(err)
		}
	}
	for field, path := range files {
		w, err := mw.CreateFormFile(field, filepath.Base(path))
		if err != nil {
			t.Fatal(err)
		}
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		_, err = io.Copy(w, f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := mw.Close(); err != nil {
		t.Fatal(err)
	}
	return &buf, mw.FormDataContentType()
}

// postMultipart sends a multipart body to path.
func (e *env) postMultipart(path, key string, fields, files map[string]string) response {
	e.t.Helper()
	body, ct := multipartBody(e.t, fields, files)
	req, err := http.NewRequest("POST", e.url+path, body)
	if err != nil {
		e.t.Fatal(err)
	}
	req.Header.Set("Content-Type", ct)
	return e.send(req, key)
}

func discard() *slog.Logger { return slog.New(slog.DiscardHandler) }

func contextWithTestTimeout() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), testTimeout)
}

// tick paces polling loops.
func tick() <-chan time.Time { return time.After(10 * time.Millisecond) }

// finalInvocation waits until the run's row has its final status. The
// runner appends the completed event before it updates the row, so a
// reader that saw completed may briefly still read running.
func (e *env) finalInvocation(key, id string) invocationView {
	e.t.Helper()
	ctx, cancel := contextWithTestTimeout()
	defer cancel()
	for {
		var inv invocationView
		e.do("GET", "/invocations/"+id, key, nil).ok(e.t, http.StatusOK, &inv)
		if inv.Status.Final() {
			return inv
		}
		select {
		case <-ctx.Done():
			e.t.Fatalf("invocation %s still %s", id, inv.Status)
		case <-tick():
		}
	}
}
