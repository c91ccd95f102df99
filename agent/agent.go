// Package agent is dimension-agent, the sidecar that runs inside every
// dimension VM between the host and the bundle (ARCHITECTURE.md §3.2,
// §3.3). It receives one Request over the host channel, runs the bundle's
// entrypoint with the payload on stdin, serves the events Unix socket,
// relays the bundle's events, stderr lines and final stdout as
// OutboundMessages, and ends with Done.
//
// The bundle is untrusted: every buffer is bounded, a bad events frame
// closes only its connection, and a flood of output is slowed down
// (backpressure through the host channel), never buffered without bound.
// The agent's own failures reach the host as Error envelopes before Done.
//
// Run works over any io.ReadWriter, so the host side can be tested
// in-process over net.Pipe and the gateway's mock mode can run bundles as
// host processes; Open (Linux) opens the real guest transports.
package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
	"github.com/hyphae-run/hyphae/protocol"
	"github.com/hyphae-run/hyphae/protocol/pb"
)

// Kinds and content types of the messages the agent itself emits.
const (
	KindStderr             = "stderr"
	KindStdoutFinal        = "stdout-final"
	KindState              = "state" // emitted by the runner; reserved here
	ContentTypeStderr      = "text/plain; charset=utf-8"
	ContentTypeStdoutFinal = "application/octet-stream"
)

// EnvEventsSocket names the events socket in the bundle's environment.
const EnvEventsSocket = "DIMENSION_EVENTS_SOCK"

// Defaults for Config.
const (
	DefaultEventsSocket   = "/run/dimension/events.sock"
	DefaultStdoutLimit    = 1 << 20
	DefaultShutdownGrace  = 5 * time.Second
	DefaultDrainTimeout   = 2 * time.Second
	DefaultMaxConnections = 64
	// MaxStdoutLimit keeps stdout-final, with its envelope, inside one
	// protocol frame.
	MaxStdoutLimit = protocol.MaxFrameSize - 64<<10
	// maxStderrLine is the longest stderr line relayed as one message;
	// longer lines go out in pieces flagged partial=true.
	maxStderrLine = 16 << 10
)

// Attributes the agent sets.
const (
	AttrTruncated     = "truncated"      // stdout-final was cut at the limit
	AttrOriginalBytes = "original_bytes" // how many bytes stdout really had
	AttrPartial       = "partial"        // a stderr piece without its newline
)

// Config tells Run where things are. The zero value runs the image in "/"
// as the guest does.
type Config struct {
	// Root is where /etc/hyphae is found ("" = "/"). Only the hyphae files
	// are read relative to it; the workdir they name is used as is.
	Root string
	// Program, when set, is run instead of the one the files under Root
	// describe (the gateway's mock mode).
	Program *Program
	// BaseEnv is the environment the bundle's own env file and the
	// command-line tokens are merged over (typically the agent's own,
	// handed down by hyphae-init).
	BaseEnv []guest.EnvVar
	// Cmdline is the kernel command line, for hyphae.env. tokens.
	Cmdline string
	// EventsSocket is the events socket path ("" = DefaultEventsSocket).
	EventsSocket string
	// StdoutLimit bounds stdout-final (0 = DefaultStdoutLimit, at most
	// MaxStdoutLimit).
	StdoutLimit int
	// ShutdownGrace is how long a ShutdownRequest waits between SIGTERM and
	// SIGKILL when the request names no grace (0 = DefaultShutdownGrace).
	ShutdownGrace time.Duration
	// DrainTimeout bounds how long output still held open by escaped
	// descendants is awaited after the entrypoint exits (0 =
	// DefaultDrainTimeout).
	DrainTimeout time.Duration
	// MaxConnections bounds concurrent events-socket connections; further
	// connections wait in the listen backlog (0 = DefaultMaxConnections).
	MaxConnections int
	// Logger receives the agent's diagnostics (nil = slog.Default()).
	Logger *slog.Logger
}

