package gateway

import (
	"context"
	"encoding/json"
	"log"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/hyphae-run/hyphae/dimension/events"
	"github.com/hyphae-run/hyphae/dimension/runner"
	"github.com/hyphae-run/hyphae/dimension/store"
)

// metricsNamespace prefixes every metric of the gateway's own.
const metricsNamespace = "dimension"

// Buckets of the duration histograms, in seconds. Runs last from tens of
// milliseconds (a mock echo) to the processing maximum (minutes); boots
// from milliseconds (mock) to seconds (a microVM); most requests take
// milliseconds, while sync runs and SSE streams last as long as their run.
var (
	runBuckets  = []float64{0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600}
	bootBuckets = []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}
	httpBuckets = []float64{0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300}
)

// finalRunStatuses and finalJobStatuses are the values of the status
// labels, set up front so that every series exists (at 0) from the start.
var (
	finalRunStatuses = []string{runner.StatusCompleted, runner.StatusFailed, runner.StatusStopped, runner.StatusTimedOut}
	finalJobStatuses = []store.JobStatus{store.JobSucceeded, store.JobFailed}
)

// Metrics are dimension-server's Prometheus metrics, on a registry of
// their own (never the global one) that GET /metrics serves. Labels are
// low-cardinality by construction: statuses, route patterns, methods and
// response codes, never a run, user or bundle.
//
// One Metrics serves one Server. Events counted by it are those appended
// through the EventLog that CountEvents returns, so hand that one to the
// runner as well as to the Server.
type Metrics struct {
	reg *prometheus.Registry

	runsStarted     prometheus.Counter
	runsCompleted   *prometheus.CounterVec
	runDuration     *prometheus.HistogramVec
	bootDuration    prometheus.Histogram
	capacityRejects prometheus.Counter
	httpRequests    *prometheus.CounterVec
	httpDuration    *prometheus.HistogramVec
	sseSubscribers  prometheus.Gauge
	eventsAppended  prometheus.Counter
	uploadJobs      *prometheus.CounterVec
}

// NewMetrics returns the gateway's metrics on a new registry, with the Go
// runtime's and the process's collectors.
func NewMetrics() *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		runsStarted: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: metricsNamespace, Name: "runs_started_total",
			Help: "Runs handed to the runner (sync and async).",
		}),
		runsCompleted: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace, Name: "runs_completed_total",
			Help: "Runs ended, by final status (completed, failed, stopped, timed_out).",
		}, []string{"status"}),
		runDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: metricsNamespace, Name: "run_duration_seconds",
			Help: "Duration of ended runs, start to completed event, by final status.", Buckets: runBuckets,
		}, []string{"status"}),
		bootDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: metricsNamespace, Name: "run_boot_duration_seconds",
			Help: "Time from a run's start to its payload being delivered to the bundle (sandbox boot and agent connect).", Buckets: bootBuckets,
		}),
		capacityRejects: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: metricsNamespace, Name: "run_capacity_rejections_total",
			Help: "Runs refused with 503 capacity_exceeded because every run permit was taken.",
		}),
		httpRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace, Name: "http_requests_total",
			Help: "HTTP requests answered, by route pattern, method and status code.",
		}, []string{"route", "method", "code"}),
		httpDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: metricsNamespace, Name: "http_request_duration_seconds",
			Help: "HTTP request latency to the end of the response (SSE streams: their whole life), by route pattern and method.", Buckets: httpBuckets,
		}, []string{"route", "method"}),
		sseSubscribers: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: metricsNamespace, Name: "sse_subscribers",
			Help: "Server-Sent Event streams of runs currently connected.",
		}),
		eventsAppended: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: metricsNamespace, Name: "events_appended_total",
			Help: "Run events appended to the event log by this gateway and its runner.",
		}),
		uploadJobs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace, Name: "bundle_upload_jobs_total",
			Help: "Bundle upload import jobs ended, by final status (succeeded, failed).",
		}, []string{"status"}),
	}
	for _, st := range finalRunStatuses {
		m.runsCompleted.WithLabelValues(st)
		m.runDuration.WithLabelValues(st)
	}
	for _, st := range finalJobStatuses {
		m.uploadJobs.WithLabelValues(string(st))
	}
	m.reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		m.runsStarted, m.runsCompleted, m.runDuration, m.bootDuration, m.capacityRejects,
		m.httpRequests, m.httpDuration, m.sseSubscribers, m.eventsAppended, m.uploadJobs,
	)
	return m
}

