package agent

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/hyphae-run/hyphae/bundle"
	"github.com/hyphae-run/hyphae/guest"
	"github.com/hyphae-run/hyphae/protocol"
	"github.com/hyphae-run/hyphae/protocol/pb"
)

// The test binary doubles as the bundle: with envBundleMode set it runs
// one of the behaviours below instead of the tests, as a real child
// process of the agent.
const envBundleMode = "AGENT_TEST_BUNDLE"

func TestMain(m *testing.M) {
	if mode := os.Getenv(envBundleMode); mode != "" {
		os.Exit(testBundle(mode, os.Args[1:]))
	}
	os.Exit(m.Run())
}

func testBundle(mode string, args []string) int {
	n := 0
	if len(args) > 0 {
		n, _ = strconv.Atoi(args[0])
	}
	switch mode {
	case "echo":
		payload, _ := io.ReadAll(os.Stdin)
		os.Stdout.Write(payload)
	case "events":
		for i := range n {
			if err := bundle.Send("progress", map[string]int{"i": i}, map[string]string{"i": strconv.Itoa(i)}); err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 2
			}
		}
		if err := bundle.Send("result", "done", nil); err != nil {
			return 2
		}
	case "multi":
		// n connections, each sending 50 events.
		var wg sync.WaitGroup
		for c := range n {
			wg.Go(func() {
				cl := bundle.NewClient(os.Getenv(bundle.EnvEventsSocket))
				defer cl.Close()
				for i := range 50 {
					cl.Send("conn", i, map[string]string{"conn": strconv.Itoa(c), "i": strconv.Itoa(i)})
				}
			})
		}
		wg.Wait()
	case "interleave":
		// n rounds of one event then one stderr line, the order the
		// host must see.
		for i := range n {
			if err := bundle.Send("step", i, nil); err != nil {
				return 2
			}
			fmt.Fprintf(os.Stderr, "after %d\n", i)
		}
	case "badframes":
		return badFrames()
	case "stdout":
		os.Stdout.Write([]byte(strings.Repeat("x", n)))
	case "socketmode":
		st, err := os.Stat(os.Getenv(bundle.EnvEventsSocket))
		if err != nil {
			return 2
		}
		fmt.Printf("%o", st.Mode().Perm())
	}
	return 0
}

// badFrames opens one connection per bad frame, writes it, then a good
// frame that must never be relayed (the agent has closed that
// connection), and finally reports "ok" on a fresh connection.
func badFrames() int {
	path := os.Getenv(bundle.EnvEventsSocket)
	frame := func(doc string) []byte {
		b := binary.LittleEndian.AppendUint32(nil, uint32(len(doc)))
		return append(b, doc...)
	}
	ghost := frame(`{"kind":"ghost","body":1}`)
	bad := [][]byte{
		binary.LittleEndian.AppendUint32(nil, 0),
		binary.LittleEndian.AppendUint32(nil, MaxEventFrame+1),
		frame(`{"kind":`),
		frame(`{"kind":"x"}`),
		frame("{\"body\":\"\xff\"}"),
		frame(`{"kind":"stderr","body":1}`),
		frame(`{"kind":"a\nb","body":1}`),
		frame(`{"body":1,"attrs":{"k":2}}`),
		frame(`[1,2]`),
	}
	for _, b := range bad {
		c, err := net.Dial("unix", path)
		if err != nil {
			return 2
		}
		c.Write(b)
		// Wait for the agent to close this connection: it must not be
		// kept open after a bad frame.
		io.Copy(io.Discard, c)
		c.Write(ghost)
		c.Close()
	}
	if err := bundle.Send("ok", "after", nil); err != nil {
		return 2
	}
	return 0
}

// selfProgram runs this test binary as a bundle in the given mode.
func selfProgram(t *testing.T, mode string, args ...string) *Program {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return &Program{
		Argv: append([]string{exe}, args...),
		Env:  []guest.EnvVar{{Key: envBundleMode, Value: mode}, {Key: "PATH", Value: os.Getenv("PATH")}},
	}
}

func shProgram(script string) *Program {
	return &Program{Argv: []string{"/bin/sh", "-c", script}, Env: []guest.EnvVar{{Key: "PATH", Value: os.Getenv("PATH")}}}
}

// testLogger sends the agent's log to the test's output, shown on failure.
func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), nil))
}

