package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/hyphae-run/hyphae/dimension/runner"
	"github.com/hyphae-run/hyphae/dimension/sse"
	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/protocol"
)

// storeTimeout bounds the store writes done outside a request (job
// updates, orphan reaping), so a dead database cannot hang them.
const storeTimeout = 30 * time.Second

// runRequest is POST /run's body. timeout_secs is the processing
// timeout; boot_timeout_secs (optional, an addition to §3.4) the boot
// timeout. Each overrides the manifest's and is clamped to the server's
// maximum.
type runRequest struct {
	BundleID        string          `json:"bundle_id"`
	Mode            store.Mode      `json:"mode"`
	Payload         json.RawMessage `json:"payload"`
	TimeoutSecs     int             `json:"timeout_secs"`
	BootTimeoutSecs int             `json:"boot_timeout_secs"`
}

// runResult is a sync run's 200 body (and the details of its 5xx).
type runResult struct {
	InvocationID string `json:"invocation_id"`
	Status       string `json:"status"`
	Stdout       string `json:"stdout"`
	ExitCode     int    `json:"exit_code"`
	DurationMs   int64  `json:"duration_ms"`
	Reason       string `json:"reason,omitempty"`
	EventsURL    string `json:"events_url"`
}

// runAccepted is an async run's 202 body.
type runAccepted struct {
	InvocationID string       `json:"invocation_id"`
	Status       store.Status `json:"status"`
	EventsURL    string       `json:"events_url"`
}

func eventsURL(id string) string { return "/runs/" + id + "/events" }

// postRun starts a run of one of the caller's bundles. The permit is taken
// after auth and the bundle lookup, so neither strangers nor typos use
// capacity; at capacity the answer is 503 capacity_exceeded. A payload too
// large for the protocol's one Request frame is 413 payload_too_large
// before any of that.
func (s *Server) postRun(w http.ResponseWriter, r *http.Request) error {
	var req runRequest
	if err := decodeBody(w, r, s.opts.MaxBodyBytes, &req, false); err != nil {
		return err
	}
	if req.BundleID == "" {
		return validation("bundle_id", "bundle_id is required (a bundle id or name[:tag])")
	}
	if req.Mode == "" {
		req.Mode = store.ModeSync
	}
	if !req.Mode.Valid() {
		return validation("mode", "mode %q is neither sync nor async", req.Mode)
	}
	if req.TimeoutSecs < 0 {
		return validation("timeout_secs", "timeout_secs %d is negative", req.TimeoutSecs)
	}
	if req.BootTimeoutSecs < 0 {
		return validation("boot_timeout_secs", "boot_timeout_secs %d is negative", req.BootTimeoutSecs)
	}
	if len(req.Payload) == 0 {
		req.Payload = json.RawMessage("null")
	}
	// The payload travels in one protocol frame: one that cannot is
	// refused now, rather than after a VM has booted for it.
	id := store.NewID(store.InvocationIDPrefix)
	if n := runner.RequestFrameSize(id, req.Payload); n > protocol.MaxFrameSize {
		return apiErr(http.StatusRequestEntityTooLarge, CodePayloadTooLarge,
			fmt.Sprintf("the payload needs a %d-byte protocol frame; the guest accepts at most %d bytes", n, protocol.MaxFrameSize)).
			withDetails(map[string]any{"field": "payload", "frame_bytes": n, "max_frame_bytes": protocol.MaxFrameSize})
	}
	if err := s.refuseWhileDraining(); err != nil {
		return err
	}
	owner := callerOf(r).User.ID
	b, err := s.store.GetBundle(r.Context(), owner, req.BundleID)
	if err != nil {
		return err
	}
	permit, err := s.opts.Runner.Acquire()
	if err != nil {
		if errcode.HasCode(err, errcode.CapacityExceeded) {
			s.metrics.capacityRejects.Inc()
		}
		return err
	}
	inv, err := s.store.CreateInvocation(r.Context(), store.Invocation{
		ID: id, Owner: owner, BundleID: b.ID, BundleRef: b.Ref(),
		Mode: req.Mode, WorkerID: s.opts.WorkerID,
	})
	if err != nil {
		permit.Release()
		return err
	}
	boot, processing := runner.ResolveTimeouts(runner.Requested{BootSecs: req.BootTimeoutSecs, ProcessingSecs: req.TimeoutSecs}, b.Manifest, s.opts.Limits)
	rreq := runner.Request{
		RunID: inv.ID, UserID: owner, BundleID: b.ID, BundleRef: b.Ref(),
		ImagePath: s.opts.Images.ImagePath(b.ImageDigest), Manifest: b.Manifest, Payload: req.Payload,
		BootTimeout: boot, ProcessingTimeout: processing,
	}
	log := s.log.With("run", inv.ID, "bundle", b.Ref(), "owner", owner, "mode", req.Mode)

	if req.Mode == store.ModeAsync {
		// The run outlives the request; only a stop or the drain ends it.
		ctx, done := s.track(context.WithoutCancel(r.Context()), inv.ID)
		s.background.Add(1)
		go func() {
			defer s.background.Done()
			defer done()
			out := s.execute(ctx, permit, rreq)
			logOutcome(log, out)
		}()
		writeJSON(w, http.StatusAccepted, runAccepted{InvocationID: inv.ID, Status: store.StatusPending, EventsURL: eventsURL(inv.ID)})
		return nil
	}

	// A sync run is stopped when its client goes away: nobody is left to
	// receive its result (the events and the invocation keep it).
	ctx, done := s.track(r.Context(), inv.ID)
	out := s.execute(ctx, permit, rreq)
	done()
	logOutcome(log, out)
	res := runResult{
		InvocationID: inv.ID, Status: out.Status, Stdout: string(out.Stdout), ExitCode: out.ExitCode,
		DurationMs: out.DurationMs, Reason: out.Reason, EventsURL: eventsURL(inv.ID),
	}
	switch {
	case out.Status == runner.StatusTimedOut:
		return apiErr(http.StatusGatewayTimeout, CodeGatewayTimeout, "the run timed out").withDetails(res)
	case out.Status == runner.StatusFailed && out.ExitCode < 0:
		// The bundle never reported an exit: the sandbox or the agent
		// failed. The cause is logged; the reason is a short code.
		e := internal(out.Err)
		e.Message = "the run failed before the bundle exited (reason " + out.Reason + ")"
		return e.withDetails(res)
	}
	writeJSON(w, http.StatusOK, res)
	return nil
}

