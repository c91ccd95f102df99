// Package sse streams a run's events as Server-Sent Events (the gateway's
// GET /runs/{id}/events) and reads such streams back (tests, the CLI,
// bridges).
//
// Wire format (ARCHITECTURE §3.4), one frame per event:
//
//	id: <per-run seq>
//	event: <kind>
//	data: <one-line JSON, see events.Event.DataJSON>
//
// followed by an empty line, and a ": heartbeat" comment every 15 s
// whether or not events flow. The stream ends after the run's completed
// event.
package sse

import (
	"errors"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/hyphae-run/hyphae/dimension/events"
	"github.com/hyphae-run/hyphae/errcode"
)

// Defaults for Options.
const (
	DefaultHeartbeat    = 15 * time.Second
	DefaultWriteTimeout = 30 * time.Second
)

// Options configure Stream.
type Options struct {
	// Heartbeat is the interval of the ": heartbeat" comments, so proxies
	// and clients can tell a quiet run from a dead connection. It is a
	// fixed tick (§3.4: every 15 s), not an idle timeout: a busy stream
	// carries them too, and a client can rely on their rate. 0 means
	// DefaultHeartbeat.
	Heartbeat time.Duration
	// WriteTimeout bounds each write to the client, so a client that stops
	// reading is dropped instead of holding the handler forever; 0 means
	// DefaultWriteTimeout. Ignored when the ResponseWriter cannot set
	// deadlines.
	WriteTimeout time.Duration
}

// Stream writes the events arriving on sub to w as an SSE response until
// the run's completed event (it returns nil), the client goes away (the
// request context's error), a write fails, or sub is closed before the
// completed event (a coded errcode.EventLogFailed; the subscription's own
// Err says why). It sets the SSE headers and flushes after every frame.
func Stream(w http.ResponseWriter, r *http.Request, sub <-chan events.Event, opts Options) error {
	if opts.Heartbeat <= 0 {
		opts.Heartbeat = DefaultHeartbeat
	}
	if opts.WriteTimeout <= 0 {
		opts.WriteTimeout = DefaultWriteTimeout
	}
	rc := http.NewResponseController(w)
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	// nginx buffers proxied responses unless told not to.
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)

	// send writes one frame and pushes it to the client at once.
	send := func(f Frame) error {
		if err := rc.SetWriteDeadline(time.Now().Add(opts.WriteTimeout)); err != nil && !errors.Is(err, http.ErrNotSupported) {
			return errcode.Wrap(errcode.EventLogFailed, err, "setting the SSE write deadline")
		}
		if err := WriteFrame(w, f); err != nil {
			return err
		}
		if err := rc.Flush(); err != nil {
			return errcode.Wrap(errcode.EventLogFailed, err, "flushing the SSE stream")
		}
		return nil
	}
	// Flush the headers now: a client waiting on a quiet run should see
	// the stream open, not a pending request.
	if err := rc.Flush(); err != nil {
		return errcode.Wrap(errcode.EventLogFailed, err, "the response writer cannot stream")
	}
	heartbeat := time.NewTicker(opts.Heartbeat)
	defer heartbeat.Stop()
	for {
		select {
		case <-r.Context().Done():
			return r.Context().Err()
		case <-heartbeat.C:
			if err := send(Frame{Comment: "heartbeat"}); err != nil {
				return err
			}
		case ev, ok := <-sub:
			if !ok {
				return errcode.New(errcode.EventLogFailed, "the event stream ended before the run's completed event")
			}
			data, err := ev.DataJSON()
			if err != nil {
				return err
			}
			if err := send(Frame{ID: strconv.FormatUint(ev.Seq, 10), Event: ev.Kind, Data: string(data)}); err != nil {
				return err
			}
			if ev.IsCompleted() {
				return nil
			}
		}
	}
}

// ParseResume returns the sequence to resume after: the Last-Event-ID
// header (what a reconnecting EventSource sends) or else the from_seq
// query parameter; 0 (from the start) when neither is given. A value that
// is not a decimal uint64 is a coded errcode.InvalidArgument (the gateway's
// validation_error).
func ParseResume(r *http.Request) (uint64, error) {
	if v := strings.TrimSpace(r.Header.Get("Last-Event-ID")); v != "" {
		return parseSeq("Last-Event-ID header", v)
	}
	if v := r.URL.Query().Get("from_seq"); v != "" {
		return parseSeq("from_seq", v)
	}
	return 0, nil
}

func parseSeq(what, v string) (uint64, error) {
	n, err := strconv.ParseUint(v, 10, 64)
	if err != nil {
		shown := v
		if len(shown) > 40 {
			shown = shown[:40] + "…"
		}
		return 0, errcode.New(errcode.InvalidArgument, "%s %q is not an event id", what, shown).
			WithHint("event ids are the decimal numbers sent in the stream's id: lines")
	}
	return n, nil
}
