// Package gateway is dimension's HTTP API (ARCHITECTURE §3.4): bearer-key
// auth and the admin routes, bundles (docker-save uploads imported with
// the agent, ext4 pushes), runs (sync and async, through a runner's
// permits), their Server-Sent Event streams, invocations, health,
// Prometheus metrics, and a graceful shutdown.
//
// Server is the handler with its dependencies handed in (tests build it on
// a real store, event log and mock runner); Run opens everything from a
// Config and serves until its context ends.
//
// Every error answers with the envelope
// {"error":{"code":"<snake_case>","message":"…","details":…}}; another
// owner's run, stream, invocation, job or bundle answers 404, as a missing
// one does.
package gateway

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hyphae-run/hyphae/dimension/events"
	"github.com/hyphae-run/hyphae/dimension/runner"
	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/image"
)

// Runner executes runs (implemented by *runner.Runner). Stopping a run is
// cancelling the context it runs under.
type Runner interface {
	Acquire() (*runner.Permit, error)
	Run(ctx context.Context, p *runner.Permit, req runner.Request) runner.Outcome
	Running() int
	Mock() bool
	Drain(ctx context.Context)
}

// EventLog is the run event log (implemented by *events.Log).
type EventLog interface {
	Append(ctx context.Context, ev events.Event) (uint64, error)
	Subscribe(ctx context.Context, runID string, afterSeq uint64) (*events.Subscription, error)
}

// Images is the hyphae registry the bundles' image files live in
// (implemented by *registry.Registry).
type Images interface {
	image.Store
	// ImagesDir is where image files live; pushed files are written
	// there first so that registering them is a rename.
	ImagesDir() string
}

// Options are a Server's dependencies and settings.
type Options struct {
	Store  store.Store
	Events EventLog
	Runner Runner
	Images Images
	// Token, when set, authenticates as an admin (DIMENSION_TOKEN).
	Token string
	// WorkerID is recorded on the invocations and upload jobs this gateway
	// runs; orphans are reaped per worker.
	WorkerID string
	// Limits are the run timeouts' defaults and maxima.
	Limits runner.Limits
	// MaxConcurrent is reported by /health.
	MaxConcurrent int
	// MaxBodyBytes caps JSON bodies, MaxUploadBytes bundle uploads.
	MaxBodyBytes, MaxUploadBytes int64
	// UploadDir holds uploaded archives until their import job ends.
	UploadDir string
	// ImportJobs bounds concurrent upload imports (CPU- and disk-heavy);
	// 0 means 2.
	ImportJobs int
	// Heartbeat is the SSE heartbeat interval; 0 means sse.DefaultHeartbeat.
	Heartbeat time.Duration
	// Version is reported by /health.
	Version string
	// Logger receives request failures and lifecycle logs; nil discards.
	Logger *slog.Logger
	// Metrics are served on GET /metrics; nil means NewMetrics() (which
	// then counts only the events the gateway itself appends: see
	// Metrics.CountEvents).
	Metrics *Metrics
	// MetricsPublic lets GET /metrics answer without an API key
	// (DIMENSION_METRICS_PUBLIC); otherwise it needs an admin's.
	MetricsPublic bool
}

// Server is the gateway's HTTP handler.
type Server struct {
	opts    Options
	store   store.Store
	log     *slog.Logger
	mux     *http.ServeMux
	metrics *Metrics
	started time.Time

	draining atomic.Bool
	// active holds the cancel of every run this gateway is executing, by
	// invocation id: cancelling it with runner.ErrStopRequested is a stop.
	activeMu sync.Mutex
	active   map[string]context.CancelCauseFunc
	// background counts async runs and import jobs, so Shutdown can wait.
	background sync.WaitGroup
	// jobs bounds concurrent imports.
	jobs chan struct{}
	// jobCtx is cancelled by Wait, once its wait is over, to abandon the
	// imports still going.
	jobCtx    context.Context
	cancelJob context.CancelFunc
}

