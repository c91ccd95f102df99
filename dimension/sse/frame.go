package sse

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"strings"

	"github.com/hyphae-run/hyphae/errcode"
)

// MaxFrameBytes bounds one line and one frame's data when reading, so a
// hostile or broken server cannot make a client buffer without limit. It
// is well above the largest event the log stores.
const MaxFrameBytes = 16 << 20

// Frame is one dispatched SSE event, or one comment line.
type Frame struct {
	// ID is the stream's last event id when the event was dispatched (SSE
	// ids persist from one event to the next until changed).
	ID string
	// Event is the event type, "message" when the stream named none. It is
	// never empty for an event, and always empty for a comment.
	Event string
	// Data is the event's data lines joined with "\n".
	Data string
	// Comment is a comment line's text (after ':' and one optional space).
	Comment string
}

// IsComment reports whether f is a comment line rather than an event.
func (f Frame) IsComment() bool { return f.Event == "" }

// WriteFrame writes f in SSE syntax: a comment as ": text", an event as
// its id, event and data lines. Line breaks (CR, LF, CRLF) in the data
// become separate data lines, so a reader gets the data back with LF line
// breaks; line breaks in the id or event name, which the syntax cannot
// carry, are dropped, and so is NUL in the id. The id line is always
// written (empty resets the client's last event id, as for a reader).
func WriteFrame(w io.Writer, f Frame) error {
	var b strings.Builder
	if f.IsComment() {
		for _, line := range splitLines(f.Comment) {
			b.WriteString(": ")
			b.WriteString(line)
			b.WriteByte('\n')
		}
	} else {
		b.WriteString("id: ")
		b.WriteString(strings.NewReplacer("\r", "", "\n", "", "\x00", "").Replace(f.ID))
		b.WriteString("\nevent: ")
		b.WriteString(strings.NewReplacer("\r", "", "\n", "").Replace(f.Event))
		b.WriteByte('\n')
		for _, line := range splitLines(f.Data) {
			b.WriteString("data: ")
			b.WriteString(line)
			b.WriteByte('\n')
		}
	}
	b.WriteByte('\n')
	if _, err := io.WriteString(w, b.String()); err != nil {
		return errcode.Wrap(errcode.EventLogFailed, err, "writing an SSE frame")
	}
	return nil
}

func splitLines(s string) []string {
	s = strings.ReplaceAll(s, "\r\n", "\n")
	return strings.Split(strings.ReplaceAll(s, "\r", "\n"), "\n")
}

// Reader parses an SSE stream following the WHATWG event-stream rules:
// lines end with LF, CR or CRLF; a leading BOM is skipped; "field: value"
// loses one space after the colon; a line without a colon is a field with
// an empty value; unknown fields (retry among them) are ignored; an id
// containing NUL is ignored; an empty line dispatches the event when it
// has data.
type Reader struct {
	sc       *bufio.Scanner
	started  bool
	lastID   string
	event    string
	data     strings.Builder
	hasData  bool
	pending  bool // fields were read since the last dispatch
	cut      bool // the stream ended inside a line
	finished error
}

// NewReader returns a Reader of the SSE stream r.
func NewReader(r io.Reader) *Reader {
	rd := &Reader{sc: bufio.NewScanner(r)}
	rd.sc.Buffer(make([]byte, 0, 4096), MaxFrameBytes)
	rd.sc.Split(rd.scanLines)
	return rd
}

// Next returns the next event or comment. At the end of the stream it
// returns io.EOF, or io.ErrUnexpectedEOF when the stream stopped inside an
// event (which is discarded, as the standard says). A line or an event's
// data over MaxFrameBytes is a coded errcode.SizeLimit.
func (r *Reader) Next() (Frame, error) {
	if r.finished != nil {
		return Frame{}, r.finished
	}
	for r.sc.Scan() {
		line := r.sc.Bytes()
		if !r.started {
			r.started = true
			line = bytes.TrimPrefix(line, []byte("\uFEFF"))
		}
		if len(line) == 0 {
			if f, ok := r.dispatch(); ok {
				return f, nil
			}
			continue
		}
		name, value, _ := bytes.Cut(line, []byte(":"))
		value = bytes.TrimPrefix(value, []byte(" "))
		if len(name) == 0 {
			return Frame{Comment: string(value)}, nil
		}
		r.pending = true
		switch string(name) {
		case "event":
			r.event = string(value)
		case "data":
			if r.data.Len()+len(value)+1 > MaxFrameBytes {
				return Frame{}, r.fail(errcode.New(errcode.SizeLimit, "an SSE event's data is over %d bytes", MaxFrameBytes))
			}
			if r.hasData {
				r.data.WriteByte('\n')
			}
			r.data.Write(value)
			r.hasData = true
		case "id":
			if bytes.IndexByte(value, 0) < 0 {
				r.lastID = string(value)
			}
		}
	}
	if err := r.sc.Err(); err != nil {
		if errors.Is(err, bufio.ErrTooLong) {
			return Frame{}, r.fail(errcode.New(errcode.SizeLimit, "an SSE line is over %d bytes", MaxFrameBytes))
		}
		return Frame{}, r.fail(errcode.Wrap(errcode.MalformedFrame, err, "reading the SSE stream"))
	}
	if r.pending || r.cut {
		return Frame{}, r.fail(io.ErrUnexpectedEOF)
	}
	return Frame{}, r.fail(io.EOF)
}

// dispatch ends the current event at an empty line; ok is false when it
// had no data (such a block only sets the id and is not an event).
func (r *Reader) dispatch() (f Frame, ok bool) {
	if r.hasData {
		f = Frame{ID: r.lastID, Event: r.event, Data: r.data.String()}
		if f.Event == "" {
			f.Event = "message"
		}
		ok = true
	}
	r.event, r.hasData, r.pending = "", false, false
	r.data.Reset()
	return f, ok
}

func (r *Reader) fail(err error) error {
	r.finished = err
	return err
}

// scanLines splits at LF, CR or CRLF. A CR at the end of the buffer waits
// for the next byte (it may be the CR of a CRLF), and an unterminated last
// line is dropped: the standard discards an event cut off by the end.
func (r *Reader) scanLines(data []byte, atEOF bool) (advance int, token []byte, err error) {
	i := bytes.IndexAny(data, "\r\n")
	switch {
	case i < 0:
		if atEOF {
			r.cut = r.cut || len(data) > 0
			return len(data), nil, nil
		}
		return 0, nil, nil
	case data[i] == '\n':
		return i + 1, data[:i], nil
	case i+1 < len(data):
		if data[i+1] == '\n' {
			return i + 2, data[:i], nil
		}
		return i + 1, data[:i], nil
	case atEOF:
		return i + 1, data[:i], nil
	default:
		return 0, nil, nil
	}
}