// register adds the collectors that read the server's state when scraped.
func (m *Metrics) register(s *Server) error {
	return m.reg.Register(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: metricsNamespace, Name: "runs_running",
		Help: "Runs in progress, each holding a sandbox until its teardown is done (/health's running_vms).",
	}, func() float64 { return float64(s.opts.Runner.Running()) }))
}

// handler serves the registry in the Prometheus exposition format. A
// collector's failure is logged and the rest is still served.
func (m *Metrics) handler(logger *slog.Logger) handlerFunc {
	h := promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{
		ErrorLog:      log.New(slogWriter{logger}, "", 0),
		ErrorHandling: promhttp.ContinueOnError,
		Registry:      m.reg,
	})
	return func(w http.ResponseWriter, r *http.Request) error {
		h.ServeHTTP(w, r)
		return nil
	}
}

// slogWriter turns promhttp's log lines into warnings.
type slogWriter struct{ log *slog.Logger }

func (w slogWriter) Write(p []byte) (int, error) {
	w.log.Warn("serving metrics", "err", strings.TrimSpace(string(p)))
	return len(p), nil
}

// runStarted and runEnded count one run handed to the runner and its
// outcome.
func (m *Metrics) runStarted() { m.runsStarted.Inc() }

func (m *Metrics) runEnded(out runner.Outcome) {
	m.runsCompleted.WithLabelValues(out.Status).Inc()
	m.runDuration.WithLabelValues(out.Status).Observe(float64(out.DurationMs) / 1000)
}

// uploadJobEnded counts one import job by its final status.
func (m *Metrics) uploadJobEnded(st store.JobStatus) { m.uploadJobs.WithLabelValues(string(st)).Inc() }

// CountEvents returns log counting every event appended through it, and
// observing the boot time that each run's payload_delivered state event
// reports.
func (m *Metrics) CountEvents(log EventLog) EventLog { return countingLog{EventLog: log, m: m} }

// countingLog is an EventLog that counts appends.
type countingLog struct {
	EventLog
	m *Metrics
}

func (c countingLog) Append(ctx context.Context, ev events.Event) (uint64, error) {
	seq, err := c.EventLog.Append(ctx, ev)
	if err != nil {
		return seq, err
	}
	c.m.eventsAppended.Inc()
	if ev.Kind == events.KindState {
		// A state event is the runner's (the kind is reserved), a few per
		// run; only payload_delivered carries boot_ms.
		var st struct {
			Phase  string `json:"phase"`
			BootMs *int64 `json:"boot_ms"`
		}
		if json.Unmarshal(ev.Body, &st) == nil && st.Phase == runner.PhasePayloadDelivered && st.BootMs != nil {
			c.m.bootDuration.Observe(float64(*st.BootMs) / 1000)
		}
	}
	return seq, nil
}

// httpMethods are the methods the method label names; any other is
// "other", so that a client cannot mint series.
var httpMethods = map[string]bool{
	http.MethodGet: true, http.MethodHead: true, http.MethodPost: true, http.MethodPut: true,
	http.MethodPatch: true, http.MethodDelete: true, http.MethodOptions: true,
}

// instrument serves r with h, then counts it by the route pattern the mux
// matched (its path part: the method has its own label), the method and
// the status code.
func (m *Metrics) instrument(h http.Handler, w http.ResponseWriter, r *http.Request) {
	began := time.Now()
	sw := &statusWriter{ResponseWriter: w}
	// Deferred, so that a request aborted by a panic (http.ErrAbortHandler
	// travels up through here) is counted too.
	defer m.count(sw, r, began)
	h.ServeHTTP(sw, r)
}

// count records one answered request.
func (m *Metrics) count(sw *statusWriter, r *http.Request, began time.Time) {
	// The mux sets r.Pattern on the request it was given.
	route := r.Pattern
	if _, path, ok := strings.Cut(route, " "); ok {
		route = path
	}
	if route == "" {
		// The mux answered by itself (a redirect to the clean path).
		route = "unmatched"
	}
	method := r.Method
	if !httpMethods[method] {
		method = "other"
	}
	m.httpRequests.WithLabelValues(route, method, strconv.Itoa(sw.code())).Inc()
	m.httpDuration.WithLabelValues(route, method).Observe(time.Since(began).Seconds())
}

// statusWriter records the status code of the response. Unwrap keeps
// http.ResponseController (SSE's flushes and write deadlines) working
// through it.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 && code >= 200 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(p)
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// code is the status sent; a handler that wrote nothing sent 200.
func (w *statusWriter) code() int {
	if w.status == 0 {
		return http.StatusOK
	}
	return w.status
}
