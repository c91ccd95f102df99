package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/hyphae-run/hyphae/archive/archivetest"
	"github.com/hyphae-run/hyphae/internal/testenv"
	"github.com/hyphae-run/hyphae/kernel/kerneltest"
	"github.com/hyphae-run/hyphae/registry"
)

// floodEvents is how many events the flooding bundle sends.
const floodEvents = 20000

// badConnections is how many events connections the flooding bundle ruins
// with a bad frame (e2e/testdata/dimbundle).
const badConnections = 6

// TestDimension runs the real dimension-server (SQLite, embedded NATS) with
// microVMs under QEMU (TCG here) and drives it over HTTP only: bundles
// uploaded as a docker-save archive (echo-go, an import job) and pushed as
// ext4 images built by hyphae build --with-agent (echo-js, the test's
// dimbundle); sync runs; an async run's SSE stream in order; resuming with
// Last-Event-ID after the end and in the middle of a live run; non-zero
// exit, timeout and stop statuses; a bundle that floods events and writes
// bad frames while another run and /health go on; and afterwards nothing
// running and nothing left. Seven VM boots.
func TestDimension(t *testing.T) {
	e := setup(t)
	testenv.RequiresTool(t, "npm")
	testenv.RequiresTool(t, "node")
	kern := kerneltest.Path(t)
	bins := dimBinaries(t, e)
	// hyphae build --with-agent finds dimension-agent here.
	t.Setenv("HYPHAE_LIBEXEC", bins.dir)
	s := startDimension(t, e, bins, kern)

	// The upload's import job runs while the other images are built.
	tarPath := filepath.Join(t.TempDir(), "echo-go.tar")
	echoBody, err := os.ReadFile(bins.echoGo)
	if err != nil {
		t.Fatal(err)
	}
	err = archivetest.Write(tarPath, archivetest.Spec{
		Layout: archivetest.OCI, Gzip: true, DockerManifest: true,
		Layers: [][]archivetest.Entry{{{Name: "bin/"}, {Name: "bin/echo-go", Mode: 0o755, Body: string(echoBody)}}},
		Config: v1.Config{Entrypoint: []string{"/bin/echo-go"}, Env: []string{"PATH=/bin"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	var job struct {
		JobID  string `json:"job_id"`
		Status string `json:"status"`
		JobURL string `json:"job_url"`
	}
	s.postFile("/bundles/upload", map[string]string{"name": "echo-go", "tag": "v1"}, "image", tarPath).
		expect(t, "upload echo-go", http.StatusAccepted, &job)
	if job.JobID == "" || job.JobURL != "/bundles/jobs/"+job.JobID {
		t.Fatalf("upload accepted as %+v", job)
	}

	jsImage := buildEchoJS(t, e)
	dimImage := hyphaeImage(t, e, "build", "--binary", bins.dimbd, "--name", "dimbundle", "--with-agent")
	var jsBundle, dimBundle bundleBody
	s.postFile("/bundles/push", map[string]string{"name": "echo-js", "manifest": `{"memory_mib":512}`}, "file", jsImage).
		expect(t, "push echo-js", http.StatusCreated, &jsBundle)
	s.postFile("/bundles/push", map[string]string{"name": "dimbundle"}, "file", dimImage).
		expect(t, "push dimbundle", http.StatusCreated, &dimBundle)
	if jsBundle.Name != "echo-js" || jsBundle.Tag != registry.DefaultTag || jsBundle.ImageDigest != "sha256:"+testenv.FileSHA256(t, jsImage) {
		t.Fatalf("pushed echo-js = %+v, want its file's sha256", jsBundle)
	}
	goBundle := awaitJob(t, s, job.JobID)
	if goBundle.Name != "echo-go" || goBundle.Tag != "v1" {
		t.Fatalf("imported bundle = %+v", goBundle)
	}
	var list struct {
		Bundles []bundleBody `json:"bundles"`
	}
	s.get("/bundles", http.StatusOK, &list)
	if len(list.Bundles) != 3 {
		t.Fatalf("GET /bundles = %+v, want the three bundles", list.Bundles)
	}

	t.Run("sync echo-go", func(t *testing.T) {
		payload := `{"msg":"hello from e2e","list":[1,2,3]}`
		res := syncRun(t, s, "echo-go:v1", payload, http.StatusOK)
		if res.Status != "completed" || res.ExitCode != 0 || res.Stdout != payload {
			t.Fatalf("sync run = %+v, want completed, exit 0, stdout %s", res, payload)
		}
		checkInvocation(t, s, res.InvocationID, goBundle.ID, "sync", "completed", 0)
	})

	var goRun []sseFrame
	t.Run("async echo-go events", func(t *testing.T) {
		payload := json.RawMessage(`{"msg":"async","n":7}`)
		id := s.startAsync("echo-go:v1", payload)
		goRun = s.openEvents(t, id, "").rest()
		checkIDs(t, goRun, 1, id)
		checkEchoEvents(t, goRun, string(payload), "go", fmt.Sprintf("echo-go: echoed %d bytes", len(payload)))
		for _, f := range goRun {
			if f.ev.BundleID != goBundle.ID || f.ev.UserID == "" || f.ev.UserID != goRun[0].ev.UserID || f.ev.WorkerID != "e2e-worker" {
				t.Fatalf("event %s: bundle %q user %q worker %q", f.ID, f.ev.BundleID, f.ev.UserID, f.ev.WorkerID)
			}
		}
		started := stateOf(t, goRun[0])
		if started.VMM != "qemu" || started.Mock == nil || *started.Mock {
			t.Fatalf("started = %s, want vmm qemu, mock false", goRun[0].ev.Body)
		}
		checkInvocation(t, s, id, goBundle.ID, "async", "completed", 0)

		// Resuming a finished run replays exactly the rest, the same
		// frames; after the last one there is nothing, and 204 says so.
		n := len(goRun)
		for _, k := range []int{0, 1, 4, n - 1} {
			got := s.openEvents(t, id, strconv.Itoa(k)).rest()
			sameFrames(t, fmt.Sprintf("resume after %d of %d", k, n), got, goRun[k:])
		}
		if st := s.eventsStatus(t, id, strconv.Itoa(n)); st != http.StatusNoContent {
			t.Fatalf("resume after the last event: status %d, want 204", st)
		}
	})

	t.Run("another user's run is not found", func(t *testing.T) {
		if len(goRun) == 0 {
			t.Skip("no async run")
		}
		var u struct {
			APIKey string `json:"api_key"`
		}
		s.postJSON("/admin/users", map[string]string{"name": "stranger"}).expect(t, "create a user", http.StatusCreated, &u)
		id := goRun[0].ev.RunID
		for _, r := range []struct{ method, path string }{
			{"GET", "/runs/" + id + "/events"}, {"GET", "/invocations/" + id}, {"POST", "/run/" + id + "/stop"},
			{"GET", "/bundles/" + goBundle.ID}, {"GET", "/bundles/jobs/" + job.JobID},
		} {
			s.doAs(u.APIKey, r.method, r.path, "", nil).expect(t, "stranger "+r.method+" "+r.path, http.StatusNotFound, nil)
		}
		res := s.doAs(u.APIKey, "POST", "/run", "application/json", strings.NewReader(`{"bundle_id":"echo-go:v1"}`))
		res.expect(t, "stranger runs another's bundle", http.StatusNotFound, nil)
	})

	t.Run("non-zero exit", func(t *testing.T) {
		payload := `{"exit_code":3}`
		res := syncRun(t, s, "echo-go:v1", payload, http.StatusOK)
		if res.Status != "failed" || res.ExitCode != 3 || res.Stdout != payload {
			t.Fatalf("sync run = %+v, want failed, exit 3, stdout %s", res, payload)
		}
		evs := s.openEvents(t, res.InvocationID, "").rest()
		checkIDs(t, evs, 1, res.InvocationID)
		exited, done := stateOf(t, evs[len(evs)-2]), stateOf(t, evs[len(evs)-1])
		if exited.Phase != "process_exited" || exited.ExitCode == nil || *exited.ExitCode != 3 {
			t.Fatalf("process_exited = %s", evs[len(evs)-2].ev.Body)
		}
		if done.Status != "failed" || done.ExitCode == nil || *done.ExitCode != 3 || done.DurationMs == nil {
			t.Fatalf("completed = %s, want failed with exit_code 3", evs[len(evs)-1].ev.Body)
		}
		checkInvocation(t, s, res.InvocationID, goBundle.ID, "sync", "failed", 3)
	})

	t.Run("timeout", func(t *testing.T) {
		r := s.postJSON("/run", map[string]any{"bundle_id": "dimbundle", "payload": map[string]string{"mode": "sleep"}, "timeout_secs": 3})
		var env struct {
			Error struct {
				Code    string    `json:"code"`
				Details runResult `json:"details"`
			} `json:"error"`
		}
		r.expect(t, "sync run with timeout_secs 3", http.StatusGatewayTimeout, &env)
		res := env.Error.Details
		if env.Error.Code != "gateway_timeout" || res.Status != "timed_out" || res.InvocationID == "" {
			t.Fatalf("timed-out run answered %s", r.body)
		}
		evs := s.openEvents(t, res.InvocationID, "").rest()
		checkIDs(t, evs, 1, res.InvocationID)
		if !slices.Contains(labelsOf(evs), "sleeping") {
			t.Fatalf("the bundle never ran before the timeout: %v", labelsOf(evs))
		}
		if done := stateOf(t, evs[len(evs)-1]); done.Status != "timed_out" || done.DurationMs == nil {
			t.Fatalf("completed = %s, want timed_out", evs[len(evs)-1].ev.Body)
		}
		checkInvocation(t, s, res.InvocationID, dimBundle.ID, "sync", "timed_out", -1)
	})

	t.Run("stop with a mid-stream resume", func(t *testing.T) {
		id := s.startAsync("dimbundle", map[string]string{"mode": "sleep"})
		whole := s.openEvents(t, id, "")
		// A second reader drops its connection mid-run and resumes after
		// the second tick, while the run is still sleeping.
		first := s.openEvents(t, id, "")
		seen := first.until(func(f sseFrame) bool { return f.ev.Kind == "sleeping" })
		first.close()
		var k uint64
		for _, f := range seen {
			if f.ev.Kind == "tick" && string(f.ev.Body) == "2" {
				k = f.ev.Seq
			}
		}
		if k == 0 {
			t.Fatalf("no tick 2 before sleeping: %v", labelsOf(seen))
		}
		resumed := s.openEvents(t, id, strconv.FormatUint(k, 10))
		// Stopped only once the resumed stream is open, so that the
		// resume is certainly in the middle of the live run.
		var stopping struct {
			InvocationID string `json:"invocation_id"`
			Status       string `json:"status"`
		}
		s.do("POST", "/run/"+id+"/stop", "", nil).expect(t, "stop", http.StatusAccepted, &stopping)
		if stopping.InvocationID != id || stopping.Status != "stopping" {
			t.Fatalf("stop answered %+v", stopping)
		}
		all := whole.rest()
		rest := resumed.rest()
		checkIDs(t, all, 1, id)
		sameFrames(t, "resumed mid-stream", rest, all[k:])
		sameFrames(t, "dropped reader's part", seen, all[:len(seen)])
		labels := labelsOf(all)
		want := []string{"state:started", "state:payload_delivered", "tick", "tick", "tick", "sleeping", "stderr", "stdout-final", "state:process_exited", "state:completed"}
		if !reflect.DeepEqual(labels, want) {
			t.Fatalf("events %v, want %v", labels, want)
		}
		if string(all[6].ev.Body) != "dimbundle: got SIGTERM" {
			t.Fatalf("stderr %q: the bundle was not stopped gracefully", all[6].ev.Body)
		}
		if ex := stateOf(t, all[8]); ex.ExitCode == nil || *ex.ExitCode != 42 {
			t.Fatalf("process_exited = %s, want exit_code 42", all[8].ev.Body)
		}
		if done := stateOf(t, all[9]); done.Status != "stopped" || done.DurationMs == nil {
			t.Fatalf("completed = %s, want stopped", all[9].ev.Body)
		}
		checkInvocation(t, s, id, dimBundle.ID, "async", "stopped", 42)
		s.do("POST", "/run/"+id+"/stop", "", nil).expect(t, "stopping a stopped run", http.StatusConflict, nil)
	})

	t.Run("flood and bad frames beside a normal run", func(t *testing.T) {
		id := s.startAsync("dimbundle", map[string]any{"mode": "abuse", "n": floodEvents})
		flood := s.openEvents(t, id, "")
		var (
			wg        sync.WaitGroup
			floodEvs  []sseFrame
			floodErr  error
			stopPolls = make(chan struct{})
			health    struct {
				polls, maxRunning int
				failures          []string
			}
		)
		wg.Add(2)
		go func() {
			defer wg.Done()
			floodEvs, floodErr = flood.readAll()
		}()
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stopPolls:
					return
				case <-time.After(200 * time.Millisecond):
				}
				h, err := s.health()
				if err != nil {
					health.failures = append(health.failures, err.Error())
					continue
				}
				health.polls++
				health.maxRunning = max(health.maxRunning, h.RunningVMs)
			}
		}()
		// The normal run boots while the flooding one is running.
		payload := `{"msg":"beside the flood","emoji":"🍄"}`
		res := syncRun(t, s, "echo-js", payload, http.StatusOK)
		jsDone := time.Now()
		close(stopPolls)
		wg.Wait()
		if res.Status != "completed" || res.ExitCode != 0 || res.Stdout != payload {
			t.Fatalf("the normal run beside the flood = %+v", res)
		}
		jsEvs := s.openEvents(t, res.InvocationID, "").rest()
		checkIDs(t, jsEvs, 1, res.InvocationID)
		checkEchoEvents(t, jsEvs, payload, "js", fmt.Sprintf("echo-js: echoed %d bytes", len(payload)))
		if len(health.failures) > 0 || health.polls == 0 {
			t.Fatalf("/health during the flood: %d answers, failures %v", health.polls, health.failures)
		}

		if floodErr != nil {
			t.Fatalf("the flooding run's stream: %v", floodErr)
		}
		checkIDs(t, floodEvs, 1, id)
		checkFloodEvents(t, floodEvs)
		var ticks []int64
		for _, f := range floodEvs {
			if f.ev.Kind == "tick" {
				ticks = append(ticks, f.ev.TsMs)
			}
		}
		last := floodEvs[len(floodEvs)-1]
		t.Logf("flood: %d events, %d ticks in %d ms, run %d ms; echo-js finished %s before the flood's end; /health answered %d times (up to %d VMs running)",
			len(floodEvs), len(ticks), ticks[len(ticks)-1]-ticks[0], *stateOf(t, last).DurationMs,
			time.UnixMilli(last.ev.TsMs).Sub(jsDone).Round(time.Millisecond), health.polls, health.maxRunning)
		checkInvocation(t, s, id, dimBundle.ID, "async", "completed", 0)
	})

	// Nothing runs any more and nothing is left: the count is 0 once the
	// runs have torn down, and after a graceful exit no VMM process or
	// runtime directory remains.
	var h healthBody
	for deadline := time.Now().Add(dimRequestTimeout); ; time.Sleep(100 * time.Millisecond) {
		s.get("/health", http.StatusOK, &h)
		if h.RunningVMs == 0 || time.Now().After(deadline) {
			break
		}
	}
	if h.RunningVMs != 0 || h.Status != "ok" {
		t.Errorf("health after the runs = %+v, want nothing running", h)
	}
	// Each run tore its VM down itself, before the gateway stops.
	if pids := qemuProcesses(s.dir); len(pids) > 0 {
		t.Errorf("qemu processes left by the runs: %v", pids)
	}
	if left := dirsIn(s.rtDir); len(left) > 0 {
		t.Errorf("runtime dirs left by the runs: %v", left)
	}
	s.stop()
	if pids := qemuProcesses(s.dir); len(pids) > 0 {
		t.Errorf("qemu processes of the gateway still running: %v", pids)
	}
	if left := dirsIn(s.rtDir); len(left) > 0 {
		t.Errorf("runtime dirs left: %v", left)
	}
	if left, _ := os.ReadDir(filepath.Join(s.data, "uploads")); len(left) > 0 {
		t.Errorf("upload spool files left: %v", left)
	}
	if left, _ := filepath.Glob(filepath.Join(s.data, "hyphae", "images", registry.TempPrefix+"*")); len(left) > 0 {
		t.Errorf("push temp files left: %v", left)
	}
}

// buildEchoJS builds examples/echo-js with the agent from a copy of it and
// the SDK it installs (npm install --offline: the SDK is a file:
// dependency), so the source tree gets no node_modules.
func buildEchoJS(t *testing.T, e *env) string {
	t.Helper()
	root := testenv.ModuleRoot(t)
	tree := t.TempDir()
	for _, d := range []string{"examples/echo-js", "sdk/js"} {
		if err := os.CopyFS(filepath.Join(tree, d), os.DirFS(filepath.Join(root, d))); err != nil {
			t.Fatal(err)
		}
	}
	project := filepath.Join(tree, "examples", "echo-js")
	if err := os.RemoveAll(filepath.Join(project, "node_modules")); err != nil {
		t.Fatal(err)
	}
	npm := exec.Command("npm", "install", "--offline", "--no-audit", "--no-fund")
	npm.Dir = project
	if out, err := npm.CombinedOutput(); err != nil {
		t.Fatalf("npm install in echo-js: %v\n%s", err, out)
	}
	return hyphaeImage(t, e, "build", project, "--name", "echo-js", "--with-agent")
}

// hyphaeImage runs a hyphae build or import with --json and returns the
// image's path.
func hyphaeImage(t *testing.T, e *env, args ...string) string {
	t.Helper()
	var img struct {
		Path string `json:"path"`
	}
	e.json(t, &img, args...)
	if img.Path == "" {
		t.Fatalf("hyphae %v gave no image path", args)
	}
	return img.Path
}

// awaitJob polls an import job until it ends, and returns its bundle.
func awaitJob(t *testing.T, s *dimServer, id string) bundleBody {
	t.Helper()
	var j struct {
		Status   string `json:"status"`
		Stage    string `json:"stage"`
		Error    string `json:"error"`
		BundleID string `json:"bundle_id"`
	}
	stages := map[string]bool{}
	for deadline := time.Now().Add(dimRequestTimeout); ; time.Sleep(100 * time.Millisecond) {
		s.get("/bundles/jobs/"+id, http.StatusOK, &j)
		stages[j.Status+": "+j.Stage] = true
		if j.Status == "succeeded" || j.Status == "failed" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("import job %s still %s (%s) after %s", id, j.Status, j.Stage, dimRequestTimeout)
		}
	}
	if j.Status != "succeeded" || j.BundleID == "" {
		t.Fatalf("import job %s = %+v (stages seen %v)", id, j, stages)
	}
	var b bundleBody
	s.get("/bundles/"+j.BundleID, http.StatusOK, &b)
	return b
}

