package gateway

import (
	"context"
	"errors"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hyphae-run/hyphae/dimension/events"
	"github.com/hyphae-run/hyphae/dimension/runner"
	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/dimension/store/sqlite"
	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/registry"
)

// process is one Run of the whole gateway, as dimension-server runs it.
type process struct {
	*env
	cancel context.CancelFunc
	done   chan error
	stderr *lockedBuffer
	once   sync.Once
	err    error
}

// testConfig is a mock-mode configuration on dataDir.
func testConfig(dataDir string) Config {
	c := defaults(func(string) string { return "" })
	c.Host, c.Port, c.Mock, c.DataDir, c.WorkerID, c.Version = "127.0.0.1", 0, true, dataDir, "test-worker", "test"
	return c
}

// startProcess runs the gateway on cfg until the test stops it.
func startProcess(t *testing.T, cfg Config) *process {
	t.Helper()
	fixture(t)
	log, logs := testLogger(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &process{cancel: cancel, done: make(chan error, 1), stderr: &lockedBuffer{}}
	ready := make(chan net.Addr, 1)
	go func() {
		p.done <- Run(ctx, cfg, RunOptions{Logger: log, Stderr: p.stderr, Listener: ln, Ready: func(a net.Addr) { ready <- a }})
	}()
	select {
	case a := <-ready:
		p.env = &env{t: t, url: "http://" + a.String(), logs: logs}
	case err := <-p.done:
		t.Fatalf("Run ended before serving: %v", err)
	case <-time.After(testTimeout):
		t.Fatal("Run did not start serving")
	}
	t.Cleanup(func() { p.stop(t) })
	return p
}

// stop cancels Run's context and waits for its graceful shutdown.
func (p *process) stop(t *testing.T) {
	t.Helper()
	p.cancel()
	p.once.Do(func() {
		select {
		case p.err = <-p.done:
		case <-time.After(testTimeout):
			p.err = errors.New("Run did not shut down")
		}
	})
	if p.err != nil {
		t.Fatalf("Run: %v", p.err)
	}
}

var keyRE = regexp.MustCompile(`dim_sk_[0-9a-f]{64}`)

// The first start of an empty store creates bootstrap-admin and prints
// its key once; later starts print nothing and the key keeps working.
func TestRunBootstrapAdminOnce(t *testing.T) {
	dir := t.TempDir()
	p := startProcess(t, testConfig(dir))
	keys := keyRE.FindAllString(p.stderr.String(), -1)
	if len(keys) != 1 {
		t.Fatalf("stderr shows %d keys:\n%s", len(keys), p.stderr.String())
	}
	var list struct{ Users []store.User }
	p.do("GET", "/admin/users", keys[0], nil).ok(t, http.StatusOK, &list)
	if len(list.Users) != 1 || list.Users[0].Name != store.BootstrapAdminName || list.Users[0].Role != store.RoleAdmin {
		t.Fatalf("users %+v", list.Users)
	}
	p.stop(t)

	p2 := startProcess(t, testConfig(dir))
	if keyRE.MatchString(p2.stderr.String()) {
		t.Fatalf("the second start printed a key:\n%s", p2.stderr.String())
	}
	p2.do("GET", "/admin/users", keys[0], nil).ok(t, http.StatusOK, &list)
	if len(list.Users) != 1 {
		t.Fatalf("users after a restart %+v", list.Users)
	}
}

// A start after a crash fails this worker's runs left pending or running
// (with a completed event for their readers), fails this worker's
// unfinished upload jobs and those with no worker (recorded before jobs
// had one), and clears the upload spool; other workers' runs and jobs, on
// a database gateways share, are not touched.
func TestRunReapsOrphans(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	if err := os.MkdirAll(filepath.Join(dir, uploadsDir), 0o700); err != nil {
		t.Fatal(err)
	}
	stale := filepath.Join(dir, uploadsDir, "upload-123")
	if err := os.WriteFile(stale, []byte("half an archive"), 0o600); err != nil {
		t.Fatal(err)
	}
	st, err := sqlite.Open(ctx, filepath.Join(dir, sqlite.DefaultFile), nil)
	if err != nil {
		t.Fatal(err)
	}
	key, _, err := st.EnsureBootstrapAdmin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	admin, _ := st.GetUserByName(ctx, store.BootstrapAdminName)
	mk := func(worker string, running bool) string {
		inv, err := st.CreateInvocation(ctx, store.Invocation{Owner: admin.ID, BundleID: "bnd_x", BundleRef: "x:latest", Mode: store.ModeAsync, WorkerID: worker})
		if err != nil {
			t.Fatal(err)
		}
		if running {
			if _, err := st.UpdateInvocation(ctx, inv.ID, store.InvocationUpdate{Status: store.StatusRunning}); err != nil {
				t.Fatal(err)
			}
		}
		return inv.ID
	}
	pending, running, foreign := mk("test-worker", false), mk("test-worker", true), mk("other-worker", true)
	mkJob := func(worker string) string {
		job, err := st.CreateBundleJob(ctx, admin.ID, worker)
		if err != nil {
			t.Fatal(err)
		}
		return job.ID
	}
	ownJob, legacyJob, foreignJob := mkJob("test-worker"), mkJob(""), mkJob("other-worker")
	st.Close()
	// The running one had begun its events before the "crash".
	evlog, err := events.Open(ctx, events.Options{StoreDir: filepath.Join(dir, natsDir)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := evlog.Append(ctx, events.Event{RunID: running, Kind: events.KindState, ContentType: "application/json", Body: []byte(`{"phase":"started"}`)}); err != nil {
		t.Fatal(err)
	}
	evlog.Close()

	p := startProcess(t, testConfig(dir))
	for _, id := range []string{pending, running} {
		var inv invocationView
		p.do("GET", "/invocations/"+id, key, nil).ok(t, http.StatusOK, &inv)
		if inv.Status != store.StatusFailed || inv.Error != reasonOrphaned || inv.CompletedAt == nil {
			t.Fatalf("orphan %+v", inv)
		}
		evs := p.openStream(key, id, "").rest(t)
		if c := completedOf(t, evs); c.Status != runner.StatusFailed || c.Reason != reasonOrphaned || c.ExitCode != -1 {
			t.Fatalf("orphan's completed %+v", c)
		}
		if id == running && (len(evs) != 2 || label(evs[0]) != "state:started") {
			t.Fatalf("orphan's events %v", kindsOf(evs))
		}
	}
	var inv invocationView
	p.do("GET", "/invocations/"+foreign, key, nil).ok(t, http.StatusOK, &inv)
	if inv.Status != store.StatusRunning {
		t.Fatalf("another worker's run became %s", inv.Status)
	}
	for _, id := range []string{ownJob, legacyJob} {
		var j store.BundleJob
		p.do("GET", "/bundles/jobs/"+id, key, nil).ok(t, http.StatusOK, &j)
		if j.Status != store.JobFailed || j.Error == "" {
			t.Fatalf("orphaned job %+v", j)
		}
	}
	var j store.BundleJob
	p.do("GET", "/bundles/jobs/"+foreignJob, key, nil).ok(t, http.StatusOK, &j)
	if j.Status != store.JobQueued || j.Error != "" || j.WorkerID != "other-worker" {
		t.Fatalf("another worker's job became %+v", j)
	}
	if _, err := os.Stat(stale); !os.IsNotExist(err) {
		t.Fatalf("stale upload: %v", err)
	}
}

// Shutdown lets a running run finish within the drain timeout, stops the
// one that does not (completed as stopped), ends both SSE streams after
// their completed event, and the rows agree after a restart.
func TestRunGracefulShutdown(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(dir)
	cfg.DrainTimeout = 5 * time.Second
	p := startProcess(t, cfg)
	key := keyRE.FindString(p.stderr.String())
	src := filepath.Join(fx.regHome, registry.ImagesDir, strings.Replace(fx.bundleDigest, ":", "-", 1)+".ext4")
	p.postMultipart("/bundles/push", key, map[string]string{"name": "bundle"}, map[string]string{"file": src}).ok(t, http.StatusCreated, nil)

	gate := filepath.Join(t.TempDir(), "gate")
	finishing := p.startRun(key, "bundle", map[string]string{"mode": "gate", "gate": gate})
	sleeping := p.startRun(key, "bundle", map[string]string{"mode": "sleep"})
	fs := p.openStream(key, finishing, "")
	fs.waitFor(t, func(ev events.Event) bool { return ev.Kind == "tick" && string(ev.Body) == "3" })
	ss := p.openStream(key, sleeping, "")
	ss.waitFor(t, isKind("sleeping"))

	p.cancel()
	if err := os.WriteFile(gate, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if c := completedOf(t, fs.rest(t)); c.Status != runner.StatusCompleted {
		t.Fatalf("the finishing run: %+v", c)
	}
	if c := completedOf(t, ss.rest(t)); c.Status != runner.StatusStopped {
		t.Fatalf("the sleeping run: %+v", c)
	}
	p.stop(t)

	// After a restart the rows agree with the events.
	p2 := startProcess(t, cfg)
	for id, want := range map[string]store.Status{finishing: store.StatusCompleted, sleeping: store.StatusStopped} {
		var inv invocationView
		p2.do("GET", "/invocations/"+id, key, nil).ok(t, http.StatusOK, &inv)
		if inv.Status != want {
			t.Fatalf("%s is %s, want %s", id, inv.Status, want)
		}
	}
}

// The event log's retention settings reach the stream: the log reports
// the limits the NATS server holds for it.
func TestRunEventRetention(t *testing.T) {
	cfg := testConfig(t.TempDir())
	cfg.EventRetention, cfg.EventMaxBytes = 36*time.Hour, 64<<20
	p := startProcess(t, cfg)
	p.stop(t)
	logs := p.logs.String()
	for _, want := range []string{"msg=\"event log open\"", "max_age=36h0m0s", "max_bytes=67108864"} {
		if !strings.Contains(logs, want) {
			t.Fatalf("the gateway log lacks %q:\n%s", want, logs)
		}
	}
}

// A second gateway on a data dir in use is refused before it reaps
// anything (it would take the first one's live runs for a dead
// predecessor's); once the first has stopped, the dir is free again.
func TestRunRefusesABusyDataDir(t *testing.T) {
	cfg := testConfig(t.TempDir())
	first := startProcess(t, cfg)
	log, _ := testLogger(t)
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	err := Run(ctx, cfg, RunOptions{Logger: log, Stderr: &lockedBuffer{}, Ready: func(net.Addr) { t.Error("the second gateway served") }})
	if !errcode.HasCode(err, errcode.InUse) || !strings.Contains(err.Error(), strconv.Itoa(os.Getpid())) {
		t.Fatalf("second Run on the same data dir: %v, want %s naming the holder's pid", err, errcode.InUse)
	}
	if r := first.do(http.MethodGet, "/health", "", nil); r.status != http.StatusOK || !strings.Contains(string(r.body), `"ok"`) {
		t.Errorf("first gateway's health after the refused start: %d %s", r.status, r.body)
	}
	first.stop(t)
	startProcess(t, cfg)
}
