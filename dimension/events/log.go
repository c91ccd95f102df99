package events

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/hyphae-run/hyphae/errcode"
)

// Stream layout. One stream holds every run; each run is one subject, so
// the server's per-subject index serves replays of one run without reading
// the others, and retention applies to the whole log at once.
const (
	// StreamName is the JetStream stream holding all runs.
	StreamName = "DIMENSION_RUNS"
	// SubjectPrefix precedes the run id in a run's subject.
	SubjectPrefix = "runs."
)

// Header names on stored messages. The message data is the event body as
// is (no base64, no re-encoding); everything else travels in headers.
const (
	// hdrSeq is the per-run sequence, decimal.
	hdrSeq = "Dimension-Seq"
	// hdrMeta is the rest of the event as one compact JSON object (JSON
	// escapes every control character, so it is a valid header value).
	hdrMeta = "Dimension-Meta"
)

// Defaults for Options.
const (
	DefaultMaxAge           = 7 * 24 * time.Hour
	DefaultMaxBytes         = 1 << 30
	DefaultSubscriberBuffer = 64
	defaultReadyTimeout     = 10 * time.Second
	// subscriberResetAttempts bounds how often a subscription's consumer is
	// recreated in one recovery cycle before the subscription fails, so a
	// vanished server ends SSE streams instead of parking them forever.
	subscriberResetAttempts = 5
)

// Options configure Open.
type Options struct {
	// URL of an external NATS server or cluster (DIMENSION_NATS_URL); empty
	// starts an embedded server storing under StoreDir.
	URL string
	// StoreDir is the embedded server's JetStream directory (under the
	// gateway's data dir). Unused with URL.
	StoreDir string
	// MaxAge drops events older than this; 0 means DefaultMaxAge.
	MaxAge time.Duration
	// MaxBytes caps the stream's size, dropping the oldest events first;
	// 0 means DefaultMaxBytes, -1 unlimited.
	MaxBytes int64
	// Replicas is the stream's replica count on a cluster; 0 means 1.
	Replicas int
	// SubscriberBuffer is how many events each subscription holds for a
	// reader that is behind; 0 means DefaultSubscriberBuffer.
	SubscriberBuffer int
	// Logger receives the log's and the embedded server's messages; nil
	// discards them.
	Logger *slog.Logger
}

// Log is the event log: Append from a run's single writer, Subscribe from
// any number of readers.
//
// The per-run sequence is kept in a header (Dimension-Seq) and assigned by
// the Log: JetStream's own sequence is global across runs, so it would give
// a run ids like 7, 12, 13, 40 rather than 1, 2, 3, 4. The Log holds each
// active run's counter together with the stream sequence of the run's last
// message and publishes with Nats-Expected-Last-Subject-Sequence set to
// it. The server appends only if nothing else was appended to the run in
// between, so a second writer (another process, a stale counter after a
// restart) is detected as a coded Conflict instead of producing two events
// with one id; the counter is then reloaded from the stream's last message
// of the run. Resuming after a per-run sequence N maps N to a stream
// sequence with a binary search over the run's messages (see Subscribe).
type Log struct {
	opts   Options
	log    *slog.Logger
	ns     *server.Server // nil with an external server
	nc     *nats.Conn
	js     jetstream.JetStream
	stream jetstream.Stream

	// root is cancelled by Close to end every subscription.
	root       context.Context
	cancelRoot context.CancelFunc
	subs       sync.WaitGroup

	mu   sync.Mutex
	runs map[string]*runState

	closeOnce sync.Once
}

// runState is the writer-side state of one run, cached while it is active.
type runState struct {
	mu        sync.Mutex
	loaded    bool
	seq       uint64 // per-run sequence of the last event
	streamSeq uint64 // stream sequence of the last event; 0 = none
	done      bool   // the completed event was appended
}

