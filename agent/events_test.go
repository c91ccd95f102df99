package agent

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"testing"
	"testing/iotest"

	"golang.org/x/sys/unix"

	"github.com/hyphae-run/hyphae/errcode"
)

func TestParseEvent(t *testing.T) {
	tests := []struct {
		name, doc string
		want      Event
		bad       bool
	}{
		{name: "defaults", doc: `{"body":{"a": 1}}`, want: Event{Kind: "bundle", ContentType: "application/json", Body: []byte(`{"a":1}`)}},
		{name: "string body is raw", doc: `{"kind":"log","contentType":"text/plain","body":"line \"q\"\n"}`, want: Event{Kind: "log", ContentType: "text/plain", Body: []byte("line \"q\"\n")}},
		{name: "number body", doc: `{"body": 42 }`, want: Event{Kind: "bundle", ContentType: "application/json", Body: []byte(`42`)}},
		{name: "null body", doc: `{"body":null}`, want: Event{Kind: "bundle", ContentType: "application/json", Body: []byte(`null`)}},
		{name: "attrs", doc: `{"kind":"p","body":[1, 2],"attrs":{"k":"v"}}`, want: Event{Kind: "p", ContentType: "application/json", Body: []byte(`[1,2]`), Attrs: map[string]string{"k": "v"}}},
		{name: "empty kind defaults", doc: `{"kind":"","body":1}`, want: Event{Kind: "bundle", ContentType: "application/json", Body: []byte(`1`)}},
		{name: "missing body", doc: `{"kind":"x"}`, bad: true},
		{name: "not JSON", doc: `{"body":`, bad: true},
		{name: "array", doc: `[1]`, bad: true},
		{name: "non-string attr", doc: `{"body":1,"attrs":{"k":1}}`, bad: true},
		{name: "kind not a string", doc: `{"kind":1,"body":1}`, bad: true},
		{name: "invalid UTF-8", doc: "{\"body\":\"\xc3\x28\"}", bad: true},
		{name: "reserved kind", doc: `{"kind":"stdout-final","body":1}`, bad: true},
		{name: "newline in kind", doc: `{"kind":"a\nb","body":1}`, bad: true},
		{name: "colon in kind", doc: `{"kind":"a:b","body":1}`, bad: true},
		{name: "control in content type", doc: `{"contentType":"a\r\nX: y","body":1}`, bad: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseEvent([]byte(tt.doc))
			if tt.bad {
				if !errcode.HasCode(err, errcode.MalformedFrame) {
					t.Fatalf("err = %v, want MalformedFrame", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.Kind != tt.want.Kind || got.ContentType != tt.want.ContentType || !bytes.Equal(got.Body, tt.want.Body) || len(got.Attrs) != len(tt.want.Attrs) {
				t.Fatalf("got %+v (body %q), want %+v", got, got.Body, tt.want)
			}
		})
	}
}

func eventFrame(doc string) []byte {
	return append(binary.LittleEndian.AppendUint32(nil, uint32(len(doc))), doc...)
}

func TestFrameReader(t *testing.T) {
	stream := append(eventFrame(`{"body":1}`), eventFrame(`{"body":2}`)...)
	fr := &frameReader{r: iotest.OneByteReader(bytes.NewReader(stream))}
	for _, want := range []string{`{"body":1}`, `{"body":2}`} {
		doc, err := fr.next()
		if err != nil || string(doc) != want {
			t.Fatalf("next = %q, %v; want %q", doc, err, want)
		}
	}
	if _, err := fr.next(); err != io.EOF {
		t.Fatalf("at end: %v, want io.EOF", err)
	}
	for name, data := range map[string][]byte{
		"zero length":      binary.LittleEndian.AppendUint32(nil, 0),
		"over the limit":   binary.LittleEndian.AppendUint32(nil, MaxEventFrame+1),
		"truncated header": {1, 0},
		"truncated body":   eventFrame(`{"body":1}`)[:8],
	} {
		_, err := (&frameReader{r: bytes.NewReader(data)}).next()
		if !errcode.HasCode(err, errcode.MalformedFrame) || errors.Is(err, io.EOF) {
			t.Errorf("%s: err = %v, want MalformedFrame", name, err)
		}
	}
}

func FuzzEventFrame(f *testing.F) {
	f.Add(eventFrame(`{"kind":"p","body":{"a":[1,"x"]},"attrs":{"k":"v"}}`))
	f.Add(eventFrame(`{"body":"raw"}`))
	f.Add(binary.LittleEndian.AppendUint32(nil, MaxEventFrame+1))
	f.Add([]byte{0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		fr := &frameReader{r: bytes.NewReader(data)}
		for {
			doc, err := fr.next()
			if err != nil {
				if err != io.EOF && !errcode.HasCode(err, errcode.MalformedFrame) {
					t.Fatalf("unexpected error %v", err)
				}
				return
			}
			if len(doc) == 0 || len(doc) > MaxEventFrame || cap(fr.buf) > MaxEventFrame {
				t.Fatalf("frame of %d bytes (buffer %d) got through", len(doc), cap(fr.buf))
			}
			ev, err := ParseEvent(doc)
			if err != nil {
				continue
			}
			if ev.Kind == "" || ev.ContentType == "" || reservedKind(ev.Kind) || len(ev.Body) > len(doc) {
				t.Fatalf("accepted a bad event %+v", ev)
			}
		}
	})
}

func TestTransientAccept(t *testing.T) {
	for _, tt := range []struct {
		err  error
		want bool
	}{
		{unix.EMFILE, true},
		{fmt.Errorf("accept: %w", unix.ECONNABORTED), true},
		{net.ErrClosed, false},
		{unix.EBADF, false},
	} {
		if got := transientAccept(tt.err); got != tt.want {
			t.Errorf("transientAccept(%v) = %v, want %v", tt.err, got, tt.want)
		}
	}
}