// execute runs rreq on the runner, counting it in the metrics.
func (s *Server) execute(ctx context.Context, p *runner.Permit, rreq runner.Request) runner.Outcome {
	s.metrics.runStarted()
	out := s.opts.Runner.Run(ctx, p, rreq)
	s.metrics.runEnded(out)
	return out
}

func logOutcome(log *slog.Logger, out runner.Outcome) {
	if out.Err != nil {
		log.Warn("run ended", "status", out.Status, "exit_code", out.ExitCode, "reason", out.Reason, "duration_ms", out.DurationMs, "err", out.Err)
		return
	}
	log.Info("run ended", "status", out.Status, "exit_code", out.ExitCode, "reason", out.Reason, "duration_ms", out.DurationMs)
}

// track derives the context a run executes under and registers its
// cancel, so that POST /run/{id}/stop can stop it from the moment the
// invocation exists (before the runner has registered it). done
// unregisters it.
func (s *Server) track(parent context.Context, id string) (ctx context.Context, done func()) {
	ctx, cancel := context.WithCancelCause(parent)
	s.activeMu.Lock()
	s.active[id] = cancel
	s.activeMu.Unlock()
	return ctx, func() {
		s.activeMu.Lock()
		delete(s.active, id)
		s.activeMu.Unlock()
		cancel(nil)
	}
}

// stopRun stops one of the caller's runs in progress on this gateway; it
// completes as stopped. A finished run is 409.
func (s *Server) stopRun(w http.ResponseWriter, r *http.Request) error {
	inv, err := s.callersInvocation(r)
	if err != nil {
		return err
	}
	id := inv.ID
	if inv.Status.Final() {
		return apiErr(http.StatusConflict, CodeConflict, "the run has already finished ("+string(inv.Status)+")").
			withDetails(map[string]any{"invocation_id": id, "status": inv.Status})
	}
	s.activeMu.Lock()
	cancel, ok := s.active[id]
	s.activeMu.Unlock()
	if !ok {
		// It finished between the read and now, or runs elsewhere.
		return apiErr(http.StatusConflict, CodeConflict, "the run is not in progress on this gateway").
			withDetails(map[string]any{"invocation_id": id, "status": inv.Status})
	}
	cancel(runner.ErrStopRequested)
	s.log.Info("run stop requested", "run", id, "by", callerOf(r).User.ID)
	writeJSON(w, http.StatusAccepted, map[string]string{"invocation_id": id, "status": "stopping", "events_url": eventsURL(id)})
	return nil
}

// runEvents streams one of the caller's runs as SSE, resuming after
// Last-Event-ID (or ?from_seq=) and ending after the completed event. A
// reader holds no run permit.
func (s *Server) runEvents(w http.ResponseWriter, r *http.Request) error {
	inv, err := s.callersInvocation(r)
	if err != nil {
		return err
	}
	id := inv.ID
	after, err := sse.ParseResume(r)
	if err != nil {
		return err
	}
	sub, err := s.opts.Events.Subscribe(r.Context(), id, after)
	if err != nil {
		return err
	}
	defer sub.Close()
	if sub.Ended() {
		// Resuming after the completed event: nothing is left. 204 tells
		// an EventSource not to reconnect (an empty 200 stream would make
		// it reconnect forever).
		w.WriteHeader(http.StatusNoContent)
		return nil
	}
	s.metrics.sseSubscribers.Inc()
	defer s.metrics.sseSubscribers.Dec()
	// From here the response has started: failures can only end the
	// stream (a client resumes with Last-Event-ID).
	if err := sse.Stream(w, r, sub.Events(), sse.Options{Heartbeat: s.opts.Heartbeat}); err != nil {
		if r.Context().Err() != nil || errors.Is(err, context.Canceled) {
			s.log.Debug("SSE client went away", "run", id)
		} else {
			s.log.Warn("SSE stream ended early", "run", id, "err", err)
		}
	}
	return nil
}

// invocationView is GET /invocations/{id}'s body.
type invocationView struct {
	store.Invocation
	EventsURL string `json:"events_url"`
}

func (s *Server) getInvocation(w http.ResponseWriter, r *http.Request) error {
	inv, err := s.callersInvocation(r)
	if err != nil {
		return err
	}
	id := inv.ID
	writeJSON(w, http.StatusOK, invocationView{Invocation: inv, EventsURL: eventsURL(id)})
	return nil
}

// callersInvocation returns the invocation named by the path's {id} when
// the caller owns it; another owner's id is not found, like a missing one.
func (s *Server) callersInvocation(r *http.Request) (store.Invocation, error) {
	id, err := pathID(r, "id")
	if err != nil {
		return store.Invocation{}, err
	}
	return s.store.GetInvocation(r.Context(), callerOf(r).User.ID, id)
}