func (c Config) withDefaults() Config {
	if c.Root == "" {
		c.Root = "/"
	}
	if c.EventsSocket == "" {
		c.EventsSocket = DefaultEventsSocket
	}
	if c.StdoutLimit <= 0 {
		c.StdoutLimit = DefaultStdoutLimit
	}
	c.StdoutLimit = min(c.StdoutLimit, MaxStdoutLimit)
	if c.ShutdownGrace <= 0 {
		c.ShutdownGrace = DefaultShutdownGrace
	}
	if c.DrainTimeout <= 0 {
		c.DrainTimeout = DefaultDrainTimeout
	}
	if c.MaxConnections <= 0 {
		c.MaxConnections = DefaultMaxConnections
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return c
}

// session is one run of the agent.
type session struct {
	cfg Config
	log *slog.Logger
	r   *protocol.Reader
	w   *protocol.Writer
	id  string // the Request's request_id, echoed on every reply

	mu      sync.Mutex // orders sequence numbers with their writes
	seq     uint64
	hostErr error // first failed write: the host is gone

	hostGone context.CancelFunc
	failed   bool // a terminal Error was sent
}

// Run serves one request over transport and returns the bundle's exit code
// (-1 when it never ran). It returns an error only when the host cannot be
// talked to (no Request arrived, or the channel failed); everything else is
// reported to the host. Run returns once Done is written; a goroutine
// may still be reading transport until the caller closes it.
func Run(ctx context.Context, transport io.ReadWriter, cfg Config) (int, error) {
	cfg = cfg.withDefaults()
	s := &session{cfg: cfg, log: cfg.Logger, r: protocol.NewReader(transport), w: protocol.NewWriter(transport)}

	first, err := s.recv(ctx)
	if err != nil {
		return -1, errcode.Wrap(errcode.ChannelFailed, err, "waiting for the host's request")
	}
	s.id = first.GetRequestId()
	req := first.GetRequest()
	if req == nil {
		s.report(pb.ErrorCode_ERROR_CODE_PROTOCOL_VIOLATION, true, fmt.Sprintf("first message must be a Request, got %T", first.GetPayload()), "")
		return s.done(-1, 0)
	}

	prog := cfg.Program
	if prog == nil {
		if prog, err = LoadProgram(cfg.Root, cfg.BaseEnv, cfg.Cmdline); err != nil {
			s.report(pb.ErrorCode_ERROR_CODE_ENTRYPOINT_INVALID, true, "cannot read the entrypoint", err.Error())
			return s.done(-1, 0)
		}
	}
	if len(prog.Argv) == 0 || prog.Argv[0] == "" {
		s.report(pb.ErrorCode_ERROR_CODE_ENTRYPOINT_INVALID, true, "the entrypoint is empty", "")
		return s.done(-1, 0)
	}

	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	s.hostGone = cancel

	srv, err := listenEvents(cfg.EventsSocket, cfg.MaxConnections, s)
	if err != nil {
		s.report(pb.ErrorCode_ERROR_CODE_EVENTS_SOCKET, true, "cannot serve the events socket", err.Error())
		return s.done(-1, 0)
	}
	defer srv.close()

	c, err := startChild(prog, prog.environ(guest.EnvVar{Key: EnvEventsSocket, Value: cfg.EventsSocket}))
	if err != nil {
		s.report(pb.ErrorCode_ERROR_CODE_SPAWN_FAILED, true, "cannot start the entrypoint", err.Error())
		return s.done(-1, 0)
	}
	s.log.Info("bundle started", "argv", prog.Argv, "pid", c.cmd.Process.Pid)

	var wg sync.WaitGroup
	wg.Go(func() { s.deliver(c.stdin, req.GetPayload()) })
	wg.Go(func() { s.relayStderr(c.stderr, srv.settle) })
	stdout := &boundedBuffer{limit: cfg.StdoutLimit}
	wg.Go(func() { s.collect(c.stdout, stdout) })

	exited := make(chan struct{})
	go s.control(runCtx, c, exited)

	code, sig, werr := c.wait()
	close(exited)
	if werr != nil {
		s.report(pb.ErrorCode_ERROR_CODE_INTERNAL, true, "lost track of the bundle", werr.Error())
	}
	s.log.Info("bundle exited", "code", code, "signal", sig)

	// Whatever the entrypoint wrote before it exited is still in pipes and
	// sockets: read it to the end, but not forever if an escaped
	// descendant holds them open.
	srv.drain()
	if !waitTimeout(&wg, cfg.DrainTimeout) {
		c.stdin.Close()
		c.stdout.Close()
		c.stderr.Close()
	}
	srv.shutdown(cfg.DrainTimeout)
	wg.Wait()

	attrs := map[string]string{}
	if stdout.dropped > 0 {
		attrs[AttrTruncated] = "true"
		attrs[AttrOriginalBytes] = strconv.FormatInt(int64(len(stdout.buf))+stdout.dropped, 10)
	}
	s.emit(KindStdoutFinal, ContentTypeStdoutFinal, stdout.buf, attrs)
	if ctx.Err() != nil {
		s.report(pb.ErrorCode_ERROR_CODE_INTERNAL, true, "the agent was stopped", ctx.Err().Error())
	}
	return s.done(code, sig)
}

// recv reads the next non-empty envelope, giving up when ctx ends.
func (s *session) recv(ctx context.Context) (*pb.Envelope, error) {
	type result struct {
		env *pb.Envelope
		err error
	}
	ch := make(chan result, 1)
	go func() {
		for {
			env, err := s.r.ReadEnvelope()
			if err == nil && protocol.IsEmpty(env) {
				continue
			}
			ch <- result{env, err}
			return
		}
	}()
	select {
	case r := <-ch:
		return r.env, r.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// control handles the host's messages during the run and the run's
// cancellation, until the bundle has exited.
func (s *session) control(ctx context.Context, c *child, exited <-chan struct{}) {
	msgs := make(chan *pb.Envelope)
	go func() {
		for {
			env, err := s.r.ReadEnvelope()
			if err != nil {
				if !errors.Is(err, io.EOF) {
					s.log.Warn("host channel read failed", "err", err)
				}
				close(msgs)
				return
			}
			if protocol.IsEmpty(env) {
				continue
			}
			select {
			case msgs <- env:
			case <-exited:
				return
			}
		}
	}()
	var kill *time.Timer
	defer func() {
		if kill != nil {
			kill.Stop()
		}
	}()
	for {
		select {
		case <-exited:
			return
		case <-ctx.Done():
			c.signal(syscall.SIGKILL)
			return
		case env, ok := <-msgs:
			if !ok {
				// No host to report to: end the run rather than leave
				// the bundle running unobserved.
				s.log.Warn("host closed the channel; killing the bundle")
				c.signal(syscall.SIGKILL)
				return
			}
			sd := env.GetShutdownRequest()
			if sd == nil {
				s.report(pb.ErrorCode_ERROR_CODE_PROTOCOL_VIOLATION, false, fmt.Sprintf("unexpected %T during a run", env.GetPayload()), "")
				continue
			}
			if kill != nil { // a second request: stop waiting
				c.signal(syscall.SIGKILL)
				continue
			}
			grace := s.cfg.ShutdownGrace
			if sd.GetGraceMs() > 0 {
				grace = time.Duration(sd.GetGraceMs()) * time.Millisecond
			}
			s.log.Info("shutdown requested", "reason", sd.GetReason(), "grace", grace)
			c.signal(syscall.SIGTERM)
			kill = time.AfterFunc(grace, func() { c.signal(syscall.SIGKILL) })
			s.send(&pb.Envelope{Payload: &pb.Envelope_ShutdownAck{ShutdownAck: &pb.ShutdownAck{}}})
		}
	}
}

// deliver writes the payload to the bundle's stdin, then closes it.
func (s *session) deliver(stdin *os.File, payload []byte) {
	n, err := stdin.Write(payload)
	stdin.Close()
	if errors.Is(err, syscall.EPIPE) {
		// The bundle closed its stdin (or exited) without reading it all:
		// its choice, not a failure of the run.
		s.log.Info("the bundle did not read its whole payload", "read", n, "of", len(payload))
		return
	}
	if err != nil && !errors.Is(err, os.ErrClosed) {
		s.report(pb.ErrorCode_ERROR_CODE_PAYLOAD_DELIVERY, false,
			fmt.Sprintf("the bundle took %d of %d payload bytes", n, len(payload)), err.Error())
	}
}

// collect reads all of stdout into a bounded buffer, counting what does
// not fit, so that the bundle never blocks on a full pipe.
func (s *session) collect(r *os.File, b *boundedBuffer) {
	_, _ = io.Copy(b, r)
	r.Close()
}

// relayStderr emits each stderr line as one message, after settle has let
// the event frames the bundle wrote before that line be relayed.
func (s *session) relayStderr(r *os.File, settle func()) {
	defer r.Close()
	lr := newLineReader(r, maxStderrLine)
	for {
		line, partial, err := lr.next()
		if len(line) > 0 || (err == nil && !partial) {
			var attrs map[string]string
			if partial {
				attrs = map[string]string{AttrPartial: "true"}
			}
			settle()
			s.emit(KindStderr, ContentTypeStderr, line, attrs)
		}
		if err != nil {
			return
		}
	}
}

// emit sends one OutboundMessage with the next sequence number. Writes are
// serialized so that sequence order is wire order; a slow host therefore
// slows every producer down instead of letting output pile up.
func (s *session) emit(kind, contentType string, body []byte, attrs map[string]string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.hostErr != nil {
		return
	}
	s.seq++
	s.writeLocked(&pb.Envelope{Payload: &pb.Envelope_Outbound{Outbound: &pb.OutboundMessage{
		Sequence:    s.seq,
		TimestampMs: time.Now().UnixMilli(),
		Kind:        kind,
		ContentType: contentType,
		Body:        body,
		Attributes:  attrs,
	}}})
}

// report sends an Error envelope.
func (s *session) report(code pb.ErrorCode, terminal bool, msg, detail string) {
	s.log.Warn("agent error", "code", code, "terminal", terminal, "message", msg, "detail", detail)
	s.mu.Lock()
	if terminal {
		s.failed = true
	}
	s.mu.Unlock()
	s.send(&pb.Envelope{Payload: &pb.Envelope_Error{Error: &pb.Error{Code: code, Message: msg, Detail: detail, Terminal: terminal}}})
}

// done sends Done and returns Run's results.
func (s *session) done(code, sig int) (int, error) {
	meta := map[string]string{}
	if sig != 0 {
		meta["signal"] = strconv.Itoa(sig)
	}
	s.mu.Lock()
	success := code == 0 && !s.failed
	s.mu.Unlock()
	s.send(&pb.Envelope{Payload: &pb.Envelope_Done{Done: &pb.Done{ExitCode: int32(code), Success: success, Metadata: meta}}})
	s.mu.Lock()
	defer s.mu.Unlock()
	return code, s.hostErr
}

func (s *session) send(env *pb.Envelope) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.hostErr == nil {
		s.writeLocked(env)
	}
}

func (s *session) writeLocked(env *pb.Envelope) {
	env.RequestId = s.id
	if err := s.w.WriteEnvelope(env); err != nil {
		s.hostErr = err
		s.log.Error("host channel write failed; ending the run", "err", err)
		if s.hostGone != nil {
			s.hostGone()
		}
	}
}

// boundedBuffer keeps the first limit bytes written to it and counts the
// rest.
type boundedBuffer struct {
	limit   int
	buf     []byte
	dropped int64
}

func (b *boundedBuffer) Write(p []byte) (int, error) {
	keep := min(len(p), b.limit-len(b.buf))
	b.buf = append(b.buf, p[:keep]...)
	b.dropped += int64(len(p) - keep)
	return len(p), nil
}

// waitTimeout waits for wg up to d and reports whether it finished.
func waitTimeout(wg *sync.WaitGroup, d time.Duration) bool {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-done:
		return true
	case <-t.C:
		return false
	}
}
