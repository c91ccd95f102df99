// Package events is dimension's durable per-run event log with a live tail.
//
// Every run's events (state changes, the bundle's own events, stderr lines,
// the final stdout) are appended to one NATS JetStream stream, one subject
// per run (runs.<id>). A subscriber replays a run from any point and then
// follows it live on one ordered consumer, so there is no hand-off between
// a history query and a live subscription in which events could be lost or
// repeated. By default the NATS server is embedded in the process; an
// external server or cluster can be used instead for multi-host setups.
//
// Each event carries a per-run sequence (1, 2, 3, … in the order the run's
// single writer appended them); it is what the SSE "id" field shows and
// what Last-Event-ID resumes after. See Log for how it is kept.
package events

import (
	"bytes"
	"encoding/json"
	"mime"
	"strings"
	"unicode/utf8"

	"github.com/hyphae-run/hyphae/errcode"
)

// Kinds and phases the runner emits; bundles may use other kinds.
const (
	// KindState is the kind of the runner's lifecycle events, whose JSON
	// body has a "phase".
	KindState = "state"
	// PhaseCompleted is the phase of a run's last event. A subscription
	// ends after delivering it.
	PhaseCompleted = "completed"
)

// Limits on event fields, so that they fit NATS headers and SSE lines.
const (
	// MaxRunIDLen bounds run ids (they become NATS subject tokens).
	MaxRunIDLen = 128
	// MaxKindLen bounds kinds (they become SSE "event:" lines).
	MaxKindLen = 256
)

// Event is one entry of a run's log.
type Event struct {
	// RunID is the run the event belongs to: [A-Za-z0-9_-], 1..128 bytes.
	RunID string
	// Seq is the event's position in its run, from 1, assigned by
	// Log.Append (ignored on input).
	Seq uint64
	// TsMs is when the event happened, in Unix milliseconds; Append sets it
	// to the current time when zero.
	TsMs int64
	// Kind is "state", "stderr", "stdout-final" or a bundle's own kind.
	Kind string
	// ContentType is the body's media type; JSON types (application/json,
	// anything+json) make the body appear parsed in the SSE data.
	ContentType string
	// Body is the event's payload, raw bytes.
	Body []byte
	// Attrs are free-form string attributes (such as a truncation flag).
	Attrs map[string]string
	// WorkerID, BundleID and UserID say where the run ran, what it ran and
	// for whom.
	WorkerID, BundleID, UserID string
}

// ValidRunID reports whether id can name a run: 1..MaxRunIDLen bytes of
// [A-Za-z0-9_-]. The rule keeps ids usable as one NATS subject token (no
// '.', '*', '>' or whitespace) and in URLs without escaping.
func ValidRunID(id string) bool {
	if id == "" || len(id) > MaxRunIDLen {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '_', c == '-':
		default:
			return false
		}
	}
	return true
}

func checkRunID(id string) error {
	if !ValidRunID(id) {
		return errcode.New(errcode.InvalidArgument, "invalid run id %q", truncate(id, 80)).
			WithHint("run ids are 1-128 characters of A-Z, a-z, 0-9, '_' and '-'")
	}
	return nil
}

// validate checks what Append needs: a valid run id and a kind that can be
// written as one SSE line.
func (e *Event) validate() error {
	if err := checkRunID(e.RunID); err != nil {
		return err
	}
	if e.Kind == "" || len(e.Kind) > MaxKindLen || !utf8.ValidString(e.Kind) || strings.IndexFunc(e.Kind, isControl) >= 0 {
		return errcode.New(errcode.InvalidArgument, "invalid event kind %q for run %s", truncate(e.Kind, 80), e.RunID).
			WithHint("kinds are 1-256 bytes of UTF-8 without control characters")
	}
	return nil
}

func isControl(r rune) bool { return r < 0x20 || r == 0x7f }

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// IsJSON reports whether contentType names JSON: application/json or any
// type with a +json suffix, parameters (charset) ignored.
func IsJSON(contentType string) bool {
	mt, _, err := mime.ParseMediaType(contentType)
	if err != nil {
		return false
	}
	return mt == "application/json" || strings.HasSuffix(mt, "+json")
}