// Open connects to the configured NATS server (starting the embedded one
// when Options.URL is empty) and creates or updates the stream with the
// configured retention.
func Open(ctx context.Context, opts Options) (*Log, error) {
	if opts.MaxAge == 0 {
		opts.MaxAge = DefaultMaxAge
	}
	if opts.MaxBytes == 0 {
		opts.MaxBytes = DefaultMaxBytes
	}
	if opts.Replicas == 0 {
		opts.Replicas = 1
	}
	if opts.SubscriberBuffer == 0 {
		opts.SubscriberBuffer = DefaultSubscriberBuffer
	}
	if opts.MaxAge < 0 || opts.MaxBytes < -1 || opts.Replicas < 0 || opts.SubscriberBuffer < 0 {
		return nil, errcode.New(errcode.InvalidArgument, "event log options out of range (max age %s, max bytes %d, replicas %d, buffer %d)",
			opts.MaxAge, opts.MaxBytes, opts.Replicas, opts.SubscriberBuffer)
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	l := &Log{opts: opts, log: log.With("component", "events"), runs: map[string]*runState{}}

	connectTimeout := defaultReadyTimeout
	if dl, ok := ctx.Deadline(); ok {
		connectTimeout = max(time.Until(dl), time.Millisecond)
	}
	var err error
	if opts.URL == "" {
		if l.ns, err = startEmbedded(opts.StoreDir, connectTimeout, log); err != nil {
			return nil, err
		}
		l.nc, err = nats.Connect("", nats.InProcessServer(l.ns), nats.Name("dimension-events"), l.connHandlers())
	} else {
		l.nc, err = nats.Connect(opts.URL, nats.Name("dimension-events"), nats.Timeout(connectTimeout),
			nats.MaxReconnects(-1), l.connHandlers())
	}
	if err != nil {
		l.shutdownServer()
		return nil, wrapHint(errcode.EventLogFailed, err, "check DIMENSION_NATS_URL and that the server runs with JetStream enabled (-js)",
			"connecting to NATS %s", l.where())
	}
	if l.js, err = jetstream.New(l.nc); err == nil {
		l.stream, err = l.js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
			Name:        StreamName,
			Description: "dimension run events, one subject per run",
			Subjects:    []string{SubjectPrefix + ">"},
			Retention:   jetstream.LimitsPolicy,
			Discard:     jetstream.DiscardOld,
			MaxAge:      opts.MaxAge,
			MaxBytes:    opts.MaxBytes,
			Storage:     jetstream.FileStorage,
			Replicas:    opts.Replicas,
		})
	}
	if err != nil {
		l.nc.Close()
		l.shutdownServer()
		return nil, wrapHint(errcode.EventLogFailed, err, "the server must have JetStream enabled and room for max bytes",
			"creating stream %s on NATS %s", StreamName, l.where())
	}
	l.root, l.cancelRoot = context.WithCancel(context.Background())
	// The limits as the server holds them (CreateOrUpdateStream answers
	// with the stream's stored config), not as they were asked for.
	held := l.stream.CachedInfo().Config
	l.log.Info("event log open", "nats", l.where(), "stream", StreamName, "max_age", held.MaxAge, "max_bytes", held.MaxBytes)
	return l, nil
}

// connHandlers logs the connection's trouble (a slow consumer among it);
// the client reconnects to an external server by itself.
func (l *Log) connHandlers() nats.Option {
	return func(o *nats.Options) error {
		o.DisconnectedErrCB = func(_ *nats.Conn, err error) {
			if err != nil { // nil when Close ends the connection
				l.log.Warn("NATS disconnected", "err", err)
			}
		}
		o.ReconnectedCB = func(nc *nats.Conn) { l.log.Info("NATS reconnected", "url", nc.ConnectedUrlRedacted()) }
		o.AsyncErrorCB = func(_ *nats.Conn, _ *nats.Subscription, err error) { l.log.Warn("NATS async error", "err", err) }
		return nil
	}
}

// where names the server for logs and errors: the external URLs without
// their credentials (a password, or a lone user, which NATS takes as a
// token), or the embedded server's directory.
func (l *Log) where() string {
	if l.opts.URL == "" {
		return "embedded (" + l.opts.StoreDir + ")"
	}
	return redactURLs(l.opts.URL)
}

