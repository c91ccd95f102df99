// Package runner executes dimension runs: one run boots a sandbox from the
// bundle's image (a microVM with a private writable layer, or a host
// process in mock mode), connects the host↔guest channel, sends the
// Request with the payload, relays what dimension-agent sends back into
// the event log in order, and always tears everything down (ARCHITECTURE.md
// §1, §3.2).
//
// Each run appends, as its only writer, state events (kind "state", JSON
// body with a "phase"): started, payload_delivered, process_exited and
// completed{status, exit_code, duration_ms}; between them the bundle's own
// events, its stderr lines and its stdout-final, exactly as the agent
// emitted them; and kind "error" for the agent's Error envelopes and for
// bundle events the runner refuses. The invocation row follows the run
// (running, then its final status).
//
// The guest is untrusted: frames are capped by package protocol, the
// channel is read by one goroutine that hands envelopes to the run's one
// appender without buffering (so a flooding bundle is slowed down by the
// event log rather than held in memory), and the kind "state" is reserved
// for the runner.
package runner

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"runtime/debug"
	"sync"
	"time"

	"github.com/hyphae-run/hyphae/dimension/events"
	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/errcode"
)

// Statuses of a completed run (the store's final statuses).
const (
	StatusCompleted = string(store.StatusCompleted)
	StatusFailed    = string(store.StatusFailed)
	StatusStopped   = string(store.StatusStopped)
	StatusTimedOut  = string(store.StatusTimedOut)
)

// Phases of the runner's state events.
const (
	PhaseStarted          = "started"
	PhasePayloadDelivered = "payload_delivered"
	PhaseProcessExited    = "process_exited"
	PhaseCompleted        = events.PhaseCompleted
)

// KindError is the kind of the events that report the agent's Error
// envelopes, a broken channel and the bundle events the runner refused;
// attribute "source" says which ("agent" or "runner"). Bundles may send
// events of this kind too, but theirs never carry "source": the runner
// drops it from everything a bundle sends.
const KindError = "error"

// Attributes the runner sets.
const (
	AttrMock   = "mock"   // "true" on every event of a mock-mode run
	AttrVMM    = "vmm"    // the backend's name, on started
	AttrSource = "source" // who raised an error event: agent or runner (never a bundle)
)

// Defaults for Options.
const (
	DefaultMaxConcurrent = 200
	// DefaultStopGrace is how long a stopped bundle has between SIGTERM
	// and SIGKILL (the ShutdownRequest's grace).
	DefaultStopGrace = 5 * time.Second
	// DefaultVMStopTimeout bounds the sandbox's own graceful stop
	// (Ctrl-Alt-Del, SIGTERM, SIGKILL) once the agent has had its grace.
	DefaultVMStopTimeout = 10 * time.Second
)

// appendTimeout bounds one event append, so that a dead event log cannot
// hold a run (and its VM) forever.
const appendTimeout = 15 * time.Second

// ErrCapacity is the error Acquire returns when every run permit is taken:
// errcode.CapacityExceeded.
var ErrCapacity = errcode.New(errcode.CapacityExceeded, "every run permit is taken").
	WithHint("retry shortly; the server runs at most its MaxConcurrent runs at once")

// EventSink is the event log (*events.Log satisfies it).
type EventSink interface {
	Append(ctx context.Context, ev events.Event) (uint64, error)
}

// InvocationUpdater records a run's status (store.Invocations satisfies
// it).
type InvocationUpdater interface {
	UpdateInvocation(ctx context.Context, id string, u store.InvocationUpdate) (store.Invocation, error)
}

// Request is one run to execute.
type Request struct {
	// RunID is the invocation id (events.ValidRunID).
	RunID     string
	UserID    string
	BundleID  string
	BundleRef string // "name:tag", for logs
	// ImagePath is the bundle's registry ext4 image (built --with-agent).
	ImagePath string
	// Manifest is the bundle's manifest (resources, entrypoint override,
	// timeouts).
	Manifest store.Manifest
	// Payload is written to the bundle's stdin by the agent.
	Payload json.RawMessage
	// BootTimeout and ProcessingTimeout are normally resolved by
	// ResolveTimeouts; a zero one is resolved from the manifest and the
	// runner's Limits.
	BootTimeout, ProcessingTimeout time.Duration
}