// New returns a Server on opts' dependencies.
func New(opts Options) (*Server, error) {
	if opts.Store == nil || opts.Events == nil || opts.Runner == nil || opts.Images == nil {
		return nil, errcode.New(errcode.InvalidArgument, "gateway: Store, Events, Runner and Images are required")
	}
	if opts.UploadDir == "" {
		return nil, errcode.New(errcode.InvalidArgument, "gateway: UploadDir is required")
	}
	if opts.MaxBodyBytes <= 0 {
		opts.MaxBodyBytes = DefaultMaxBodyBytes
	}
	if opts.MaxUploadBytes <= 0 {
		opts.MaxUploadBytes = DefaultMaxUploadBytes
	}
	if opts.ImportJobs <= 0 {
		opts.ImportJobs = 2
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Metrics == nil {
		opts.Metrics = NewMetrics()
	}
	s := &Server{
		opts:    opts,
		store:   opts.Store,
		log:     opts.Logger,
		mux:     http.NewServeMux(),
		metrics: opts.Metrics,
		started: time.Now(),
		jobs:    make(chan struct{}, opts.ImportJobs),
		active:  map[string]context.CancelCauseFunc{},
	}
	if err := s.metrics.register(s); err != nil {
		return nil, errcode.Wrap(errcode.InvalidArgument, err, "gateway: registering metrics (a Metrics serves one Server)")
	}
	s.jobCtx, s.cancelJob = context.WithCancel(context.Background())
	s.routes()
	return s, nil
}

// access says who may call a route.
type access int

const (
	public access = iota
	user
	admin
)

func (s *Server) routes() {
	body, upload := s.opts.MaxBodyBytes, s.opts.MaxUploadBytes
	add := func(pattern string, who access, limit int64, h handlerFunc) {
		var hh http.Handler
		if who == public {
			hh = s.handle(h)
		} else {
			hh = s.authenticated(who == admin, h)
		}
		s.mux.Handle(pattern, limitBody(limit, hh))
	}
	add("GET /health", public, body, s.health)
	// Metrics say how busy the gateway is, never whose runs: admins only
	// unless the operator opens them to an unauthenticated scraper.
	metrics := admin
	if s.opts.MetricsPublic {
		metrics = public
	}
	add("GET /metrics", metrics, body, s.metrics.handler(s.log))

	add("POST /run", user, body, s.postRun)
	add("POST /run/{id}/stop", user, body, s.stopRun)
	add("GET /runs/{id}/events", user, body, s.runEvents)
	add("GET /invocations/{id}", user, body, s.getInvocation)

	add("POST /bundles/upload", user, upload, s.uploadBundle)
	add("POST /bundles/push", user, upload, s.pushBundle)
	add("GET /bundles/jobs/{id}", user, body, s.getJob)
	add("GET /bundles", user, body, s.listBundles)
	add("GET /bundles/{id}", user, body, s.getBundle)
	add("DELETE /bundles/{id}", user, body, s.deleteBundle)

	add("POST /admin/users", admin, body, s.createUser)
	add("GET /admin/users", admin, body, s.listUsers)
	add("DELETE /admin/users/{id}", admin, body, s.deleteUser)
	add("POST /admin/users/{id}/keys", admin, body, s.createKey)
	add("GET /admin/users/{id}/keys", admin, body, s.listKeys)
	add("POST /admin/users/{id}/keys/{kid}/revoke", admin, body, s.revokeKey)
	add("POST /admin/users/{id}/promote", admin, body, s.setRole(store.RoleAdmin))
	add("POST /admin/users/{id}/demote", admin, body, s.setRole(store.RoleUser))

	// Everything else: the envelope rather than the mux's plain text.
	add("/", public, body, s.noRoute)
}

// ServeHTTP implements http.Handler, counting every request in the
// metrics.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.metrics.instrument(s.mux, w, r) }

// handle adapts h, writing its error as the envelope. A panic in h is
// recovered (see recoverPanic), so it never resets the connection
// without an answer.
func (s *Server) handle(h handlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sw := &statusWriter{ResponseWriter: w}
		defer s.recoverPanic(sw, r)
		if err := h(sw, r); err != nil {
			writeError(sw, r, s.log, err)
		}
	})
}