// socketPath returns a short events-socket path (sun_path holds 108 bytes).
func socketPath(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "agt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir + "/ev/events.sock"
}

// outcome is what the fake host saw.
type outcome struct {
	envs     []*pb.Envelope
	outbound []*pb.OutboundMessage
	errs     []*pb.Error
	done     *pb.Done
	code     int
	runErr   error
}

func (o *outcome) kinds(kind string) []*pb.OutboundMessage {
	var out []*pb.OutboundMessage
	for _, m := range o.outbound {
		if m.GetKind() == kind {
			out = append(out, m)
		}
	}
	return out
}

func (o *outcome) stdout(t *testing.T) *pb.OutboundMessage {
	t.Helper()
	finals := o.kinds(KindStdoutFinal)
	if len(finals) != 1 {
		t.Fatalf("%d stdout-final messages, want 1", len(finals))
	}
	return finals[0]
}

// fakeHost is the host side of the channel, over net.Pipe.
type fakeHost struct {
	t    *testing.T
	conn net.Conn
	r    *protocol.Reader
	w    *protocol.Writer
	res  chan runResult
}

type runResult struct {
	code int
	err  error
}

func startAgent(t *testing.T, cfg Config) *fakeHost {
	t.Helper()
	if cfg.EventsSocket == "" {
		cfg.EventsSocket = socketPath(t)
	}
	cfg.Logger = testLogger(t)
	hostEnd, guestEnd := net.Pipe()
	h := &fakeHost{t: t, conn: hostEnd, r: protocol.NewReader(hostEnd), w: protocol.NewWriter(hostEnd), res: make(chan runResult, 1)}
	go func() {
		code, err := Run(context.Background(), guestEnd, cfg)
		h.res <- runResult{code, err}
		guestEnd.Close()
	}()
	t.Cleanup(func() { hostEnd.Close() })
	return h
}

func (h *fakeHost) send(env *pb.Envelope) {
	h.t.Helper()
	if err := h.write(env); err != nil {
		h.t.Fatalf("host write: %v", err)
	}
}

// write sends env as the host; unlike send it may run in any goroutine.
func (h *fakeHost) write(env *pb.Envelope) error {
	env.RequestId = "req-1"
	return h.w.WriteEnvelope(env)
}

func (h *fakeHost) request(payload string) {
	h.t.Helper()
	h.send(&pb.Envelope{Payload: &pb.Envelope_Request{Request: &pb.Request{Payload: []byte(payload)}}})
}

// collect reads until Done (calling each for every envelope), checks the
// invariants every run must keep, and waits for Run to return.
func (h *fakeHost) collect(each func(*pb.Envelope)) *outcome {
	h.t.Helper()
	o := &outcome{}
	for o.done == nil {
		env, err := h.r.ReadEnvelope()
		if err != nil {
			h.t.Fatalf("host read after %d envelopes: %v", len(o.envs), err)
		}
		if env.GetRequestId() != "req-1" {
			h.t.Errorf("request_id = %q, want req-1", env.GetRequestId())
		}
		o.envs = append(o.envs, env)
		switch p := env.GetPayload().(type) {
		case *pb.Envelope_Outbound:
			o.outbound = append(o.outbound, p.Outbound)
		case *pb.Envelope_Error:
			o.errs = append(o.errs, p.Error)
		case *pb.Envelope_Done:
			o.done = p.Done
		}
		if each != nil {
			each(env)
		}
	}
	h.conn.Close()
	r := <-h.res
	o.code, o.runErr = r.code, r.err
	for i, m := range o.outbound {
		if m.GetSequence() != uint64(i+1) {
			h.t.Fatalf("message %d has sequence %d, want %d", i, m.GetSequence(), i+1)
		}
		if m.GetTimestampMs() <= 0 {
			h.t.Fatalf("message %d has no timestamp", i)
		}
	}
	if int(o.done.GetExitCode()) != o.code {
		h.t.Errorf("Done exit code %d, Run returned %d", o.done.GetExitCode(), o.code)
	}
	return o
}

// run is one whole request: payload in, everything out.
func run(t *testing.T, cfg Config, payload string) *outcome {
	t.Helper()
	h := startAgent(t, cfg)
	h.request(payload)
	return h.collect(nil)
}

func jsonInt(t *testing.T, b []byte, key string) int {
	t.Helper()
	var m map[string]int
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("body %q: %v", b, err)
	}
	return m[key]
}
