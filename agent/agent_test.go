package agent

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
	"github.com/hyphae-run/hyphae/protocol"
	"github.com/hyphae-run/hyphae/protocol/pb"
)

func TestPayloadEcho(t *testing.T) {
	payload := `{"hello":"world","n":[1,2,3]}`
	o := run(t, Config{Program: selfProgram(t, "echo")}, payload)
	if got := string(o.stdout(t).GetBody()); got != payload {
		t.Fatalf("stdout-final = %q, want the payload %q", got, payload)
	}
	if fin := o.stdout(t); fin.GetContentType() != ContentTypeStdoutFinal || fin.GetAttributes()[AttrTruncated] != "" {
		t.Fatalf("stdout-final content type %q attrs %v", fin.GetContentType(), fin.GetAttributes())
	}
	if !o.done.GetSuccess() || o.code != 0 || o.runErr != nil || len(o.errs) != 0 {
		t.Fatalf("done %v code %d err %v errors %v", o.done, o.code, o.runErr, o.errs)
	}
	if last := o.envs[len(o.envs)-2]; last.GetOutbound().GetKind() != KindStdoutFinal {
		t.Fatalf("message before Done is %v, want stdout-final", last)
	}
}

func TestLargePayloadEcho(t *testing.T) {
	payload := `"` + strings.Repeat("p", 900<<10) + `"`
	o := run(t, Config{Program: selfProgram(t, "echo")}, payload)
	if got := o.stdout(t).GetBody(); string(got) != payload {
		t.Fatalf("stdout-final has %d bytes, want %d", len(got), len(payload))
	}
}

func TestEventRelayOrder(t *testing.T) {
	const n = 200
	o := run(t, Config{Program: selfProgram(t, "events", strconv.Itoa(n))}, `{}`)
	progress := o.kinds("progress")
	if len(progress) != n {
		t.Fatalf("%d progress events, want %d", len(progress), n)
	}
	for i, m := range progress {
		if got := jsonInt(t, m.GetBody(), "i"); got != i {
			t.Fatalf("event %d carries i=%d", i, got)
		}
		if m.GetContentType() != DefaultEventContentType || m.GetAttributes()["i"] != strconv.Itoa(i) {
			t.Fatalf("event %d: content type %q attrs %v", i, m.GetContentType(), m.GetAttributes())
		}
	}
	res := o.kinds("result")
	if len(res) != 1 || string(res[0].GetBody()) != "done" {
		t.Fatalf("result events %v, want one with the raw string body", res)
	}
	if res[0].GetSequence() <= progress[n-1].GetSequence() {
		t.Fatal("result relayed before the progress events sent ahead of it")
	}
}

func TestSeveralConnections(t *testing.T) {
	const conns = 8
	o := run(t, Config{Program: selfProgram(t, "multi", strconv.Itoa(conns))}, `{}`)
	next := map[string]int{}
	for _, m := range o.kinds("conn") {
		c, i := m.GetAttributes()["conn"], m.GetAttributes()["i"]
		if i != strconv.Itoa(next[c]) {
			t.Fatalf("connection %s: event i=%s arrived when %d was due", c, i, next[c])
		}
		next[c]++
	}
	for c := range conns {
		if next[strconv.Itoa(c)] != 50 {
			t.Fatalf("connection %d relayed %d events, want 50", c, next[strconv.Itoa(c)])
		}
	}
}

func TestBadFramesCloseOnlyTheirConnection(t *testing.T) {
	o := run(t, Config{Program: selfProgram(t, "badframes")}, `{}`)
	if o.code != 0 {
		t.Fatalf("bundle exit code %d (stderr %v)", o.code, o.kinds(KindStderr))
	}
	if ghosts := o.kinds("ghost"); len(ghosts) != 0 {
		t.Fatalf("%d frames relayed from connections that sent a bad frame", len(ghosts))
	}
	if ok := o.kinds("ok"); len(ok) != 1 || string(ok[0].GetBody()) != "after" {
		t.Fatalf("event after the bad frames: %v", ok)
	}
	rejected := 0
	for _, e := range o.errs {
		if e.GetCode() != pb.ErrorCode_ERROR_CODE_EVENT_REJECTED || e.GetTerminal() {
			t.Fatalf("unexpected error %v", e)
		}
		rejected++
	}
	if rejected != 9 {
		t.Fatalf("%d rejections reported, want 9", rejected)
	}
	if !o.done.GetSuccess() {
		t.Fatal("bad frames made the run fail")
	}
}