// redactURLs replaces the user info of each of the comma-separated NATS
// URLs in s; a part that does not parse is not shown.
func redactURLs(s string) string {
	parts := strings.Split(s, ",")
	for i, p := range parts {
		u, err := url.Parse(strings.TrimSpace(p))
		switch {
		case err != nil:
			parts[i] = "(unparsable URL)"
		case u.User != nil:
			u.User = url.User("xxxxx")
			parts[i] = u.String()
		}
	}
	return strings.Join(parts, ",")
}

func (l *Log) shutdownServer() {
	if l.ns != nil {
		l.ns.Shutdown()
		l.ns.WaitForShutdown()
	}
}

// StreamInfo returns the stream's current configuration and state, for
// health checks and for tests of the retention settings.
func (l *Log) StreamInfo(ctx context.Context) (*jetstream.StreamInfo, error) {
	info, err := l.stream.Info(ctx)
	if err != nil {
		return nil, errcode.Wrap(errcode.EventLogFailed, err, "reading stream %s", StreamName)
	}
	return info, nil
}

// Close ends every subscription, drains the connection and stops the
// embedded server. Appends after Close fail.
func (l *Log) Close() error {
	var err error
	l.closeOnce.Do(func() {
		l.cancelRoot()
		l.subs.Wait()
		closed := make(chan struct{})
		l.nc.SetClosedHandler(func(*nats.Conn) { close(closed) })
		if derr := l.nc.Drain(); derr != nil {
			err = errcode.Wrap(errcode.EventLogFailed, derr, "draining the NATS connection")
			l.nc.Close()
		} else {
			<-closed
		}
		l.shutdownServer()
		l.log.Info("event log closed")
	})
	return err
}

func subject(runID string) string { return SubjectPrefix + runID }

// meta is the hdrMeta header's content.
type meta struct {
	TsMs        int64             `json:"ts_ms"`
	Kind        string            `json:"kind"`
	ContentType string            `json:"content_type,omitempty"`
	Attrs       map[string]string `json:"attrs,omitempty"`
	WorkerID    string            `json:"worker_id,omitempty"`
	BundleID    string            `json:"bundle_id,omitempty"`
	UserID      string            `json:"user_id,omitempty"`
}

// Append stores ev as the next event of its run and returns the per-run
// sequence it was given. Calls for one run are serialized, so the order of
// the returned sequences is the order of the calls. A run must have one
// writer; a second one is detected and refused (errcode.Conflict), and so
// is an event after the run's completed event (errcode.RunFinished).
// Append never waits for subscribers.
func (l *Log) Append(ctx context.Context, ev Event) (uint64, error) {
	if err := ev.validate(); err != nil {
		return 0, err
	}
	if ev.TsMs == 0 {
		ev.TsMs = time.Now().UnixMilli()
	}
	rs := l.runState(ev.RunID)
	rs.mu.Lock()
	defer rs.mu.Unlock()
	if !rs.loaded {
		if err := l.load(ctx, ev.RunID, rs); err != nil {
			return 0, err
		}
	}
	if rs.done {
		// The state of a finished run is not kept: a late Append (a
		// reaper, a retry) loads it again and is refused again.
		l.forget(ev.RunID, rs)
		return 0, errcode.New(errcode.RunFinished, "run %s already completed; event %q not appended", ev.RunID, ev.Kind)
	}
	m, err := json.Marshal(meta{
		TsMs: ev.TsMs, Kind: ev.Kind, ContentType: ev.ContentType, Attrs: ev.Attrs,
		WorkerID: ev.WorkerID, BundleID: ev.BundleID, UserID: ev.UserID,
	})
	if err != nil {
		return 0, errcode.Wrap(errcode.InvalidArgument, err, "encoding event metadata")
	}
	seq := rs.seq + 1
	msg := nats.NewMsg(subject(ev.RunID))
	msg.Header.Set(hdrSeq, strconv.FormatUint(seq, 10))
	msg.Header.Set(hdrMeta, string(m))
	msg.Data = ev.Body
	if max := l.nc.MaxPayload(); int64(len(ev.Body)+len(m)+64) > max {
		return 0, errcode.New(errcode.SizeLimit, "event %q of run %s is %d bytes, over the event log's %d", ev.Kind, ev.RunID, len(ev.Body), max)
	}
	ack, err := l.js.PublishMsg(ctx, msg, jetstream.WithExpectLastSequencePerSubject(rs.streamSeq))
	if err != nil {
		// Whatever happened, the cached counter may now be wrong (the
		// message may have been stored with its ack lost): reload it.
		rs.loaded = false
		if isWrongLastSequence(err) {
			return 0, wrapHint(errcode.Conflict, err, "a run must have exactly one writer", "another writer appended to run %s", ev.RunID)
		}
		return 0, errcode.Wrap(errcode.EventLogFailed, err, "appending event %q to run %s", ev.Kind, ev.RunID)
	}
	rs.seq, rs.streamSeq = seq, ack.Sequence
	if ev.IsCompleted() {
		rs.done = true
		l.forget(ev.RunID, rs)
	}
	return seq, nil
}

