package runner

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"strconv"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/hyphae-run/hyphae/agent"
	"github.com/hyphae-run/hyphae/dimension/events"
	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/protocol"
	"github.com/hyphae-run/hyphae/protocol/pb"
)

// stopSlack is how long after the bundle's grace the agent has to report
// Done before the sandbox itself is stopped.
const stopSlack = 2 * time.Second

// execution is one run inside Run. Only its goroutine appends events, so
// the run's sequence is the order in which they happened.
type execution struct {
	r     *Runner
	req   Request
	log   *slog.Logger
	began time.Time

	sess Session
	// stopSandbox asks teardown for a graceful sandbox stop before Close:
	// the agent did not end the run itself.
	stopSandbox bool
	out         Outcome
}

// inbound is one envelope (or the error that ended the channel).
type inbound struct {
	env *pb.Envelope
	err error
}

// execute boots, delivers the payload and relays until Done, a timeout, a
// stop or a broken channel. It fills x.out; finish completes the run.
func (x *execution) execute(ctx context.Context) {
	req := x.req
	x.out = Outcome{Status: StatusFailed, ExitCode: -1}
	bootTO, procTO := req.BootTimeout, req.ProcessingTimeout
	if bootTO <= 0 || procTO <= 0 {
		b, p := ResolveTimeouts(Requested{}, req.Manifest, x.r.opts.Limits)
		bootTO, procTO = orDefault(bootTO, b), orDefault(procTO, p)
	}
	be := x.r.opts.Backend
	x.state(PhaseStarted, map[string]any{
		"vmm": be.Name(), "mock": be.Mock(),
		"boot_timeout_ms": bootTO.Milliseconds(), "processing_timeout_ms": procTO.Milliseconds(),
	}, map[string]string{AttrVMM: be.Name()})
	began := x.began
	x.update(store.InvocationUpdate{Status: store.StatusRunning, WorkerID: x.r.opts.WorkerID, StartedAt: &began})

	bootCtx, cancelBoot := context.WithTimeout(ctx, bootTO)
	sess, err := be.Start(bootCtx, BootRequest{
		RunID: req.RunID, ImagePath: req.ImagePath,
		VCPUs: req.Manifest.VCPUs, MemoryMiB: req.Manifest.MemoryMiB,
		Entrypoint: req.Manifest.Entrypoint,
	})
	bootErr := bootCtx.Err()
	cancelBoot()
	if err != nil {
		switch {
		case ctx.Err() != nil:
			x.out.Status, x.out.Reason = StatusStopped, stopReason(ctx)
		case errors.Is(bootErr, context.DeadlineExceeded):
			x.out.Status, x.out.Reason = StatusTimedOut, "boot_timeout"
		default:
			x.out.Status, x.out.Reason = StatusFailed, "boot_failed"
		}
		x.out.Err = err
		x.log.Warn("sandbox did not start", "reason", x.out.Reason, "err", err)
		return
	}
	x.sess = sess
	bootMs := time.Since(x.began).Milliseconds()
	x.log.Info("sandbox ready", "vmm", be.Name(), "boot_ms", bootMs)

	conn := sess.Conn()
	msgs := make(chan inbound)
	quit := make(chan struct{})
	defer close(quit)
	go readChannel(conn, msgs, quit)

	procTimer := time.NewTimer(procTO)
	defer procTimer.Stop()
	w := protocol.NewWriter(conn)
	written := make(chan error, 1)
	go func() {
		written <- w.WriteEnvelope(requestEnvelope(req.RunID, req.Payload))
	}()
	select {
	case err := <-written:
		if err != nil {
			x.channelFailed(err)
			return
		}
	case <-procTimer.C:
		x.out.Status, x.out.Reason = StatusTimedOut, "processing_timeout"
		x.stopSandbox = true
		return
	case <-ctx.Done():
		x.out.Status, x.out.Reason = StatusStopped, stopReason(ctx)
		x.stopSandbox = true
		return
	}
	x.state(PhasePayloadDelivered, map[string]any{"boot_ms": bootMs, "bytes": len(req.Payload)}, nil)
	x.relay(ctx, msgs, procTimer, w)
}

// requestEnvelope is the Request that delivers a run's payload.
func requestEnvelope(runID string, payload []byte) *pb.Envelope {
	return &pb.Envelope{RequestId: runID, Payload: &pb.Envelope_Request{Request: &pb.Request{Payload: payload}}}
}

// RequestFrameSize is the encoded size of the Request envelope that would
// deliver payload to run runID. Over protocol.MaxFrameSize the payload
// cannot be delivered, so callers refuse it before booting anything.
func RequestFrameSize(runID string, payload []byte) int {
	return proto.Size(requestEnvelope(runID, payload))
}