// The events socket and stderr are separate streams, read concurrently. A
// stderr line still never overtakes an event the bundle sent before it
// (later events may overtake a line that sits in the pipe: nothing can
// tell when a pipe's bytes were written).
func TestStderrNeverOvertakesEarlierEvents(t *testing.T) {
	const n = 50
	o := run(t, Config{Program: selfProgram(t, "interleave", strconv.Itoa(n))}, `{}`)
	pos := map[string]int{}
	for i, m := range o.outbound {
		switch m.GetKind() {
		case "step":
			pos["step "+string(m.GetBody())] = i
		case KindStderr:
			pos[string(m.GetBody())] = i
		}
	}
	for i := range n {
		step, okStep := pos[fmt.Sprintf("step %d", i)]
		line, okLine := pos[fmt.Sprintf("after %d", i)]
		if !okStep || !okLine || line < step {
			t.Fatalf("round %d: event at %d (%v), stderr line at %d (%v); order %v", i, step, okStep, line, okLine, pos)
		}
	}
}

func TestStderrLines(t *testing.T) {
	long := strings.Repeat("L", maxStderrLine+10)
	o := run(t, Config{Program: shProgram(`printf 'first\nsecond\r\n\n' >&2; printf '` + long + `\n' >&2; printf 'tail' >&2`)}, `{}`)
	var got []string
	for _, m := range o.kinds(KindStderr) {
		if m.GetContentType() != ContentTypeStderr {
			t.Fatalf("stderr content type %q", m.GetContentType())
		}
		got = append(got, string(m.GetBody())+"|"+m.GetAttributes()[AttrPartial])
	}
	want := []string{"first|", "second|", "|", long[:maxStderrLine] + "|true", "LLLLLLLLLL|", "tail|true"}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("stderr messages:\n got %.200q\nwant %.200q", got, want)
	}
}

func TestStdoutFinalTruncation(t *testing.T) {
	tests := []struct {
		name      string
		n, limit  int
		truncated bool
	}{
		{"under", 999, 1000, false},
		{"exact", 1000, 1000, false},
		{"over", 250000, 1000, true},
		{"empty", 0, 1000, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := run(t, Config{Program: selfProgram(t, "stdout", strconv.Itoa(tt.n)), StdoutLimit: tt.limit}, `{}`)
			fin := o.stdout(t)
			if want := min(tt.n, tt.limit); len(fin.GetBody()) != want {
				t.Fatalf("body %d bytes, want %d", len(fin.GetBody()), want)
			}
			attrs := fin.GetAttributes()
			if (attrs[AttrTruncated] == "true") != tt.truncated {
				t.Fatalf("attrs %v, truncated want %v", attrs, tt.truncated)
			}
			if tt.truncated && attrs[AttrOriginalBytes] != strconv.Itoa(tt.n) {
				t.Fatalf("original_bytes = %q, want %d", attrs[AttrOriginalBytes], tt.n)
			}
		})
	}
}

func TestExitCodes(t *testing.T) {
	tests := []struct {
		script  string
		code    int
		signal  string
		success bool
	}{
		{"exit 0", 0, "", true},
		{"exit 3", 3, "", false},
		{"kill -KILL $$", 137, "9", false},
		{"kill -TERM $$", 143, "15", false},
	}
	for _, tt := range tests {
		t.Run(tt.script, func(t *testing.T) {
			o := run(t, Config{Program: shProgram(tt.script)}, `{}`)
			if o.code != tt.code || o.done.GetSuccess() != tt.success || o.done.GetMetadata()["signal"] != tt.signal {
				t.Fatalf("done %v, want code %d signal %q success %v", o.done, tt.code, tt.signal, tt.success)
			}
		})
	}
}

func TestEventFlood(t *testing.T) {
	const n = 20000
	o := run(t, Config{Program: selfProgram(t, "events", strconv.Itoa(n))}, `{}`)
	if got := len(o.kinds("progress")); got != n {
		t.Fatalf("%d of %d flooded events relayed", got, n)
	}
}

func TestStderrFlood(t *testing.T) {
	o := run(t, Config{Program: shProgram(`i=0; while [ $i -lt 5000 ]; do echo "line $i" >&2; i=$((i+1)); done`)}, `{}`)
	lines := o.kinds(KindStderr)
	if len(lines) != 5000 || string(lines[4999].GetBody()) != "line 4999" {
		t.Fatalf("%d stderr lines relayed, want 5000", len(lines))
	}
}

func TestSocketIsWorldWritable(t *testing.T) {
	o := run(t, Config{Program: selfProgram(t, "socketmode")}, `{}`)
	if got := string(o.stdout(t).GetBody()); got != "666" {
		t.Fatalf("events socket mode %q, want 666", got)
	}
}