// recoverPanic turns a handler's panic into a logged 500 internal_error
// envelope when nothing was written yet. Once the response has begun it
// is aborted instead (http.ErrAbortHandler): a half-written body must not
// look complete. An http.ErrAbortHandler panic passes through as is.
func (s *Server) recoverPanic(w *statusWriter, r *http.Request) {
	v := recover()
	if v == nil {
		return
	}
	if v == http.ErrAbortHandler {
		panic(v)
	}
	s.log.Error("handler panicked", "method", r.Method, "path", r.URL.Path, "panic", v, "stack", string(debug.Stack()))
	if w.status != 0 {
		panic(http.ErrAbortHandler)
	}
	// Logged above with the stack; the envelope needs no second line.
	writeError(w, r, slog.New(slog.DiscardHandler), internal(fmt.Errorf("handler panicked: %v", v)))
}

// limitBody caps r's body, so no handler can be made to read more.
func limitBody(limit int64, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.Body = http.MaxBytesReader(w, r.Body, limit)
		h.ServeHTTP(w, r)
	})
}

// probeMethods are the methods noRoute tries when telling 405 from 404.
var probeMethods = [...]string{http.MethodGet, http.MethodPost, http.MethodPut, http.MethodPatch, http.MethodDelete}

// noRoute answers a request no route matched: 405 with Allow when the path
// exists under other methods, else 404.
func (s *Server) noRoute(w http.ResponseWriter, r *http.Request) error {
	var allow []string
	for _, m := range probeMethods {
		probe := *r
		probe.Method = m
		if _, pattern := s.mux.Handler(&probe); pattern != "/" && pattern != "" {
			allow = append(allow, m)
		}
	}
	if len(allow) > 0 {
		w.Header().Set("Allow", strings.Join(allow, ", "))
		return apiErr(http.StatusMethodNotAllowed, CodeBadRequest,
			"method "+r.Method+" is not allowed on "+r.URL.Path+"; allowed: "+strings.Join(allow, ", "))
	}
	return apiErr(http.StatusNotFound, CodeNotFound, "no route "+r.Method+" "+r.URL.Path)
}

// pathID returns the path parameter name, checked to be an id the store
// could have made: a malformed one is a validation error rather than a
// lookup.
func pathID(r *http.Request, name string) (string, error) {
	id := r.PathValue(name)
	if err := store.ValidateID(id); err != nil {
		return "", validation(name, "path parameter %s: %s", name, clientMessage(err))
	}
	return id, nil
}

// healthResponse is GET /health's body.
type healthResponse struct {
	Status        string  `json:"status"`
	Version       string  `json:"version"`
	UptimeSecs    float64 `json:"uptime_secs"`
	RunningVMs    int     `json:"running_vms"`
	MaxConcurrent int     `json:"max_concurrent"`
	Mock          bool    `json:"mock"`
	WorkerID      string  `json:"worker_id"`
}

// health reports liveness with the real count of running runs. While
// draining it answers 503 so that load balancers send new work elsewhere.
func (s *Server) health(w http.ResponseWriter, r *http.Request) error {
	h := healthResponse{
		Status:        "ok",
		Version:       s.opts.Version,
		UptimeSecs:    time.Since(s.started).Round(time.Millisecond).Seconds(),
		RunningVMs:    s.opts.Runner.Running(),
		MaxConcurrent: s.opts.MaxConcurrent,
		Mock:          s.opts.Runner.Mock(),
		WorkerID:      s.opts.WorkerID,
	}
	if s.draining.Load() {
		h.Status = "draining"
		return apiErr(http.StatusServiceUnavailable, CodeServiceUnavailable, "the gateway is shutting down").withDetails(h)
	}
	writeJSON(w, http.StatusOK, h)
	return nil
}

// BeginDrain makes the server refuse new runs and uploads (503) and report
// draining on /health. Runs in progress are not touched: the runner's
// Drain handles them.
func (s *Server) BeginDrain() { s.draining.Store(true) }

// Wait waits for async runs and import jobs until ctx ends; then it
// cancels the imports still going (their jobs fail) and waits for them.
// Async runs end through the runner's Drain, which stops them.
func (s *Server) Wait(ctx context.Context) {
	done := make(chan struct{})
	go func() { s.background.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		s.cancelJob()
		<-done
	}
	s.cancelJob()
}

// refuseWhileDraining is the 503 for new work during shutdown.
func (s *Server) refuseWhileDraining() error {
	if s.draining.Load() {
		return apiErr(http.StatusServiceUnavailable, CodeServiceUnavailable, "the gateway is shutting down; retry on another one or later")
	}
	return nil
}
