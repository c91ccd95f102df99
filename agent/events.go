package agent

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"strings"
	"unicode/utf8"

	"github.com/hyphae-run/hyphae/errcode"
)

// Events socket frame limits (ARCHITECTURE.md §3.3).
const (
	// MaxEventFrame is the largest JSON document one events-socket frame
	// may carry.
	MaxEventFrame = 262144
	// DefaultEventKind and DefaultEventContentType apply when a frame
	// leaves kind or contentType out.
	DefaultEventKind        = "bundle"
	DefaultEventContentType = "application/json"
	// maxKindLen and maxContentTypeLen bound the header-like strings,
	// which end up as SSE event names and HTTP-ish values on the host.
	maxKindLen        = 128
	maxContentTypeLen = 256
)

// reservedKind reports the kinds that the agent and the runner emit
// themselves; a bundle that could send them would forge its own stderr,
// stdout or run state.
func reservedKind(kind string) bool {
	switch kind {
	case KindStderr, KindStdoutFinal, KindState:
		return true
	}
	return false
}

// Event is one decoded events-socket frame.
type Event struct {
	Kind        string
	ContentType string
	// Body is the raw bytes of a string body, or the compact JSON of any
	// other body.
	Body  []byte
	Attrs map[string]string
}

// eventJSON is the wire shape of a frame. Pointers tell "absent" from
// "empty".
type eventJSON struct {
	Kind        *string           `json:"kind"`
	ContentType *string           `json:"contentType"`
	Body        json.RawMessage   `json:"body"`
	Attrs       map[string]string `json:"attrs"`
}

// ParseEvent decodes the JSON document of one frame. Errors are
// errcode.MalformedFrame.
func ParseEvent(doc []byte) (Event, error) {
	if !utf8.Valid(doc) {
		return Event{}, errcode.New(errcode.MalformedFrame, "event frame is not valid UTF-8")
	}
	var raw eventJSON
	if err := json.Unmarshal(doc, &raw); err != nil {
		return Event{}, errcode.Wrap(errcode.MalformedFrame, err, "event frame is not a JSON object of the expected shape")
	}
	if raw.Body == nil {
		return Event{}, errcode.New(errcode.MalformedFrame, `event frame has no "body"`)
	}
	ev := Event{Kind: DefaultEventKind, ContentType: DefaultEventContentType, Attrs: raw.Attrs}
	if raw.Kind != nil && *raw.Kind != "" {
		ev.Kind = *raw.Kind
	}
	if raw.ContentType != nil && *raw.ContentType != "" {
		ev.ContentType = *raw.ContentType
	}
	if err := checkToken("kind", ev.Kind, maxKindLen); err != nil {
		return Event{}, err
	}
	if reservedKind(ev.Kind) {
		return Event{}, errcode.New(errcode.MalformedFrame, "event kind %q is reserved", ev.Kind)
	}
	if err := checkToken("contentType", ev.ContentType, maxContentTypeLen); err != nil {
		return Event{}, err
	}
	var s string
	if raw.Body[0] == '"' && json.Unmarshal(raw.Body, &s) == nil {
		ev.Body = []byte(s)
		return ev, nil
	}
	var b bytes.Buffer
	if err := json.Compact(&b, raw.Body); err != nil {
		return Event{}, errcode.Wrap(errcode.MalformedFrame, err, "event body")
	}
	ev.Body = b.Bytes()
	return ev, nil
}

// checkToken refuses values that would break a line-oriented consumer
// (an SSE "event:" line, a header): control characters or over-long.
func checkToken(field, v string, max int) error {
	if len(v) > max {
		return errcode.New(errcode.MalformedFrame, "event %s is longer than %d bytes", field, max)
	}
	if strings.ContainsFunc(v, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
		return errcode.New(errcode.MalformedFrame, "event %s %q holds a control character", field, v)
	}
	if field == "kind" && strings.ContainsAny(v, " :") {
		return errcode.New(errcode.MalformedFrame, "event kind %q holds a space or colon", v)
	}
	return nil
}

// frameReader reads events-socket frames from one connection, reusing one
// buffer of at most MaxEventFrame bytes.
type frameReader struct {
	r   io.Reader
	hdr [4]byte
	buf []byte
}

// next returns the next frame's JSON document (valid until the next call).
// It returns io.EOF at a clean end between frames; a length outside
// 1..MaxEventFrame or a truncated frame is errcode.MalformedFrame, checked
// before the body is read or allocated.
func (f *frameReader) next() ([]byte, error) {
	if _, err := io.ReadFull(f.r, f.hdr[:]); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, io.EOF
		}
		return nil, errcode.Wrap(errcode.MalformedFrame, err, "reading an event frame length")
	}
	n := binary.LittleEndian.Uint32(f.hdr[:])
	if n == 0 || n > MaxEventFrame {
		return nil, errcode.New(errcode.MalformedFrame, "event frame length %d is outside 1..%d", n, MaxEventFrame)
	}
	if cap(f.buf) < int(n) {
		f.buf = make([]byte, n)
	}
	b := f.buf[:n]
	if _, err := io.ReadFull(f.r, b); err != nil {
		return nil, errcode.Wrap(errcode.MalformedFrame, err, "reading a %d-byte event frame", n)
	}
	return b, nil
}
