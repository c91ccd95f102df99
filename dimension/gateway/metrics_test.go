package gateway

import (
	"bytes"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/hyphae-run/hyphae/dimension/store"
)

// scrape is one parsed GET /metrics answer.
type scrape struct {
	families map[string]*dto.MetricFamily
	raw      string
}

// scrape fetches and parses /metrics with key (none when empty).
func (e *env) scrape(key string) scrape {
	e.t.Helper()
	r := e.do("GET", "/metrics", key, nil)
	if r.status != http.StatusOK || !strings.HasPrefix(r.header.Get("Content-Type"), "text/plain") {
		e.t.Fatalf("GET /metrics: status %d, Content-Type %q: %s", r.status, r.header.Get("Content-Type"), r.body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(r.body))
	if err != nil {
		e.t.Fatalf("parsing /metrics: %v\n%s", err, r.body)
	}
	return scrape{families: fams, raw: string(r.body)}
}

// value returns the metric name's sample whose labels include the pairs
// in kv: a counter's or gauge's value, a histogram's observation count.
// A missing series is -1, which no assertion wants.
func (s scrape) value(name string, kv ...string) float64 {
	f, ok := s.families[name]
	if !ok {
		return -1
	}
next:
	for _, m := range f.GetMetric() {
		for i := 0; i+1 < len(kv); i += 2 {
			if !hasLabel(m, kv[i], kv[i+1]) {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue()
		case m.Gauge != nil:
			return m.Gauge.GetValue()
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount())
		}
	}
	return -1
}

func hasLabel(m *dto.Metric, name, value string) bool {
	for _, l := range m.GetLabel() {
		if l.GetName() == name && l.GetValue() == value {
			return true
		}
	}
	return false
}

// labelValues lists the values label takes in family name.
func (s scrape) labelValues(name, label string) []string {
	var out []string
	for _, m := range s.families[name].GetMetric() {
		for _, l := range m.GetLabel() {
			if l.GetName() == label && !slices.Contains(out, l.GetValue()) {
				out = append(out, l.GetValue())
			}
		}
	}
	slices.Sort(out)
	return out
}

// waitScrape scrapes until ready holds (async outcomes are counted a
// moment after the runner lets go of the run) and returns that scrape.
func (e *env) waitScrape(key string, ready func(scrape) bool) scrape {
	e.t.Helper()
	ctx, cancel := contextWithTestTimeout()
	defer cancel()
	for {
		s := e.scrape(key)
		if ready(s) {
			return s
		}
		select {
		case <-ctx.Done():
			e.t.Fatalf("metrics never got there:\n%s", s.raw)
		case <-tick():
		}
	}
}

// A completed and a failed sync run, a capacity refusal and a stopped
// async run show up as exact counts; the gauges follow /health and the
// open streams and come back to 0; routes are labelled by pattern; no id
// of a run, user or bundle appears.
func TestMetricsRuns(t *testing.T) {
	e := newEnv(t, envOptions{maxConcurrent: 1})
	u, key := e.newUser("mira")
	echo := e.seedBundle(u.ID, "echo", fx.echoDigest, store.Manifest{})
	sleeper := e.seedBundle(u.ID, "bundle", fx.bundleDigest, store.Manifest{})

	var ok, failed runResult
	e.do("POST", "/run", key, map[string]any{"bundle_id": "echo", "payload": map[string]int{"exit_code": 0}}).ok(t, http.StatusOK, &ok)
	e.do("POST", "/run", key, map[string]any{"bundle_id": "echo", "payload": map[string]int{"exit_code": 3}}).ok(t, http.StatusOK, &failed)
	if ok.Status != "completed" || failed.Status != "failed" {
		t.Fatalf("runs %+v and %+v", ok, failed)
	}

	// While a run holds the only permit, the gauges agree with /health
	// and the open stream, and another run is refused.
	slept := e.startRun(key, "bundle", map[string]string{"mode": "sleep"})
	s := e.openStream(key, slept, "")
	s.waitFor(t, isKind("sleeping"))
	var h healthResponse
	e.do("GET", "/health", "", nil).ok(t, http.StatusOK, &h)
	busy := e.scrape(e.adminKey)
	if h.RunningVMs != 1 || busy.value("dimension_runs_running") != 1 || busy.value("dimension_sse_subscribers") != 1 {
		t.Fatalf("health running_vms %d; metrics running %v, subscribers %v", h.RunningVMs,
			busy.value("dimension_runs_running"), busy.value("dimension_sse_subscribers"))
	}
	e.do("POST", "/run", key, map[string]any{"bundle_id": "echo"}).apiError(t, http.StatusServiceUnavailable, CodeCapacityExceeded)
	e.do("POST", "/run/"+slept+"/stop", key, nil).ok(t, http.StatusAccepted, nil)
	s.rest(t)
	waitIdle(t, e)

	// Every event of the three runs, replayed, is one the metrics counted.
	var appended int
	for _, id := range []string{ok.InvocationID, failed.InvocationID, slept} {
		appended += len(e.openStream(key, id, "").rest(t))
	}
	// An unknown path is counted under the catch-all pattern.
	e.do("GET", "/runs/"+slept+"/nope", key, nil).apiError(t, http.StatusNotFound, CodeNotFound)

	e.do("GET", "/health", "", nil).ok(t, http.StatusOK, &h)
	m := e.waitScrape(e.adminKey, func(s scrape) bool { return s.value("dimension_runs_completed_total", "status", "stopped") == 1 })
	want := []struct {
		name string
		kv   []string
		v    float64
	}{
		{"dimension_runs_started_total", nil, 3},
		{"dimension_runs_completed_total", []string{"status", "completed"}, 1},
		{"dimension_runs_completed_total", []string{"status", "failed"}, 1},
		{"dimension_runs_completed_total", []string{"status", "stopped"}, 1},
		{"dimension_runs_completed_total", []string{"status", "timed_out"}, 0},
		{"dimension_run_duration_seconds", []string{"status", "completed"}, 1},
		{"dimension_run_duration_seconds", []string{"status", "failed"}, 1},
		{"dimension_run_duration_seconds", []string{"status", "stopped"}, 1},
		{"dimension_run_duration_seconds", []string{"status", "timed_out"}, 0},
		// All three runs had their payload delivered.
		{"dimension_run_boot_duration_seconds", nil, 3},
		{"dimension_run_capacity_rejections_total", nil, 1},
		{"dimension_runs_running", nil, float64(h.RunningVMs)},
		{"dimension_runs_running", nil, 0},
		{"dimension_sse_subscribers", nil, 0},
		{"dimension_events_appended_total", nil, float64(appended)},
		{"dimension_bundle_upload_jobs_total", []string{"status", "succeeded"}, 0},
		{"dimension_bundle_upload_jobs_total", []string{"status", "failed"}, 0},
		{"dimension_http_requests_total", []string{"route", "/run", "method", "POST", "code", "200"}, 2},
		{"dimension_http_requests_total", []string{"route", "/run", "method", "POST", "code", "202"}, 1},
		{"dimension_http_requests_total", []string{"route", "/run", "method", "POST", "code", "503"}, 1},
		{"dimension_http_requests_total", []string{"route", "/run/{id}/stop", "method", "POST", "code", "202"}, 1},
		{"dimension_http_requests_total", []string{"route", "/runs/{id}/events", "method", "GET", "code", "200"}, 4},
		{"dimension_http_requests_total", []string{"route", "/", "method", "GET", "code", "404"}, 1},
		{"dimension_http_requests_total", []string{"route", "/health", "method", "GET", "code", "200"}, 2},
		{"dimension_http_request_duration_seconds", []string{"route", "/run", "method", "POST"}, 4},
	}
	for _, w := range want {
		if got := m.value(w.name, w.kv...); got != w.v {
			t.Errorf("%s%v = %v, want %v", w.name, w.kv, got, w.v)
		}
	}
	if appended == 0 || m.value("go_goroutines") <= 0 || m.value("process_start_time_seconds") <= 0 {
		t.Errorf("appended %d, go_goroutines %v, process_start_time_seconds %v", appended,
			m.value("go_goroutines"), m.value("process_start_time_seconds"))
	}
	routes := m.labelValues("dimension_http_requests_total", "route")
	wantRoutes := []string{"/", "/admin/users", "/health", "/metrics", "/run", "/run/{id}/stop", "/runs/{id}/events"}
	if !slices.Equal(routes, wantRoutes) {
		t.Errorf("route labels %q, want %q", routes, wantRoutes)
	}
	for _, id := range []string{ok.InvocationID, failed.InvocationID, slept, u.ID, echo.ID, sleeper.ID, "mira"} {
		if strings.Contains(m.raw, id) {
			t.Errorf("the metrics name %q", id)
		}
	}
	if t.Failed() {
		t.Logf("metrics:\n%s", m.raw)
	}
}

// An upload import job is counted by its final status.
func TestMetricsUploadJobs(t *testing.T) {
	e := newEnv(t, envOptions{freshRegistry: true})
	_, key := e.newUser("nils")
	var acc jobAccepted
	e.postMultipart("/bundles/upload", key, map[string]string{"name": "echo"}, map[string]string{"image": fx.echoArchive}).
		ok(t, http.StatusAccepted, &acc)
	if j := e.waitJob(key, acc.JobID); j.Status != store.JobSucceeded {
		t.Fatalf("job %+v", j)
	}
	junk := filepath.Join(t.TempDir(), "junk.tar")
	if err := os.WriteFile(junk, []byte(strings.Repeat("not a tar archive ", 100)), 0o644); err != nil {
		t.Fatal(err)
	}
	e.postMultipart("/bundles/upload", key, map[string]string{"name": "junk"}, map[string]string{"image": junk}).
		ok(t, http.StatusAccepted, &acc)
	if j := e.waitJob(key, acc.JobID); j.Status != store.JobFailed {
		t.Fatalf("job %+v", j)
	}
	m := e.scrape(e.adminKey)
	for st, n := range map[string]float64{"succeeded": 1, "failed": 1} {
		if got := m.value("dimension_bundle_upload_jobs_total", "status", st); got != n {
			t.Errorf("upload jobs %s = %v, want %v", st, got, n)
		}
	}
}

// /metrics needs an admin unless DIMENSION_METRICS_PUBLIC is set; refusals
// are the error envelope.
func TestMetricsAuth(t *testing.T) {
	e := newEnv(t, envOptions{token: "s3cret-token"})
	_, userKey := e.newUser("otto")
	e.do("GET", "/metrics", "", nil).apiError(t, http.StatusUnauthorized, CodeUnauthorized)
	e.do("GET", "/metrics", "wrong", nil).apiError(t, http.StatusUnauthorized, CodeUnauthorized)
	e.do("GET", "/metrics", userKey, nil).apiError(t, http.StatusForbidden, CodeForbidden)
	e.do("POST", "/metrics", e.adminKey, nil).apiError(t, http.StatusMethodNotAllowed, CodeBadRequest)
	e.scrape(e.adminKey)
	m := e.scrape("s3cret-token")
	for code, n := range map[int]float64{401: 2, 403: 1, 200: 1} {
		if got := m.value("dimension_http_requests_total", "route", "/metrics", "method", "GET", "code", strconv.Itoa(code)); got != n {
			t.Errorf("GET /metrics answered %d: counted %v, want %v", code, got, n)
		}
	}

	pub := newEnv(t, envOptions{metricsPublic: true})
	if got := pub.scrape("").value("dimension_runs_started_total"); got != 0 {
		t.Fatalf("public metrics: runs started %v", got)
	}
}