func TestEntrypointFromImageFiles(t *testing.T) {
	root := t.TempDir()
	work := t.TempDir()
	ep, err := guest.EncodeEntrypoint([]string{"sh", "-c", `echo "$FOO $BAR $DIMENSION_EVENTS_SOCK"; pwd; cat`, ""})
	if err != nil {
		t.Fatal(err)
	}
	env, _ := guest.EncodeEnvFile([]guest.EnvVar{{Key: "FOO", Value: "from-file"}, {Key: "BAR", Value: "file"}})
	for p, b := range map[string][]byte{guest.EntrypointPath: ep, guest.EnvPath: env, guest.WorkdirPath: []byte(work + "\n")} {
		os.MkdirAll(filepath.Join(root, filepath.Dir(p)), 0o755)
		if err := os.WriteFile(filepath.Join(root, p), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	sock := socketPath(t)
	o := run(t, Config{
		Root:         root,
		BaseEnv:      []guest.EnvVar{{Key: "PATH", Value: os.Getenv("PATH")}, {Key: "FOO", Value: "base"}},
		Cmdline:      "console=ttyS0 " + guest.EncodeCmdlineEnv([]guest.EnvVar{{Key: "BAR", Value: "cmd line"}}),
		EventsSocket: sock,
	}, `{"p":1}`)
	want := "from-file cmd line " + sock + "\n" + work + "\n" + `{"p":1}`
	if got := string(o.stdout(t).GetBody()); got != want {
		t.Fatalf("stdout %q, want %q", got, want)
	}
}

func TestAgentFailuresReachTheHost(t *testing.T) {
	notSocket := filepath.Join(t.TempDir(), "file")
	os.WriteFile(notSocket, nil, 0o644)
	tests := []struct {
		name string
		cfg  Config
		code pb.ErrorCode
	}{
		{"no entrypoint file", Config{Root: t.TempDir()}, pb.ErrorCode_ERROR_CODE_ENTRYPOINT_INVALID},
		{"empty program", Config{Program: &Program{}}, pb.ErrorCode_ERROR_CODE_ENTRYPOINT_INVALID},
		{"missing binary", Config{Program: &Program{Argv: []string{"no-such-program-xyz"}}}, pb.ErrorCode_ERROR_CODE_SPAWN_FAILED},
		{"bad workdir", Config{Program: &Program{Argv: []string{"/bin/true"}, Dir: "/nonexistent/dir"}}, pb.ErrorCode_ERROR_CODE_SPAWN_FAILED},
		{"events path taken", Config{Program: shProgram("exit 0"), EventsSocket: notSocket}, pb.ErrorCode_ERROR_CODE_EVENTS_SOCKET},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := run(t, tt.cfg, `{}`)
			if len(o.errs) != 1 || o.errs[0].GetCode() != tt.code || !o.errs[0].GetTerminal() {
				t.Fatalf("errors %v, want one terminal %v", o.errs, tt.code)
			}
			if len(o.envs) != 2 || o.done.GetSuccess() || o.code != -1 {
				t.Fatalf("envelopes %v, want Error then a failed Done", o.envs)
			}
		})
	}
}

func TestFirstMessageMustBeRequest(t *testing.T) {
	h := startAgent(t, Config{Program: shProgram("exit 0")})
	h.send(&pb.Envelope{Payload: &pb.Envelope_ShutdownRequest{ShutdownRequest: &pb.ShutdownRequest{}}})
	o := h.collect(nil)
	if len(o.errs) != 1 || o.errs[0].GetCode() != pb.ErrorCode_ERROR_CODE_PROTOCOL_VIOLATION || o.done.GetSuccess() {
		t.Fatalf("envelopes %v", o.envs)
	}
}

func TestShutdownRequest(t *testing.T) {
	tests := []struct {
		name   string
		script string
		grace  uint32
		code   int
	}{
		// The grace is long enough for a loaded machine to run the trap.
		{"bundle handles SIGTERM", `trap 'exit 42' TERM; echo ready >&2; while :; do sleep 0.05; done`, 30000, 42},
		{"bundle ignores SIGTERM", `trap '' TERM; echo ready >&2; while :; do sleep 0.05; done`, 100, 137},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := startAgent(t, Config{Program: shProgram(tt.script)})
			h.request(`{}`)
			acked := false
			// The write runs beside collect (the pipe blocks until the
			// agent reads), so its error is checked here, not Fatal'd there.
			written := make(chan error, 1)
			o := h.collect(func(env *pb.Envelope) {
				if env.GetOutbound().GetKind() == KindStderr && string(env.GetOutbound().GetBody()) == "ready" {
					go func() {
						written <- h.write(&pb.Envelope{Payload: &pb.Envelope_ShutdownRequest{ShutdownRequest: &pb.ShutdownRequest{Reason: "test", GraceMs: tt.grace}}})
					}()
				}
				if env.GetShutdownAck() != nil {
					acked = true
				}
			})
			if !acked || o.code != tt.code {
				t.Fatalf("acked %v, exit code %d, want %d", acked, o.code, tt.code)
			}
			// Acked means the agent read the request: the write has ended.
			if err := <-written; err != nil {
				t.Fatalf("host write: %v", err)
			}
		})
	}
}

