package sse

import (
	"bytes"
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"

	"github.com/hyphae-run/hyphae/errcode"
)

func readAll(t testing.TB, in string) ([]Frame, error) {
	t.Helper()
	r := NewReader(strings.NewReader(in))
	var out []Frame
	for {
		f, err := r.Next()
		if err != nil {
			return out, err
		}
		out = append(out, f)
	}
}

func TestReader(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want []Frame
		end  error
	}{
		{"one event", "id: 1\nevent: state\ndata: {\"a\":1}\n\n",
			[]Frame{{ID: "1", Event: "state", Data: `{"a":1}`}}, io.EOF},
		{"comment and heartbeat", ": hello\n\n: heartbeat\n\n",
			[]Frame{{Comment: "hello"}, {Comment: "heartbeat"}}, io.EOF},
		{"multi-line data", "data: a\ndata:b\ndata\ndata:  c\n\n",
			[]Frame{{Event: "message", Data: "a\nb\n\n c"}}, io.EOF},
		{"CRLF", "id: 7\r\nevent: x\r\ndata: y\r\n\r\n",
			[]Frame{{ID: "7", Event: "x", Data: "y"}}, io.EOF},
		{"CR only", "id: 7\revent: x\rdata: y\r\r",
			[]Frame{{ID: "7", Event: "x", Data: "y"}}, io.EOF},
		{"BOM skipped once", "\uFEFFdata: a\n\n\uFEFFdata: b\n\n",
			[]Frame{{Event: "message", Data: "a"}}, io.EOF}, // the second BOM makes an unknown field
		{"id persists and resets", "id: 5\ndata: a\n\ndata: b\n\nid\ndata: c\n\n",
			[]Frame{{ID: "5", Event: "message", Data: "a"}, {ID: "5", Event: "message", Data: "b"}, {Event: "message", Data: "c"}}, io.EOF},
		{"id with NUL ignored", "id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n",
			[]Frame{{ID: "1", Event: "message", Data: "a"}, {ID: "1", Event: "message", Data: "b"}}, io.EOF},
		{"no data, no event", "id: 9\nevent: x\n\ndata: y\n\n",
			[]Frame{{ID: "9", Event: "message", Data: "y"}}, io.EOF},
		{"empty data line is an event", "data\n\n",
			[]Frame{{Event: "message", Data: ""}}, io.EOF},
		{"unknown fields and retry ignored", "retry: 10\nfoo: bar\ndata: z\n\n",
			[]Frame{{Event: "message", Data: "z"}}, io.EOF},
		{"comment inside an event", "event: e\n: note\ndata: d\n\n",
			[]Frame{{Comment: "note"}, {Event: "e", Data: "d"}}, io.EOF},
		{"cut inside an event", "data: a\n\ndata: b\n",
			[]Frame{{Event: "message", Data: "a"}}, io.ErrUnexpectedEOF},
		{"cut inside a line", "data: a\n\ndata: b",
			[]Frame{{Event: "message", Data: "a"}}, io.ErrUnexpectedEOF},
		{"empty stream", "", nil, io.EOF},
		{"colon in value", "data: a: b\n\n", []Frame{{Event: "message", Data: "a: b"}}, io.EOF},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := readAll(t, tt.in)
			if !errors.Is(err, tt.end) {
				t.Errorf("ended with %v, want %v", err, tt.end)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("frames\n%+v\nwant\n%+v", got, tt.want)
			}
		})
	}
}

func TestReaderSizeLimit(t *testing.T) {
	line := "data: " + strings.Repeat("x", MaxFrameBytes) + "\n\n"
	if _, err := readAll(t, line); !errcode.HasCode(err, errcode.SizeLimit) {
		t.Errorf("long line: %v, want %s", err, errcode.SizeLimit)
	}
	many := strings.Repeat("data: "+strings.Repeat("y", 1<<20)+"\n", 17) + "\n"
	if _, err := readAll(t, many); !errcode.HasCode(err, errcode.SizeLimit) {
		t.Errorf("large data: %v, want %s", err, errcode.SizeLimit)
	}
}

func TestWriteFrame(t *testing.T) {
	tests := []struct {
		f    Frame
		want string
	}{
		{Frame{ID: "3", Event: "state", Data: `{"x":1}`}, "id: 3\nevent: state\ndata: {\"x\":1}\n\n"},
		{Frame{Comment: "heartbeat"}, ": heartbeat\n\n"},
		{Frame{ID: "1\n2", Event: "a\r\nb", Data: "l1\r\nl2\rl3\nl4"}, "id: 12\nevent: ab\ndata: l1\ndata: l2\ndata: l3\ndata: l4\n\n"},
	}
	for _, tt := range tests {
		var b bytes.Buffer
		if err := WriteFrame(&b, tt.f); err != nil {
			t.Fatal(err)
		}
		if b.String() != tt.want {
			t.Errorf("WriteFrame(%+v) = %q, want %q", tt.f, b.String(), tt.want)
		}
	}
}

// FuzzReader feeds arbitrary bytes to the Reader: it must not panic or
// loop, and whatever it parses must survive WriteFrame and a second parse
// unchanged.
func FuzzReader(f *testing.F) {
	for _, s := range []string{
		"id: 1\nevent: state\ndata: {\"a\":1}\n\n",
		": heartbeat\n\n",
		"data: a\r\ndata: b\r\n\r\n",
		"\uFEFFid: 2\rdata\r\r",
		"id: x\x00\ndata: y\n\n:\n",
		"event:\ndata:  z\n\nid\n\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		frames, err := readAll(t, string(in))
		if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) && !errcode.HasCode(err, errcode.SizeLimit) {
			t.Fatalf("unexpected error %v", err)
		}
		var enc bytes.Buffer
		for _, fr := range frames {
			if err := WriteFrame(&enc, fr); err != nil {
				t.Fatal(err)
			}
		}
		again, err := readAll(t, enc.String())
		if !errors.Is(err, io.EOF) {
			t.Fatalf("re-reading written frames ended with %v", err)
		}
		if !reflect.DeepEqual(frames, again) && !(len(frames) == 0 && len(again) == 0) {
			t.Fatalf("round trip differs:\n%+v\n%+v\nwritten %q", frames, again, enc.String())
		}
	})
}
