package protocol

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"runtime"
	"sync"
	"testing"
	"testing/iotest"

	"google.golang.org/protobuf/proto"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/protocol/pb"
)

func outbound(seq uint64, body string) *pb.Envelope {
	return &pb.Envelope{RequestId: "r1", Payload: &pb.Envelope_Outbound{Outbound: &pb.OutboundMessage{
		Sequence: seq, Kind: "progress", ContentType: "application/json", Body: []byte(body),
		Attributes: map[string]string{"k": "v"},
	}}}
}

func frames(t testing.TB, envs ...*pb.Envelope) []byte {
	t.Helper()
	var b []byte
	for _, e := range envs {
		var err error
		if b, err = AppendFrame(b, e); err != nil {
			t.Fatal(err)
		}
	}
	return b
}

func readAll(r *Reader) ([]*pb.Envelope, error) {
	var out []*pb.Envelope
	for {
		env, err := r.ReadEnvelope()
		if err != nil {
			return out, err
		}
		out = append(out, env)
	}
}

func TestRoundTrip(t *testing.T) {
	big := bytes.Repeat([]byte("x"), 3<<20)
	envs := []*pb.Envelope{
		{RequestId: "r1", Payload: &pb.Envelope_Request{Request: &pb.Request{Payload: []byte(`{"a":1}`)}}},
		outbound(1, `"first"`),
		outbound(2, `"second"`),
		{RequestId: "r1", Payload: &pb.Envelope_Request{Request: &pb.Request{Payload: big}}},
		{RequestId: "r1", Payload: &pb.Envelope_Error{Error: &pb.Error{Code: pb.ErrorCode_ERROR_CODE_SPAWN_FAILED, Message: "m", Terminal: true}}},
		{RequestId: "r1", Payload: &pb.Envelope_Done{Done: &pb.Done{ExitCode: 137, Metadata: map[string]string{"signal": "9"}}}},
		{},
	}
	data := frames(t, envs...)
	readers := []struct {
		name string
		r    func() io.Reader
	}{
		{"whole buffer", func() io.Reader { return bytes.NewReader(data) }},
		{"one byte at a time", func() io.Reader { return iotest.OneByteReader(bytes.NewReader(data)) }},
		{"half reads", func() io.Reader { return iotest.HalfReader(bytes.NewReader(data)) }},
		{"data with EOF", func() io.Reader { return iotest.DataErrReader(bytes.NewReader(data)) }},
	}
	for _, tt := range readers {
		t.Run(tt.name, func(t *testing.T) {
			got, err := readAll(NewReader(tt.r()))
			if err != io.EOF {
				t.Fatalf("final error = %v, want io.EOF", err)
			}
			if len(got) != len(envs) {
				t.Fatalf("read %d envelopes, want %d", len(got), len(envs))
			}
			for i := range envs {
				if !proto.Equal(got[i], envs[i]) {
					t.Errorf("envelope %d differs: got %v", i, got[i])
				}
			}
		})
	}
}

func TestReadErrors(t *testing.T) {
	valid := frames(t, outbound(1, `"x"`))
	overCap := binary.AppendUvarint(nil, MaxFrameSize+1)
	tests := []struct {
		name string
		data []byte
		code errcode.Code
	}{
		{"length over cap", overCap, errcode.FrameTooLarge},
		{"huge length", binary.AppendUvarint(nil, 1<<63), errcode.FrameTooLarge},
		{"varint too long", bytes.Repeat([]byte{0x80}, 11), errcode.MalformedFrame},
		{"truncated length", []byte{0x80}, errcode.MalformedFrame},
		{"truncated body", valid[:len(valid)-1], errcode.MalformedFrame},
		{"truncated large body", append(binary.AppendUvarint(nil, 1<<20), make([]byte, 100<<10)...), errcode.MalformedFrame},
		{"garbage body", append([]byte{3}, 0xff, 0xff, 0xff), errcode.MalformedFrame},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := NewReader(bytes.NewReader(tt.data)).ReadEnvelope()
			if !errcode.HasCode(err, tt.code) {
				t.Fatalf("err = %v, want code %s", err, tt.code)
			}
		})
	}
}

func TestTransportErrorIsChannelFailed(t *testing.T) {
	boom := errors.New("boom")
	_, err := NewReader(iotest.ErrReader(boom)).ReadEnvelope()
	if !errcode.HasCode(err, errcode.ChannelFailed) || !errors.Is(err, boom) {
		t.Fatalf("err = %v, want ChannelFailed wrapping boom", err)
	}
}

func TestReaderSizeCap(t *testing.T) {
	data := frames(t, outbound(1, string(bytes.Repeat([]byte("y"), 200))))
	_, err := NewReaderSize(bytes.NewReader(data), 100).ReadEnvelope()
	if !errcode.HasCode(err, errcode.FrameTooLarge) {
		t.Fatalf("err = %v, want FrameTooLarge", err)
	}
}

