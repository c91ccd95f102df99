package events

import (
	"bytes"
	"encoding/json"
	"testing"
)

func TestDataJSON(t *testing.T) {
	base := Event{RunID: "r1", Seq: 9, TsMs: 1700000000000, Kind: "k", WorkerID: "w", BundleID: "b:t", UserID: "u"}
	tests := []struct {
		name        string
		contentType string
		body        string
		attrs       map[string]string
		want        string
	}{
		{"json object compacted", "application/json", "{\n  \"a\": [1, 2],\n  \"b\": \"<&>\"\n}", nil,
			`{"run_id":"r1","ts_ms":1700000000000,"content_type":"application/json","body":{"a":[1,2],"b":"<&>"},"attrs":{},"worker_id":"w","bundle_id":"b:t","user_id":"u"}`},
		{"json with charset", "application/json; charset=utf-8", `42`, map[string]string{"x": "y"},
			`{"run_id":"r1","ts_ms":1700000000000,"content_type":"application/json; charset=utf-8","body":42,"attrs":{"x":"y"},"worker_id":"w","bundle_id":"b:t","user_id":"u"}`},
		{"+json suffix", "application/vnd.dimension.state+json", `{"phase":"started"}`, nil,
			`{"run_id":"r1","ts_ms":1700000000000,"content_type":"application/vnd.dimension.state+json","body":{"phase":"started"},"attrs":{},"worker_id":"w","bundle_id":"b:t","user_id":"u"}`},
		{"json type, invalid json", "application/json", `{"a":`, nil,
			`{"run_id":"r1","ts_ms":1700000000000,"content_type":"application/json","body":"{\"a\":","attrs":{},"worker_id":"w","bundle_id":"b:t","user_id":"u"}`},
		{"json type, empty body", "application/json", ``, nil,
			`{"run_id":"r1","ts_ms":1700000000000,"content_type":"application/json","body":"","attrs":{},"worker_id":"w","bundle_id":"b:t","user_id":"u"}`},
		{"text with newlines stays one line", "text/plain; charset=utf-8", "a\nb\r\n<tag> & \"q\"\t", nil,
			`{"run_id":"r1","ts_ms":1700000000000,"content_type":"text/plain; charset=utf-8","body":"a\nb\r\n<tag> & \"q\"\t","attrs":{},"worker_id":"w","bundle_id":"b:t","user_id":"u"}`},
		{"octet-stream that is JSON stays a string", "application/octet-stream", `{"a":1}`, nil,
			`{"run_id":"r1","ts_ms":1700000000000,"content_type":"application/octet-stream","body":"{\"a\":1}","attrs":{},"worker_id":"w","bundle_id":"b:t","user_id":"u"}`},
		{"invalid utf-8 becomes U+FFFD", "application/octet-stream", "ok\xff\xfe end", nil,
			`{"run_id":"r1","ts_ms":1700000000000,"content_type":"application/octet-stream","body":"ok` + "\uFFFD" + ` end","attrs":{},"worker_id":"w","bundle_id":"b:t","user_id":"u"}`},
		{"no content type", "", "plain", nil,
			`{"run_id":"r1","ts_ms":1700000000000,"content_type":"","body":"plain","attrs":{},"worker_id":"w","bundle_id":"b:t","user_id":"u"}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ev := base
			ev.ContentType, ev.Body, ev.Attrs = tt.contentType, []byte(tt.body), tt.attrs
			got, err := ev.DataJSON()
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tt.want {
				t.Errorf("DataJSON =\n%s\nwant\n%s", got, tt.want)
			}
			if bytes.ContainsAny(got, "\r\n") {
				t.Errorf("data is not one line: %q", got)
			}
		})
	}
}

func TestIsCompleted(t *testing.T) {
	tests := []struct {
		kind, body string
		want       bool
	}{
		{"state", `{"phase":"completed","status":"failed"}`, true},
		{"state", `{"phase":"started"}`, false},
		{"state", `not json`, false},
		{"bundle", `{"phase":"completed"}`, false},
	}
	for _, tt := range tests {
		if got := (Event{Kind: tt.kind, Body: []byte(tt.body)}).IsCompleted(); got != tt.want {
			t.Errorf("IsCompleted(%s, %s) = %v", tt.kind, tt.body, got)
		}
	}
}

func TestParseDataRoundTrip(t *testing.T) {
	in := Event{RunID: "r", Seq: 3, TsMs: 5, Kind: "stderr", ContentType: "text/plain", Body: []byte("hi"),
		Attrs: map[string]string{"a": "b"}, WorkerID: "w", BundleID: "b", UserID: "u"}
	d, err := in.DataJSON()
	if err != nil {
		t.Fatal(err)
	}
	out, err := ParseData(3, "stderr", d)
	if err != nil {
		t.Fatal(err)
	}
	if out.RunID != in.RunID || out.Seq != 3 || out.TsMs != 5 || out.Kind != "stderr" || string(out.Body) != "hi" ||
		out.Attrs["a"] != "b" || out.WorkerID != "w" || out.BundleID != "b" || out.UserID != "u" {
		t.Errorf("ParseData = %+v", out)
	}
	if _, err := ParseData(1, "x", []byte(`[1]`)); err == nil {
		t.Error("ParseData accepted a non-object")
	}
}

// FuzzData checks that any body and content type render as one line of
// valid JSON, and that what a client parses back renders the same again.
func FuzzData(f *testing.F) {
	f.Add("application/json", []byte(`{"a":1}`))
	f.Add("text/plain", []byte("a\nb\xff"))
	f.Add("application/x+json; charset=utf-8", []byte(`"s"`))
	f.Add("bad;;type", []byte{0, 1, 2})
	f.Fuzz(func(t *testing.T, contentType string, body []byte) {
		ev := Event{RunID: "r", TsMs: 1, Kind: "k", ContentType: contentType, Body: body}
		d, err := ev.DataJSON()
		if err != nil {
			t.Fatalf("DataJSON: %v", err)
		}
		if !json.Valid(d) || bytes.ContainsAny(d, "\r\n") {
			t.Fatalf("not one line of JSON: %q", d)
		}
		back, err := ParseData(1, "k", d)
		if err != nil {
			t.Fatalf("ParseData(%q): %v", d, err)
		}
		again, err := back.DataJSON()
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(d, again) {
			t.Fatalf("round trip differs:\n%s\n%s", d, again)
		}
	})
}