// Outcome is how a run ended.
type Outcome struct {
	// Status is completed, failed, stopped or timed_out.
	Status string
	// ExitCode is the bundle's exit code (128+signal when killed), -1 when
	// it never reported one.
	ExitCode int
	// Stdout is the stdout-final body (bounded by the agent).
	Stdout     []byte
	DurationMs int64
	// Reason is a short snake_case cause for a status other than
	// completed (for instance boot_timeout, exit_code, agent_error).
	Reason string
	// Err is the cause when the run failed for an infrastructure reason
	// (to be logged, not shown to clients: it can hold the VM console).
	Err error
}

// Options configure a Runner.
type Options struct {
	// Backend starts sandboxes (NewVMBackend or NewMockBackend). Required.
	Backend Backend
	// Events receives every event of every run. Required.
	Events EventSink
	// Store, when set, is kept up to date with each run's status.
	Store InvocationUpdater
	// MaxConcurrent is the number of run permits (DefaultMaxConcurrent
	// when 0).
	MaxConcurrent int
	// WorkerID is put into every event ("" = the hostname).
	WorkerID string
	// Limits resolve the timeouts a Request leaves zero.
	Limits Limits
	// StopGrace is the bundle's grace on stop or timeout (DefaultStopGrace
	// when 0); VMStopTimeout bounds the sandbox stop after it
	// (DefaultVMStopTimeout when 0).
	StopGrace, VMStopTimeout time.Duration
	// Logger receives diagnostics (nil = slog.Default()).
	Logger *slog.Logger
}

// Runner executes runs. It is safe for concurrent use.
type Runner struct {
	opts Options
	log  *slog.Logger

	mu       sync.Mutex
	held     int                   // permits taken and not released
	runs     map[string]*activeRun // runs inside Run, by id
	draining bool
	changed  chan struct{} // closed and replaced when held or runs change
}

// activeRun is what Stop and Drain need of a run in progress.
type activeRun struct {
	cancel context.CancelCauseFunc
}

// ErrStopRequested is the cause to cancel a run's context with (see
// context.WithCancelCause) when someone asked for the stop: the run then
// completes with reason "stop_requested" rather than "cancelled".
var ErrStopRequested = errors.New("stop requested")

// errDraining is the cause of the runs Drain stops.
var errDraining = errors.New("the runner is draining")

// New returns a Runner.
func New(opts Options) (*Runner, error) {
	if opts.Backend == nil || opts.Events == nil {
		return nil, errcode.New(errcode.InvalidArgument, "runner needs a backend and an event log")
	}
	if opts.MaxConcurrent < 0 {
		return nil, errcode.New(errcode.InvalidArgument, "MaxConcurrent %d is negative", opts.MaxConcurrent)
	}
	if opts.MaxConcurrent == 0 {
		opts.MaxConcurrent = DefaultMaxConcurrent
	}
	if opts.WorkerID == "" {
		opts.WorkerID, _ = os.Hostname()
	}
	if opts.StopGrace <= 0 {
		opts.StopGrace = DefaultStopGrace
	}
	if opts.VMStopTimeout <= 0 {
		opts.VMStopTimeout = DefaultVMStopTimeout
	}
	opts.Limits = opts.Limits.withDefaults()
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	return &Runner{opts: opts, log: opts.Logger, runs: map[string]*activeRun{}, changed: make(chan struct{})}, nil
}

// Permit is one run permit. The gateway takes it with Acquire before it
// creates the invocation and hands it to Run, which releases it after
// teardown; Release gives it back when the run never starts.
type Permit struct {
	r    *Runner
	once sync.Once
}

// Release returns the permit. It is idempotent.
func (p *Permit) Release() {
	p.once.Do(func() {
		p.r.mu.Lock()
		p.r.held--
		p.r.notifyLocked()
		p.r.mu.Unlock()
	})
}

// Acquire takes a run permit without blocking: ErrCapacity (coded
// errcode.CapacityExceeded) when all are taken, errcode.Draining while the
// runner drains.
func (r *Runner) Acquire() (*Permit, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.draining {
		return nil, errcode.New(errcode.Draining, "the server is shutting down and takes no new runs")
	}
	if r.held >= r.opts.MaxConcurrent {
		return nil, ErrCapacity
	}
	r.held++
	return &Permit{r: r}, nil
}

// Running is the number of runs in progress, each holding a sandbox (or
// booting one) until its teardown is done.
func (r *Runner) Running() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.runs)
}

// Mock reports whether the backend runs bundles as host processes.
func (r *Runner) Mock() bool { return r.opts.Backend.Mock() }

