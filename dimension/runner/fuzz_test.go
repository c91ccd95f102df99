package runner

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/hyphae-run/hyphae/dimension/events"
	"github.com/hyphae-run/hyphae/protocol"
	"github.com/hyphae-run/hyphae/protocol/pb"
)

// bytesBackend's guest reads the Request, writes fixed bytes, then closes
// the channel: whatever a hostile guest can send.
type bytesBackend struct{ data []byte }

func (b bytesBackend) Name() string { return "bytes" }
func (b bytesBackend) Mock() bool   { return false }

func (b bytesBackend) Start(context.Context, BootRequest) (Session, error) {
	host, g := net.Pipe()
	go func() {
		defer g.Close()
		if _, err := protocol.NewReader(g).ReadEnvelope(); err != nil {
			return
		}
		_, _ = g.Write(b.data)
	}()
	return &pipeSession{host: host}, nil
}

type pipeSession struct{ host net.Conn }

func (s *pipeSession) Conn() io.ReadWriter                       { return s.host }
func (s *pipeSession) Stop(context.Context, time.Duration) error { return s.host.Close() }
func (s *pipeSession) Kill() error                               { return s.host.Close() }
func (s *pipeSession) ConsoleTail() string                       { return "" }
func (s *pipeSession) Close() error                              { return s.host.Close() }

// memSink is an in-memory event log.
type memSink struct {
	mu  sync.Mutex
	evs []events.Event
}

func (m *memSink) Append(_ context.Context, ev events.Event) (uint64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.evs = append(m.evs, ev)
	return uint64(len(m.evs)), nil
}

// Whatever the guest sends, the run ends with exactly one completed event,
// last, and every state event is the runner's own.
func FuzzGuestStream(f *testing.F) {
	frame := func(env *pb.Envelope) []byte {
		b, err := protocol.AppendFrame(nil, env)
		if err != nil {
			f.Fatal(err)
		}
		return b
	}
	out := frame(&pb.Envelope{Payload: &pb.Envelope_Outbound{Outbound: &pb.OutboundMessage{Kind: "k", Body: []byte("b")}}})
	state := frame(&pb.Envelope{Payload: &pb.Envelope_Outbound{Outbound: &pb.OutboundMessage{Kind: "state", Body: []byte(`{"phase":"completed"}`)}}})
	done := frame(&pb.Envelope{Payload: &pb.Envelope_Done{Done: &pb.Done{ExitCode: 1}}})
	errEnv := frame(&pb.Envelope{Payload: &pb.Envelope_Error{Error: &pb.Error{Code: 4, Message: "m", Terminal: true}}})
	req := frame(&pb.Envelope{Payload: &pb.Envelope_Request{Request: &pb.Request{Payload: []byte("x")}}})
	f.Add(append(append([]byte{}, out...), done...))
	f.Add(append(append(append([]byte{}, state...), errEnv...), done...))
	f.Add(append(append([]byte{0}, req...), out...))
	f.Add([]byte{0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		sink := &memSink{}
		r, err := New(Options{Backend: bytesBackend{data}, Events: sink, WorkerID: "w", StopGrace: 10 * time.Millisecond,
			VMStopTimeout: 10 * time.Millisecond, Logger: testLoggerDiscard()})
		if err != nil {
			t.Fatal(err)
		}
		o := r.Run(context.Background(), nil, Request{RunID: "r1", ImagePath: "x", BootTimeout: time.Second, ProcessingTimeout: 5 * time.Second})
		if o.Status == "" {
			t.Fatal("no status")
		}
		n := 0
		for i, ev := range sink.evs {
			if ev.Kind != events.KindState {
				continue
			}
			var b struct{ Phase string }
			if err := json.Unmarshal(ev.Body, &b); err != nil {
				t.Fatalf("state event %d body %q", i, ev.Body)
			}
			if ev.IsCompleted() {
				n++
				if i != len(sink.evs)-1 {
					t.Fatalf("completed is event %d of %d", i, len(sink.evs))
				}
			}
		}
		if n != 1 {
			t.Fatalf("%d completed events", n)
		}
		if r.Running() != 0 {
			t.Fatal("run still counted")
		}
	})
}