// forget drops the cached state rs of a finished run, unless another
// Append already replaced it.
func (l *Log) forget(runID string, rs *runState) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.runs[runID] == rs {
		delete(l.runs, runID)
	}
}

func (l *Log) runState(runID string) *runState {
	l.mu.Lock()
	defer l.mu.Unlock()
	rs, ok := l.runs[runID]
	if !ok {
		rs = &runState{}
		l.runs[runID] = rs
	}
	return rs
}

// load reads a run's writer state from its last stored message, for the
// first Append of a run in this process or after a failed one.
func (l *Log) load(ctx context.Context, runID string, rs *runState) error {
	raw, err := l.stream.GetLastMsgForSubject(ctx, subject(runID))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		rs.loaded, rs.seq, rs.streamSeq, rs.done = true, 0, 0, false
		return nil
	}
	if err != nil {
		return errcode.Wrap(errcode.EventLogFailed, err, "reading the last event of run %s", runID)
	}
	ev, err := decode(runID, raw.Header, raw.Data)
	if err != nil {
		return err
	}
	rs.loaded, rs.seq, rs.streamSeq, rs.done = true, ev.Seq, raw.Sequence, ev.IsCompleted()
	return nil
}

func isWrongLastSequence(err error) bool {
	var jsErr jetstream.JetStreamError
	if !errors.As(err, &jsErr) || jsErr.APIError() == nil {
		return false
	}
	c := jsErr.APIError().ErrorCode
	return c == jetstream.JSErrCodeStreamWrongLastSequence || c == jetstream.JSErrCodeStreamWrongLastSequenceConstant
}

// decode rebuilds an event from a stored message.
func decode(runID string, h nats.Header, body []byte) (Event, error) {
	seq, err := strconv.ParseUint(h.Get(hdrSeq), 10, 64)
	if err != nil || seq == 0 {
		return Event{}, errcode.New(errcode.Corrupt, "a stored event of run %s has no valid %s header (%q)", runID, hdrSeq, h.Get(hdrSeq))
	}
	var m meta
	if err := json.Unmarshal([]byte(h.Get(hdrMeta)), &m); err != nil {
		return Event{}, errcode.Wrap(errcode.Corrupt, err, "event %d of run %s has a malformed %s header", seq, runID, hdrMeta)
	}
	return Event{
		RunID: runID, Seq: seq, TsMs: m.TsMs, Kind: m.Kind, ContentType: m.ContentType, Body: body,
		Attrs: m.Attrs, WorkerID: m.WorkerID, BundleID: m.BundleID, UserID: m.UserID,
	}, nil
}

// wrapHint is errcode.Wrap with a hint for the user.
func wrapHint(code errcode.Code, err error, hint, format string, args ...any) error {
	e := errcode.New(code, format, args...).WithHint(hint)
	e.Err = err
	return e
}