// A length over the cap is refused before anything is allocated for it, and
// a large declared length that never arrives costs only what arrived.
func TestNoAllocationForHostileLengths(t *testing.T) {
	tests := []struct {
		name  string
		data  []byte
		limit uint64
	}{
		{"over cap", binary.AppendUvarint(nil, 1<<40), 64 << 10},
		{"cap declared, 10 bytes sent", append(binary.AppendUvarint(nil, MaxFrameSize), make([]byte, 10)...), 1 << 20},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			_, err := NewReader(bytes.NewReader(tt.data)).ReadEnvelope()
			runtime.ReadMemStats(&after)
			if err == nil {
				t.Fatal("hostile frame accepted")
			}
			if got := after.TotalAlloc - before.TotalAlloc; got > tt.limit {
				t.Fatalf("allocated %d bytes, want at most %d", got, tt.limit)
			}
		})
	}
}

func TestReusedBufferDoesNotAlias(t *testing.T) {
	r := NewReader(bytes.NewReader(frames(t, outbound(1, `"aaaa"`), outbound(2, `"bbbb"`))))
	first, err := r.ReadEnvelope()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.ReadEnvelope(); err != nil {
		t.Fatal(err)
	}
	if got := string(first.GetOutbound().GetBody()); got != `"aaaa"` {
		t.Fatalf("first body changed to %q after the next read", got)
	}
}

func TestWriteRefusesOversized(t *testing.T) {
	var buf bytes.Buffer
	env := &pb.Envelope{Payload: &pb.Envelope_Request{Request: &pb.Request{Payload: make([]byte, MaxFrameSize)}}}
	if err := NewWriter(&buf).WriteEnvelope(env); !errcode.HasCode(err, errcode.FrameTooLarge) {
		t.Fatalf("err = %v, want FrameTooLarge", err)
	}
	if buf.Len() != 0 {
		t.Fatalf("%d bytes written for a refused envelope", buf.Len())
	}
}

type failWriter struct{}

func (failWriter) Write([]byte) (int, error) { return 0, io.ErrClosedPipe }

func TestWriteTransportError(t *testing.T) {
	err := NewWriter(failWriter{}).WriteEnvelope(outbound(1, "1"))
	if !errcode.HasCode(err, errcode.ChannelFailed) || !errors.Is(err, io.ErrClosedPipe) {
		t.Fatalf("err = %v", err)
	}
}

// Concurrent writers never interleave frames.
func TestConcurrentWrites(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	const writers, each = 8, 200
	var wg sync.WaitGroup
	for g := range writers {
		wg.Go(func() {
			for i := range each {
				if err := w.WriteEnvelope(outbound(uint64(g*each+i), string(bytes.Repeat([]byte{'a' + byte(g)}, 100+i)))); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	got, err := readAll(NewReader(&buf))
	if err != io.EOF || len(got) != writers*each {
		t.Fatalf("read %d envelopes (err %v), want %d", len(got), err, writers*each)
	}
	seen := map[uint64]bool{}
	for _, e := range got {
		o := e.GetOutbound()
		g := o.GetSequence() / each
		if want := bytes.Repeat([]byte{'a' + byte(g)}, 100+int(o.GetSequence()%each)); !bytes.Equal(o.GetBody(), want) {
			t.Fatalf("frame %d corrupted", o.GetSequence())
		}
		seen[o.GetSequence()] = true
	}
	if len(seen) != writers*each {
		t.Fatalf("%d distinct frames, want %d", len(seen), writers*each)
	}
}

func FuzzReadEnvelope(f *testing.F) {
	f.Add(frames(f, outbound(1, `{"a":1}`), outbound(2, `"b"`)))
	f.Add(binary.AppendUvarint(nil, MaxFrameSize+1))
	f.Add([]byte{0})
	f.Add([]byte{0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01})
	f.Add([]byte{5, 0x52, 0x03, 0x0a, 0x01, 'x'})
	const max = 1 << 10
	f.Fuzz(func(t *testing.T, data []byte) {
		r := NewReaderSize(iotest.HalfReader(bytes.NewReader(data)), max)
		for {
			env, err := r.ReadEnvelope()
			if err != nil {
				if errcode.HasCode(err, errcode.FrameTooLarge) && cap(r.buf) > growStep {
					t.Fatalf("buffer of %d bytes kept after an oversized frame", cap(r.buf))
				}
				if err != io.EOF && errcode.CodeOf(err) == "" {
					t.Fatalf("uncoded error %v", err)
				}
				return
			}
			// Whatever decodes must re-encode within the cap.
			if b, err := AppendFrame(nil, env); err != nil || len(b) > max+maxVarintLen {
				t.Fatalf("re-encoding: %d bytes, %v", len(b), err)
			}
		}
	})
}