// Stop asks the run to stop: the bundle gets a ShutdownRequest (SIGTERM,
// then SIGKILL after the grace), then the sandbox is stopped and killed;
// the run completes as stopped. It returns at once. An id that is not
// running is errcode.NotFound.
func (r *Runner) Stop(runID string) error {
	r.mu.Lock()
	a, ok := r.runs[runID]
	r.mu.Unlock()
	if !ok {
		return errcode.New(errcode.NotFound, "no run %q is in progress", runID)
	}
	a.cancel(ErrStopRequested)
	return nil
}

// Drain stops taking new runs, waits for the running ones (and for permits
// taken but not yet run) until ctx ends, then stops what is left and waits
// for its teardown.
func (r *Runner) Drain(ctx context.Context) {
	r.mu.Lock()
	r.draining = true
	r.mu.Unlock()
	idle := func() (bool, <-chan struct{}) {
		r.mu.Lock()
		defer r.mu.Unlock()
		return len(r.runs) == 0 && r.held == 0, r.changed
	}
	for {
		done, changed := idle()
		if done {
			return
		}
		select {
		case <-changed:
			continue
		case <-ctx.Done():
		}
		break
	}
	r.mu.Lock()
	for _, a := range r.runs {
		a.cancel(errDraining)
	}
	r.mu.Unlock()
	for {
		r.mu.Lock()
		n, changed := len(r.runs), r.changed
		r.mu.Unlock()
		if n == 0 {
			return
		}
		<-changed
	}
}

func (r *Runner) notifyLocked() {
	close(r.changed)
	r.changed = make(chan struct{})
}

// register records a run as in progress; a run id already running is
// refused.
func (r *Runner) register(id string, cancel context.CancelCauseFunc) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, dup := r.runs[id]; dup {
		return errcode.New(errcode.Conflict, "run %q is already in progress", id)
	}
	r.runs[id] = &activeRun{cancel: cancel}
	r.notifyLocked()
	return nil
}

func (r *Runner) unregister(id string) {
	r.mu.Lock()
	delete(r.runs, id)
	r.notifyLocked()
	r.mu.Unlock()
}

// Run executes req to the end and always tears down (sandbox killed,
// runtime dir and writable layer removed, permit released). It appends
// the run's events and updates its invocation row (running, then final).
// Cancelling ctx stops the run (status stopped). A nil permit is taken
// here; at capacity the run fails without starting.
func (r *Runner) Run(ctx context.Context, p *Permit, req Request) (out Outcome) {
	if p == nil {
		var err error
		if p, err = r.Acquire(); err != nil {
			return r.refuse(req, "capacity_exceeded", err)
		}
	}
	defer p.Release()
	if !events.ValidRunID(req.RunID) {
		return Outcome{Status: StatusFailed, ExitCode: -1, Reason: "invalid_request",
			Err: errcode.New(errcode.InvalidArgument, "invalid run id %q", req.RunID)}
	}
	if req.ImagePath == "" {
		return r.refuse(req, "invalid_request", errcode.New(errcode.InvalidArgument, "run %s names no image", req.RunID))
	}
	runCtx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	if err := r.register(req.RunID, cancel); err != nil {
		// Not ours to finish: the run in progress owns the id's events
		// and row.
		return Outcome{Status: StatusFailed, ExitCode: -1, Reason: "duplicate_run", Err: err}
	}
	defer r.unregister(req.RunID)

	x := &execution{r: r, req: req, log: r.log.With("run", req.RunID, "bundle", req.BundleRef), began: time.Now()}
	defer func() {
		if v := recover(); v != nil {
			x.log.Error("run panicked", "panic", v, "stack", string(debug.Stack()))
			x.out = Outcome{Status: StatusFailed, ExitCode: -1, Reason: "internal_error",
				Err: errcode.New(errcode.ProcessFailed, "run %s panicked: %v", req.RunID, v)}
		}
		x.teardown()
		x.finish()
		out = x.out
	}()
	x.execute(runCtx)
	return x.out
}

// refuse ends a run that could not begin: its completed event and row
// still say so, so that clients waiting on it are not left hanging.
func (r *Runner) refuse(req Request, reason string, err error) Outcome {
	x := &execution{r: r, req: req, log: r.log.With("run", req.RunID), began: time.Now(),
		out: Outcome{Status: StatusFailed, ExitCode: -1, Reason: reason, Err: err}}
	if events.ValidRunID(req.RunID) {
		x.finish()
	}
	return x.out
}