// syncRun posts a sync run and checks the answer's status and shape.
func syncRun(t *testing.T, s *dimServer, bundle, payload string, status int) runResult {
	t.Helper()
	var res runResult
	s.postJSON("/run", map[string]any{"bundle_id": bundle, "mode": "sync", "payload": json.RawMessage(payload)}).
		expect(t, "sync run of "+bundle, status, &res)
	if res.InvocationID == "" || res.EventsURL != "/runs/"+res.InvocationID+"/events" {
		t.Fatalf("sync run answered %+v", res)
	}
	return res
}

// checkInvocation checks GET /invocations/{id}; exitCode -1 skips the
// exit code.
func checkInvocation(t *testing.T, s *dimServer, id, bundleID, mode, status string, exitCode int) {
	t.Helper()
	var inv invocationBody
	s.get("/invocations/"+id, http.StatusOK, &inv)
	if inv.ID != id || inv.BundleID != bundleID || inv.Mode != mode || inv.Status != status || inv.DurationMs == nil ||
		(exitCode >= 0 && (inv.ExitCode == nil || *inv.ExitCode != exitCode)) {
		t.Fatalf("invocation %s = %+v, want bundle %s, %s, %s, exit %d", id, inv, bundleID, mode, status, exitCode)
	}
}

// checkEchoEvents checks an echo bundle's whole stream: started →
// payload_delivered → progress 1..3 → result echoing the payload → its
// stderr line → stdout-final (the payload) → process_exited 0 → completed.
func checkEchoEvents(t *testing.T, evs []sseFrame, payload, lang, stderr string) {
	t.Helper()
	want := []string{"state:started", "state:payload_delivered", "progress", "progress", "progress", "result",
		"stderr", "stdout-final", "state:process_exited", "state:completed"}
	if got := labelsOf(evs); !reflect.DeepEqual(got, want) {
		t.Fatalf("events %v, want %v", got, want)
	}
	for i := 1; i <= 3; i++ {
		if b := string(evs[1+i].ev.Body); b != fmt.Sprintf(`{"step":%d,"of":3}`, i) && b != fmt.Sprintf(`{"of":3,"step":%d}`, i) {
			t.Fatalf("progress %d body %s", i, b)
		}
	}
	var result struct {
		Echo json.RawMessage `json:"echo"`
	}
	if err := json.Unmarshal(evs[5].ev.Body, &result); err != nil || !sameJSON(result.Echo, []byte(payload)) || evs[5].ev.Attrs["lang"] != lang {
		t.Fatalf("result %s attrs %v, want the payload %s and lang %s", evs[5].ev.Body, evs[5].ev.Attrs, payload, lang)
	}
	if got := string(evs[6].ev.Body); got != stderr || !strings.HasPrefix(evs[6].ev.ContentType, "text/plain") {
		t.Fatalf("stderr %q (%s), want %q", got, evs[6].ev.ContentType, stderr)
	}
	if got := string(evs[7].ev.Body); got != payload {
		t.Fatalf("stdout-final %q, want %q", got, payload)
	}
	if ex := stateOf(t, evs[8]); ex.ExitCode == nil || *ex.ExitCode != 0 {
		t.Fatalf("process_exited = %s", evs[8].ev.Body)
	}
	if done := stateOf(t, evs[9]); done.Status != "completed" || done.ExitCode == nil || *done.ExitCode != 0 || done.DurationMs == nil || *done.DurationMs <= 0 {
		t.Fatalf("completed = %s, want completed, exit_code 0, a duration", evs[9].ev.Body)
	}
}