// relay appends what the agent sends until Done. A timeout or a stop sends
// the agent a ShutdownRequest and keeps relaying for the bundle's grace;
// when Done does not come, the sandbox is stopped by teardown.
func (x *execution) relay(ctx context.Context, msgs <-chan inbound, procTimer *time.Timer, w *protocol.Writer) {
	grace := x.r.opts.StopGrace
	var stopDeadline <-chan time.Time
	stopping := false
	beginStop := func(status, reason string) {
		if stopping {
			return
		}
		stopping = true
		x.out.Status, x.out.Reason = status, reason
		x.log.Info("stopping run", "reason", reason)
		// A hung guest may never read this: the write must not hold the
		// run, and it fails once teardown closes the channel.
		go func() {
			_ = w.WriteEnvelope(&pb.Envelope{RequestId: x.req.RunID, Payload: &pb.Envelope_ShutdownRequest{
				ShutdownRequest: &pb.ShutdownRequest{Reason: reason, GraceMs: uint32(grace.Milliseconds())}}})
		}()
		t := time.NewTimer(grace + stopSlack)
		stopDeadline = t.C
	}
	ctxDone := ctx.Done()
	for {
		select {
		case m := <-msgs:
			if m.err != nil {
				x.stopSandbox = true
				if !stopping {
					err := m.err
					if errors.Is(err, io.EOF) {
						err = errcode.New(errcode.ChannelFailed, "the channel closed before the agent reported Done")
					}
					x.channelFailed(err)
				}
				return
			}
			if x.handle(m.env, stopping) {
				return
			}
		case <-procTimer.C:
			beginStop(StatusTimedOut, "processing_timeout")
		case <-ctxDone:
			ctxDone = nil
			beginStop(StatusStopped, stopReason(ctx))
		case <-stopDeadline:
			x.log.Warn("the agent did not finish within the stop grace; stopping the sandbox")
			x.stopSandbox = true
			return
		}
	}
}

// handle appends one envelope's event and reports whether it was Done.
func (x *execution) handle(env *pb.Envelope, stopping bool) bool {
	switch p := env.GetPayload().(type) {
	case *pb.Envelope_Outbound:
		x.relayOutbound(p.Outbound)
	case *pb.Envelope_Error:
		e := p.Error
		code := strings.ToLower(strings.TrimPrefix(e.GetCode().String(), "ERROR_CODE_"))
		x.emitError("agent", code, e.GetMessage(), e.GetDetail(), e.GetTerminal())
		if e.GetTerminal() && x.out.Err == nil {
			x.out.Err = errcode.New(errcode.ProcessFailed, "agent: %s: %s (%s)", code, e.GetMessage(), e.GetDetail())
		}
	case *pb.Envelope_Done:
		d := p.Done
		x.out.ExitCode = int(d.GetExitCode())
		body := map[string]any{"exit_code": x.out.ExitCode, "success": d.GetSuccess()}
		if s, err := strconv.Atoi(d.GetMetadata()["signal"]); err == nil && s > 0 {
			body["signal"] = s
		}
		x.state(PhaseProcessExited, body, nil)
		if !stopping {
			switch {
			case x.out.Err != nil:
				x.out.Status, x.out.Reason = StatusFailed, "agent_error"
			case x.out.ExitCode != 0 || !d.GetSuccess():
				x.out.Status, x.out.Reason = StatusFailed, "exit_code"
			default:
				x.out.Status, x.out.Reason = StatusCompleted, ""
			}
		}
		return true
	case *pb.Envelope_ShutdownAck:
		x.log.Debug("agent acknowledged the shutdown request")
	default:
		x.emitError("runner", "protocol_violation", fmt.Sprintf("the agent sent an unexpected %T", env.GetPayload()), "", false)
	}
	return false
}

// relayOutbound appends one of the agent's messages as it came. The kind
// "state" is the runner's own and is refused, as is anything the event log
// refuses (a kind it cannot carry), each with an error event in its place.
func (x *execution) relayOutbound(m *pb.OutboundMessage) {
	if m.GetKind() == events.KindState {
		x.emitError("runner", "event_rejected", "the kind \"state\" is reserved for the runner", "", false)
		return
	}
	attrs := maps.Clone(m.GetAttributes())
	if attrs == nil {
		attrs = map[string]string{}
	}
	// Only the runner says whether a run is mocked, and who raised an
	// error: a bundle may send events of kind "error", but none that
	// passes for the agent's or the runner's own.
	delete(attrs, AttrMock)
	delete(attrs, AttrSource)
	if m.GetKind() == agent.KindStdoutFinal {
		x.out.Stdout = m.GetBody()
	}
	if err := x.append(m.GetKind(), m.GetContentType(), m.GetBody(), attrs); err != nil && errcode.HasCode(err, errcode.InvalidArgument) {
		x.emitError("runner", "event_rejected", "the event log refused a bundle event", err.Error(), false)
	}
}

// emitError appends a kind "error" event.
func (x *execution) emitError(source, code, message, detail string, terminal bool) {
	body, _ := json.Marshal(map[string]any{"code": code, "message": message, "detail": detail, "terminal": terminal})
	_ = x.append(KindError, "application/json", body, map[string]string{AttrSource: source})
}

