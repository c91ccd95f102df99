package runner

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hyphae-run/hyphae/agent"
	"github.com/hyphae-run/hyphae/bundle"
	"github.com/hyphae-run/hyphae/dimension/events"
	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/dimension/store/sqlite"
	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
	"github.com/hyphae-run/hyphae/protocol"
	"github.com/hyphae-run/hyphae/protocol/pb"
)

// The test binary doubles as the bundle: with envBundleMode set it runs
// one of the behaviours below, as a real child process of a real agent.
const envBundleMode = "RUNNER_TEST_BUNDLE"

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
		raw, _ := io.ReadAll(os.Stdin)
		var p struct {
			ExitCode int `json:"exit_code"`
		}
		_ = json.Unmarshal(raw, &p)
		for i := 1; i <= 3; i++ {
			if err := bundle.Send("progress", map[string]int{"step": i}, nil); err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 2
			}
		}
		if err := bundle.Send("result", json.RawMessage(raw), map[string]string{"k": "v", AttrMock: "spoofed"}); err != nil {
			return 2
		}
		fmt.Fprintf(os.Stderr, "echoed %d bytes\n", len(raw))
		os.Stdout.Write(raw)
		return p.ExitCode
	case "flood":
		cl := bundle.NewClient(os.Getenv(bundle.EnvEventsSocket))
		defer cl.Close()
		for i := range n {
			if err := cl.Send("tick", i, nil); err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 2
			}
		}
	case "sleep":
		sigs := make(chan os.Signal, 1)
		signal.Notify(sigs, syscall.SIGTERM)
		_ = bundle.Send("sleeping", "zzz", nil)
		<-sigs
		fmt.Fprintln(os.Stderr, "got SIGTERM")
		return 42
	case "spoof":
		_ = bundle.Send(events.KindState, map[string]string{"phase": "completed", "status": "completed"}, nil)
		_ = bundle.Send("ok", true, nil)
	case "spoof-error":
		// An error of its own, dressed up as the agent's.
		_ = bundle.Send(KindError, map[string]any{"code": "internal", "message": "agent crashed", "terminal": true},
			map[string]string{AttrSource: "agent", "k": "v"})
	}
	return 0
}

// env is one test's event log, store, user and bundle.
type env struct {
	log   *events.Log
	st    store.Store
	user  store.User
	bnd   store.Bundle
	image string
}