func TestHostDisconnectKillsBundle(t *testing.T) {
	h := startAgent(t, Config{Program: shProgram(`echo ready >&2; exec sleep 1000`)})
	h.request(`{}`)
	env, err := h.r.ReadEnvelope()
	if err != nil || string(env.GetOutbound().GetBody()) != "ready" {
		t.Fatalf("first message %v, %v", env, err)
	}
	h.conn.Close()
	r := <-h.res
	if r.code != 137 || !errcode.HasCode(r.err, errcode.ChannelFailed) {
		t.Fatalf("Run = %d, %v; want 137 and a channel error", r.code, r.err)
	}
}

func TestCancelledContext(t *testing.T) {
	hostEnd, guestEnd := net.Pipe()
	defer hostEnd.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	res := make(chan runResult, 1)
	go func() {
		code, err := Run(ctx, guestEnd, Config{Program: shProgram(`echo ready >&2; exec sleep 1000`), EventsSocket: socketPath(t), Logger: testLogger(t)})
		res <- runResult{code, err}
	}()
	w, r := protocol.NewWriter(hostEnd), protocol.NewReader(hostEnd)
	w.WriteEnvelope(&pb.Envelope{Payload: &pb.Envelope_Request{Request: &pb.Request{}}})
	var errs []*pb.Error
	for {
		env, err := r.ReadEnvelope()
		if err != nil {
			t.Fatal(err)
		}
		if env.GetOutbound().GetKind() == KindStderr {
			cancel()
		}
		if e := env.GetError(); e != nil {
			errs = append(errs, e)
		}
		if d := env.GetDone(); d != nil {
			if d.GetExitCode() != 137 || len(errs) != 1 || !errs[0].GetTerminal() {
				t.Fatalf("done %v errors %v", d, errs)
			}
			break
		}
	}
	if rr := <-res; rr.err != nil {
		t.Fatalf("Run: %v", rr.err)
	}
}

// A descendant that leaves the process group and keeps stdout open must
// not hold the run: the agent stops waiting after DrainTimeout.
func TestEscapedDescendantDoesNotHoldTheRun(t *testing.T) {
	testenvSetsid(t)
	pidFile := filepath.Join(t.TempDir(), "pid")
	t.Cleanup(func() {
		if b, err := os.ReadFile(pidFile); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
	script := `setsid sh -c 'echo $$ > ` + pidFile + `; exec sleep 1000' & while [ ! -s ` + pidFile + ` ]; do sleep 0.01; done; echo out; exit 5`
	o := run(t, Config{Program: shProgram(script), DrainTimeout: time.Second}, `{}`)
	if o.code != 5 || !bytes.Equal(o.stdout(t).GetBody(), []byte("out\n")) {
		t.Fatalf("code %d stdout %q", o.code, o.stdout(t).GetBody())
	}
}

func testenvSetsid(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("/usr/bin/setsid"); err != nil {
		t.Skip("setsid not installed")
	}
}

func TestLoadProgramErrors(t *testing.T) {
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, guest.ConfigDir), 0o755)
	os.WriteFile(filepath.Join(root, guest.EntrypointPath), []byte("sh\x00"), 0o644)
	os.WriteFile(filepath.Join(root, guest.EnvPath), []byte("NOEQUALS\n"), 0o644)
	if _, err := LoadProgram(root, nil, ""); !errcode.HasCode(err, errcode.InvalidEnv) {
		t.Fatalf("err = %v, want InvalidEnv", err)
	}
	if _, err := LoadProgram(t.TempDir(), nil, ""); !errcode.HasCode(err, errcode.NoEntrypoint) {
		t.Fatalf("err = %v, want NoEntrypoint", err)
	}
}

func TestDefaultChannelIsAgentPort(t *testing.T) {
	if DefaultChannel != "vsock:"+strconv.Itoa(protocol.AgentVsockPort) {
		t.Fatalf("DefaultChannel %q does not name port %d", DefaultChannel, protocol.AgentVsockPort)
	}
}

// A bundle that exits without reading its payload is not an error.
func TestUnreadPayloadIsNotAnError(t *testing.T) {
	o := run(t, Config{Program: shProgram(`exec 0<&-; sleep 0.2`)}, strings.Repeat("p", 1<<20))
	if len(o.errs) != 0 || !o.done.GetSuccess() {
		t.Fatalf("errors %v, done %v", o.errs, o.done)
	}
}