// IsCompleted reports whether e is the run's final event: kind "state"
// with a JSON body whose phase is "completed".
func (e Event) IsCompleted() bool {
	if e.Kind != KindState {
		return false
	}
	var b struct {
		Phase string `json:"phase"`
	}
	return json.Unmarshal(e.Body, &b) == nil && b.Phase == PhaseCompleted
}

// data is the SSE data object of §3.4, field for field.
type data struct {
	RunID       string            `json:"run_id"`
	TsMs        int64             `json:"ts_ms"`
	ContentType string            `json:"content_type"`
	Body        json.RawMessage   `json:"body"`
	Attrs       map[string]string `json:"attrs"`
	WorkerID    string            `json:"worker_id"`
	BundleID    string            `json:"bundle_id"`
	UserID      string            `json:"user_id"`
}

// DataJSON renders e as the one-line JSON object of an SSE "data:" field:
// {"run_id","ts_ms","content_type","body","attrs","worker_id","bundle_id",
// "user_id"}. The body is the parsed (compacted) JSON value when the
// content type is JSON and the bytes are valid JSON; otherwise it is a
// string. SSE is a text protocol, so bytes that are not valid UTF-8 are
// rendered as U+FFFD (as a browser's decoder would), in the body and in
// every other string; the log keeps the original bytes. Attrs is {} when
// empty, never null.
func (e Event) DataJSON() ([]byte, error) {
	d := data{
		RunID:       e.RunID,
		TsMs:        e.TsMs,
		ContentType: validUTF8(e.ContentType),
		Attrs:       make(map[string]string, len(e.Attrs)),
		WorkerID:    validUTF8(e.WorkerID),
		BundleID:    validUTF8(e.BundleID),
		UserID:      validUTF8(e.UserID),
	}
	for k, v := range e.Attrs {
		d.Attrs[validUTF8(k)] = validUTF8(v)
	}
	var compact bytes.Buffer
	if IsJSON(e.ContentType) && json.Compact(&compact, e.Body) == nil {
		d.Body = compact.Bytes()
	} else {
		s, err := marshalNoEscape(validUTF8(string(e.Body)))
		if err != nil {
			return nil, err
		}
		d.Body = s
	}
	return marshalNoEscape(d)
}

// validUTF8 replaces each run of invalid bytes with one U+FFFD, so that
// the data renders the same whether it is made from stored bytes or from
// what a client parsed (encoding/json would otherwise emit \ufffd
// escapes for the former and literal U+FFFD for the latter).
func validUTF8(s string) string { return strings.ToValidUTF8(s, "\uFFFD") }

// marshalNoEscape is json.Marshal without HTML escaping (<, >, & stay
// readable) and without the encoder's trailing newline. encoding/json
// escapes every control character, so the result is one line.
func marshalNoEscape(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, errcode.Wrap(errcode.InvalidArgument, err, "encoding event data")
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}

// ParseData is the inverse of DataJSON for clients of the SSE stream: it
// rebuilds an Event from the frame's id (seq), event name (kind) and data.
// With a JSON content type the body is kept as its JSON text (a body that
// was not valid JSON was rendered as a string and comes back as that
// string literal); otherwise the string body becomes its UTF-8 bytes.
func ParseData(seq uint64, kind string, raw []byte) (Event, error) {
	var d data
	if err := json.Unmarshal(raw, &d); err != nil {
		return Event{}, errcode.Wrap(errcode.MalformedFrame, err, "event data is not the expected JSON object")
	}
	ev := Event{
		RunID: d.RunID, Seq: seq, TsMs: d.TsMs, Kind: kind, ContentType: d.ContentType,
		Attrs: d.Attrs, WorkerID: d.WorkerID, BundleID: d.BundleID, UserID: d.UserID,
	}
	var s string
	switch {
	case len(d.Body) == 0:
	case json.Unmarshal(d.Body, &s) == nil && !IsJSON(d.ContentType):
		ev.Body = []byte(s)
	default:
		ev.Body = []byte(d.Body)
	}
	return ev, nil
}