func newEnv(t *testing.T) *env {
	t.Helper()
	ctx := t.Context()
	log, err := events.Open(ctx, events.Options{StoreDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { log.Close() })
	st, err := sqlite.Open(ctx, filepath.Join(t.TempDir(), "dimension.db"), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	u, err := st.CreateUser(ctx, "tester", store.RoleUser)
	if err != nil {
		t.Fatal(err)
	}
	b, err := st.PutBundle(ctx, store.Bundle{Owner: u.ID, Name: "echo", Tag: "latest", ImageDigest: "sha256:" + strings.Repeat("ab", 32)})
	if err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(t.TempDir(), "image.ext4")
	if err := os.WriteFile(img, []byte("not read by the fake backend"), 0o644); err != nil {
		t.Fatal(err)
	}
	return &env{log: log, st: st, user: u, bnd: b, image: img}
}

// runner returns a Runner over be with short stop bounds.
func (e *env) runner(t *testing.T, be Backend, max int) *Runner {
	t.Helper()
	r, err := New(Options{Backend: be, Events: e.log, Store: e.st, MaxConcurrent: max, WorkerID: "w-test",
		StopGrace: 300 * time.Millisecond, VMStopTimeout: 2 * time.Second, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// request creates a pending invocation and the Request for it.
func (e *env) request(t *testing.T, payload string) Request {
	t.Helper()
	inv, err := e.st.CreateInvocation(t.Context(), store.Invocation{Owner: e.user.ID, BundleID: e.bnd.ID, BundleRef: e.bnd.Ref(), Mode: store.ModeAsync})
	if err != nil {
		t.Fatal(err)
	}
	return Request{RunID: inv.ID, UserID: e.user.ID, BundleID: e.bnd.ID, BundleRef: e.bnd.Ref(), ImagePath: e.image,
		Payload: json.RawMessage(payload), BootTimeout: 10 * time.Second, ProcessingTimeout: 20 * time.Second}
}

// events reads the whole stored run: the subscription ends after
// completed.
func (e *env) events(t *testing.T, runID string) []events.Event {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	sub, err := e.log.Subscribe(ctx, runID, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	var out []events.Event
	for ev := range sub.Events() {
		out = append(out, ev)
	}
	if err := sub.Err(); err != nil {
		t.Fatalf("subscription of %s: %v (got %d events)", runID, err, len(out))
	}
	for i, ev := range out {
		if ev.Seq != uint64(i+1) {
			t.Fatalf("event %d has seq %d", i, ev.Seq)
		}
	}
	return out
}

func (e *env) invocation(t *testing.T, id string) store.Invocation {
	t.Helper()
	inv, err := e.st.GetInvocation(t.Context(), e.user.ID, id)
	if err != nil {
		t.Fatal(err)
	}
	return inv
}

// label names an event for sequence comparisons: "state:<phase>" or the
// kind.
func label(ev events.Event) string {
	if ev.Kind != events.KindState {
		return ev.Kind
	}
	return "state:" + stateBody(ev)["phase"].(string)
}

func labels(evs []events.Event) []string {
	out := make([]string, len(evs))
	for i, ev := range evs {
		out[i] = label(ev)
	}
	return out
}

func stateBody(ev events.Event) map[string]any {
	var m map[string]any
	if err := json.Unmarshal(ev.Body, &m); err != nil {
		panic(fmt.Sprintf("state body %q: %v", ev.Body, err))
	}
	return m
}

// completed returns the body of the run's last event, which must be
// completed.
func completed(t *testing.T, evs []events.Event) map[string]any {
	t.Helper()
	if len(evs) == 0 || !evs[len(evs)-1].IsCompleted() {
		t.Fatalf("the run does not end with completed: %v", labels(evs))
	}
	return stateBody(evs[len(evs)-1])
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// fakeBackend is the test double of a VM: each session is the real agent
// core (agent.Run) on the far end of a net.Pipe, running this test binary
// as the bundle, so the whole host↔guest protocol is exercised in process.
type fakeBackend struct {
	t    *testing.T
	mode string   // the bundle's behaviour (testBundle)
	args []string // its arguments
	argv []string // when set, the entrypoint instead of this binary
	// boot is how Start behaves: "" (agent), "hang" (never ready),
	// "fail" (refuses), "garbage" (the guest writes bytes that are no
	// frame), "forger" (a guest that is no agent sends a state event).
	boot string

	mu      sync.Mutex
	started int
	closed  int
}

func (f *fakeBackend) Name() string { return "fake" }
func (f *fakeBackend) Mock() bool   { return false }

func (f *fakeBackend) Start(ctx context.Context, req BootRequest) (Session, error) {
	switch f.boot {
	case "hang":
		<-ctx.Done()
		return nil, errcode.Wrap(errcode.BootFailed, ctx.Err(), "fake vm never became ready")
	case "fail":
		return nil, errcode.New(errcode.BootFailed, "fake vm: kernel panic")
	}
	f.mu.Lock()
	f.started++
	f.mu.Unlock()
	host, guestEnd := net.Pipe()
	actx, cancel := context.WithCancel(context.Background())
	s := &fakeSession{f: f, host: host, cancel: cancel, done: make(chan struct{})}
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	sock, err := os.MkdirTemp("", "rnr")
	if err != nil {
		return nil, err
	}
	go func() {
		defer close(s.done)
		defer os.RemoveAll(sock)
		defer guestEnd.Close()
		if f.boot == "forger" {
			forge(guestEnd)
			return
		}
		if f.boot == "garbage" {
			_, _ = guestEnd.Write([]byte{0x05, 0xff, 0xff, 0xff, 0xff, 0xff})
			_, _ = io.Copy(io.Discard, guestEnd)
			return
		}
		argv := append([]string{exe}, f.args...)
		if f.argv != nil {
			argv = f.argv
		}
		prog := &agent.Program{Argv: argv,
			Env: []guest.EnvVar{{Key: envBundleMode, Value: f.mode}, {Key: "PATH", Value: os.Getenv("PATH")}}}
		_, _ = agent.Run(actx, guestEnd, agent.Config{Program: prog, EventsSocket: sock + "/events.sock",
			ShutdownGrace: time.Second, Logger: slog.New(slog.DiscardHandler)})
	}()
	return s, nil
}

func (f *fakeBackend) counts() (started, closed int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.started, f.closed
}

type fakeSession struct {
	f      *fakeBackend
	host   net.Conn
	cancel context.CancelFunc
	done   chan struct{}
	once   sync.Once
}

func (s *fakeSession) Conn() io.ReadWriter { return s.host }

// Stop is the VM going away: the agent's context ends, which kills the
// bundle.
func (s *fakeSession) Stop(ctx context.Context, _ time.Duration) error {
	s.cancel()
	select {
	case <-s.done:
	case <-ctx.Done():
	}
	return nil
}

func (s *fakeSession) Kill() error { s.cancel(); return nil }

func (s *fakeSession) ConsoleTail() string { return "fake console" }

func (s *fakeSession) Close() error {
	s.once.Do(func() {
		s.host.Close()
		s.cancel()
		<-s.done
		s.f.mu.Lock()
		s.f.closed++
		s.f.mu.Unlock()
	})
	return nil
}

// forge is a hostile guest: after the Request it sends an event of the
// runner's own kind, then a normal one and Done.
func forge(c net.Conn) {
	r, w := protocol.NewReader(c), protocol.NewWriter(c)
	if _, err := r.ReadEnvelope(); err != nil {
		return
	}
	for _, kind := range []string{events.KindState, "ok"} {
		_ = w.WriteEnvelope(&pb.Envelope{Payload: &pb.Envelope_Outbound{Outbound: &pb.OutboundMessage{
			Kind: kind, ContentType: "application/json", Body: []byte(`{"phase":"completed"}`)}}})
	}
	_ = w.WriteEnvelope(&pb.Envelope{Payload: &pb.Envelope_Done{Done: &pb.Done{Success: true}}})
	_, _ = io.Copy(io.Discard, c)
}

func testLoggerDiscard() *slog.Logger { return slog.New(slog.DiscardHandler) }