// state appends a state event: body fields plus the phase.
func (x *execution) state(phase string, fields map[string]any, attrs map[string]string) {
	body := map[string]any{"phase": phase}
	maps.Copy(body, fields)
	b, err := json.Marshal(body)
	if err != nil {
		x.log.Error("encoding a state event", "phase", phase, "err", err)
		return
	}
	_ = x.append(events.KindState, "application/json", b, attrs)
}

// append writes one event of this run. Failures are logged and returned;
// they never end the run (a stopped event log must not leave VMs behind).
func (x *execution) append(kind, contentType string, body []byte, attrs map[string]string) error {
	if x.r.opts.Backend.Mock() {
		if attrs == nil {
			attrs = map[string]string{}
		}
		attrs[AttrMock] = "true"
	}
	ctx, cancel := context.WithTimeout(context.Background(), appendTimeout)
	defer cancel()
	_, err := x.r.opts.Events.Append(ctx, events.Event{
		RunID: x.req.RunID, Kind: kind, ContentType: contentType, Body: body, Attrs: attrs,
		WorkerID: x.r.opts.WorkerID, BundleID: x.req.BundleID, UserID: x.req.UserID,
	})
	if err != nil {
		x.log.Warn("appending an event failed", "kind", kind, "err", err)
	}
	return err
}

// update applies u to the invocation row, when there is a store.
func (x *execution) update(u store.InvocationUpdate) {
	if x.r.opts.Store == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), appendTimeout)
	defer cancel()
	if _, err := x.r.opts.Store.UpdateInvocation(ctx, x.req.RunID, u); err != nil {
		x.log.Warn("updating the invocation failed", "status", u.Status, "err", err)
	}
}

// teardown stops (when the agent did not end the run) and closes the
// sandbox.
func (x *execution) teardown() {
	if x.sess == nil {
		return
	}
	if x.stopSandbox {
		ctx, cancel := context.WithTimeout(context.Background(), x.r.opts.VMStopTimeout+time.Second)
		if err := x.sess.Stop(ctx, x.r.opts.VMStopTimeout); err != nil {
			x.log.Warn("graceful sandbox stop failed; killing it", "err", err)
			_ = x.sess.Kill()
		}
		cancel()
	}
	if err := x.sess.Close(); err != nil {
		x.log.Warn("sandbox teardown failed", "err", err)
	}
}

// finish writes the row's final status, then appends the completed event:
// in that order, so that a client that has seen `completed` on the stream
// and then reads GET /invocations/{id} finds the final status there.
func (x *execution) finish() {
	x.out.DurationMs = time.Since(x.began).Milliseconds()
	now, dur := time.Now(), x.out.DurationMs
	u := store.InvocationUpdate{Status: store.Status(x.out.Status), CompletedAt: &now, DurationMS: &dur, Error: x.out.Reason}
	if x.out.ExitCode >= 0 {
		code := x.out.ExitCode
		u.ExitCode = &code
	}
	x.update(u)
	body := map[string]any{"status": x.out.Status, "exit_code": x.out.ExitCode, "duration_ms": x.out.DurationMs}
	if x.out.Reason != "" {
		body["reason"] = x.out.Reason
	}
	x.state(PhaseCompleted, body, nil)
	level := slog.LevelInfo
	if x.out.Err != nil {
		level = slog.LevelWarn
	}
	x.log.Log(context.Background(), level, "run completed", "status", x.out.Status, "reason", x.out.Reason,
		"exit_code", x.out.ExitCode, "duration_ms", x.out.DurationMs, "err", x.out.Err)
}

// channelFailed ends the run on a broken host↔guest channel. Both the
// outcome's error (logged by the caller) and the error event (seen by the
// run's owner) carry the sandbox's console tail: for a guest that never
// spoke the protocol (an image without the agent, a crashed init) it is
// the only clue there is. The tail is bounded by the backend.
func (x *execution) channelFailed(err error) {
	x.stopSandbox = true
	tail := strings.TrimSpace(x.sess.ConsoleTail())
	if tail != "" {
		err = fmt.Errorf("%w; the console ends:\n%s", err, tail)
	}
	x.out.Status, x.out.Reason, x.out.Err = StatusFailed, "channel_failed", err
	x.emitError("runner", "channel_failed", "the host↔guest channel failed before the run ended", tail, true)
}

// readChannel reads envelopes until the channel fails or quit closes,
// handing each to the run without buffering: a guest that floods waits
// for the event log.
func readChannel(conn io.Reader, out chan<- inbound, quit <-chan struct{}) {
	r := protocol.NewReader(conn)
	for {
		env, err := r.ReadEnvelope()
		if err == nil && protocol.IsEmpty(env) {
			continue
		}
		select {
		case out <- inbound{env, err}:
		case <-quit:
			return
		}
		if err != nil {
			return
		}
	}
}

// stopReason names why a run's context ended.
func stopReason(ctx context.Context) string {
	switch context.Cause(ctx) {
	case ErrStopRequested:
		return "stop_requested"
	case errDraining:
		return "draining"
	}
	return "cancelled"
}

func orDefault(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}