// checkFloodEvents checks the abusive bundle's stream: every bad
// connection answered by one non-terminal error event (the good frame
// before one bad frame relayed, the forged state event refused), then all
// floodEvents ticks in order, and a normal end. The one stderr line,
// written after the flood, is only required to come after the bad-frame
// errors: under the flood's backpressure the agent lets a stderr line wait
// at most a short settle time for the event frames written before it
// (agent.settleTimeout), so it may overtake the flood's last events.
func checkFloodEvents(t *testing.T, evs []sseFrame) {
	t.Helper()
	var stderr []int
	var rest []sseFrame
	for i, f := range evs {
		if f.ev.Kind == "stderr" {
			stderr = append(stderr, i)
			continue
		}
		rest = append(rest, f)
	}
	labels := labelsOf(rest)
	want := []string{"state:started", "state:payload_delivered", "error", "error", "error", "before-bad", "error", "error", "error"}
	if len(labels) != len(want)+floodEvents+4 || !reflect.DeepEqual(labels[:len(want)], want) {
		t.Fatalf("%d events besides stderr, starting %v…%v; want %d starting %v", len(labels), labels[:min(len(labels), 12)], tail(labels, 6),
			len(want)+floodEvents+4, want)
	}
	if len(stderr) != 1 || stderr[0] < len(want) || string(evs[stderr[0]].ev.Body) != fmt.Sprintf("dimbundle: flooded %d events", floodEvents) {
		t.Fatalf("stderr events at %v, want the bundle's one line after the bad-frame errors", stderr)
	}
	if at := stderr[0]; at != len(evs)-4 {
		t.Logf("the stderr line (id %s) overtook %d of the flood's events", evs[at].ID, len(evs)-4-at)
	}
	errs := 0
	for _, f := range rest[:len(want)] {
		if f.ev.Kind != "error" {
			continue
		}
		errs++
		var b struct {
			Code     string `json:"code"`
			Terminal bool   `json:"terminal"`
		}
		if err := json.Unmarshal(f.ev.Body, &b); err != nil || b.Code != "event_rejected" || b.Terminal || f.ev.Attrs["source"] != "agent" {
			t.Fatalf("error event %s: %s %v", f.ID, f.ev.Body, f.ev.Attrs)
		}
	}
	if errs != badConnections {
		t.Fatalf("%d error events, want one for each of %d bad connections", errs, badConnections)
	}
	ticks := rest[len(want) : len(want)+floodEvents]
	for i, f := range ticks {
		if f.ev.Kind != "tick" || string(f.ev.Body) != strconv.Itoa(i) {
			t.Fatalf("flood event %d (id %s) is %s %s, want tick %d", i, f.ID, f.ev.Kind, f.ev.Body, i)
		}
	}
	end := rest[len(want)+floodEvents:]
	if got := labelsOf(end); !reflect.DeepEqual(got, []string{"flood-done", "stdout-final", "state:process_exited", "state:completed"}) {
		t.Fatalf("the flood ends with %v", got)
	}
	if got := string(end[1].ev.Body); got != fmt.Sprintf("flooded %d", floodEvents) {
		t.Fatalf("stdout-final %q", got)
	}
	if done := stateOf(t, end[3]); done.Status != "completed" || done.ExitCode == nil || *done.ExitCode != 0 {
		t.Fatalf("completed = %s", end[3].ev.Body)
	}
}

// sameJSON reports whether a and b are the same JSON value.
func sameJSON(a, b []byte) bool {
	var x, y any
	return json.Unmarshal(a, &x) == nil && json.Unmarshal(b, &y) == nil && reflect.DeepEqual(x, y)
}
