package gateway

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/hyphae-run/hyphae/dimension/events"
	"github.com/hyphae-run/hyphae/dimension/runner"
	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/dimension/store/postgres"
	"github.com/hyphae-run/hyphae/dimension/store/sqlite"
	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/registry"
)

// Layout of the data dir.
const (
	natsDir     = "nats"    // the embedded NATS server's JetStream files
	registryDir = "hyphae"  // the hyphae registry: images and their index
	uploadsDir  = "uploads" // archives waiting for their import job
	mockDir     = "mock"    // the mock backend's unpacked images and runs
)

// Server timeouts. Reads of headers are bounded against slow clients;
// bodies and responses are not (uploads and SSE streams are long), the
// body caps and sse's per-write deadline bound them instead.
const (
	readHeaderTimeout = 10 * time.Second
	idleTimeout       = 2 * time.Minute
	// sseGrace is how long, after the runs have drained, SSE streams get
	// to send their final events before the connections are closed.
	sseGrace = 5 * time.Second
)

// RunOptions are Run's process-level settings.
type RunOptions struct {
	// Logger receives the gateway's logs; nil means slog.Default().
	Logger *slog.Logger
	// Stderr receives the bootstrap admin's key, printed once; nil means
	// os.Stderr.
	Stderr io.Writer
	// Listener, when set, is served instead of listening on Config.Addr
	// (tests and the benchmark pass 127.0.0.1:0).
	Listener net.Listener
	// Ready, when set, is called with the listening address once the
	// gateway serves.
	Ready func(addr net.Addr)
}

// Run opens everything cfg names (store, event log, registry, runner),
// reaps what a crashed predecessor left, and serves until ctx ends. Then
// it shuts down gracefully: it stops accepting, lets running runs finish
// for up to cfg.DrainTimeout and then stops them, lets SSE streams send
// their final events, and closes the event log and the store.
func Run(ctx context.Context, cfg Config, o RunOptions) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	log := o.Logger
	if log == nil {
		log = slog.Default()
	}
	if o.Stderr == nil {
		o.Stderr = os.Stderr
	}
	if cfg.WorkerID == "" {
		cfg.WorkerID, _ = os.Hostname()
	}
	log.Info("dimension-server starting", "config", cfg)

	uploads := filepath.Join(cfg.DataDir, uploadsDir)
	for _, d := range []string{cfg.DataDir, uploads} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return wrapHint(errcode.InvalidArgument, err, "set DIMENSION_DATA_DIR to a writable directory",
				"creating the data directory %s", d)
		}
	}
	unlock, err := lockDataDir(cfg.DataDir)
	if err != nil {
		return err
	}
	defer unlock()
	st, err := openStore(ctx, cfg, log)
	if err != nil {
		return err
	}
	defer st.Close()
	if err := bootstrap(ctx, st, o.Stderr, log); err != nil {
		return err
	}
	evlog, err := events.Open(ctx, events.Options{
		URL: cfg.NATSURL, StoreDir: filepath.Join(cfg.DataDir, natsDir),
		MaxAge: cfg.EventRetention, MaxBytes: cfg.EventMaxBytes, Logger: log,
	})
	if err != nil {
		return err
	}
	defer evlog.Close()
	// The runner's appends go through the metrics too.
	metrics := NewMetrics()
	counted := metrics.CountEvents(evlog)
	reg, err := registry.Open(ctx, filepath.Join(cfg.DataDir, registryDir), log.With("component", "registry"))
	if err != nil {
		return err
	}
	defer reg.Close()
	backend, closeBackend, err := newBackend(ctx, cfg, log)
	if err != nil {
		return err
	}
	defer closeBackend()
	limits := runner.Limits{
		BootTimeout: cfg.BootTimeout, ProcessingTimeout: cfg.ProcessingTimeout,
		MaxBootTimeout: cfg.MaxBootTimeout, MaxProcessingTimeout: cfg.MaxProcessingTimeout,
	}
	run, err := runner.New(runner.Options{
		Backend: backend, Events: counted, Store: st, MaxConcurrent: cfg.MaxConcurrent,
		WorkerID: cfg.WorkerID, Limits: limits, Logger: log.With("component", "runner"),
	})
	if err != nil {
		return err
	}
	srv, err := New(Options{
		Store: st, Events: counted, Runner: run, Images: reg, Token: cfg.Token, WorkerID: cfg.WorkerID,
		Limits: limits, MaxConcurrent: cfg.MaxConcurrent, MaxBodyBytes: cfg.MaxBodyBytes,
		MaxUploadBytes: cfg.MaxUploadBytes, UploadDir: uploads, Version: cfg.Version, Logger: log,
		Metrics: metrics, MetricsPublic: cfg.MetricsPublic,
	})
	if err != nil {
		return err
	}
	if err := srv.ReapOrphans(ctx); err != nil {
		return err
	}

	ln := o.Listener
	if ln == nil {
		if ln, err = net.Listen("tcp", cfg.Addr()); err != nil {
			return wrapHint(errcode.InvalidArgument, err, "set DIMENSION_PORT (or --port) to a free port",
				"listening on %s", cfg.Addr())
		}
	}
	hs := &http.Server{
		Handler:           srv,
		ReadHeaderTimeout: readHeaderTimeout,
		IdleTimeout:       idleTimeout,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	served := make(chan error, 1)
	go func() { served <- hs.Serve(ln) }()
	log.Info("dimension-server listening", "addr", ln.Addr().String(), "mock", run.Mock())
	if o.Ready != nil {
		o.Ready(ln.Addr())
	}

	select {
	case err := <-served:
		return errcode.Wrap(errcode.InvalidArgument, err, "serving HTTP")
	case <-ctx.Done():
	}
	shutdown(hs, srv, run, cfg.DrainTimeout, log)
	return nil
}

// shutdown drains in order: no new connections or runs; running runs get
// drain to finish, then are stopped; SSE streams then get sseGrace to send
// their final events; what is still open is closed.
func shutdown(hs *http.Server, srv *Server, run *runner.Runner, drain time.Duration, log *slog.Logger) {
	log.Info("shutting down", "drain_timeout", drain, "running", run.Running())
	srv.BeginDrain()
	drainCtx, cancelDrain := context.WithTimeout(context.Background(), drain)
	defer cancelDrain()
	shutCtx, cancelShut := context.WithCancel(context.Background())
	defer cancelShut()
	closed := make(chan error, 1)
	// Shutdown closes the listeners at once and then waits for every
	// request, the sync runs and SSE streams among them, to end.
	go func() { closed <- hs.Shutdown(shutCtx) }()
	run.Drain(drainCtx)
	srv.Wait(drainCtx)
	select {
	case <-closed:
	case <-time.After(sseGrace):
		cancelShut()
		<-closed
		log.Warn("closing connections still open after the drain")
		_ = hs.Close()
	}
	log.Info("shut down")
}

// openStore opens PostgreSQL when cfg names one, else SQLite in the data
// dir.
func openStore(ctx context.Context, cfg Config, log *slog.Logger) (store.Store, error) {
	l := log.With("component", "store")
	if cfg.DatabaseURL != "" {
		return postgres.Open(ctx, cfg.DatabaseURL, l)
	}
	return sqlite.Open(ctx, filepath.Join(cfg.DataDir, sqlite.DefaultFile), l)
}

// bootstrap creates the first admin of an empty store and prints its key
// on stderr, the only time it is ever shown.
func bootstrap(ctx context.Context, st store.Store, stderr io.Writer, log *slog.Logger) error {
	key, created, err := st.EnsureBootstrapAdmin(ctx)
	if err != nil {
		return err
	}
	if !created {
		return nil
	}
	log.Warn("created the bootstrap admin; its API key is printed on stderr once", "user", store.BootstrapAdminName)
	_, err = fmt.Fprintf(stderr, "\ndimension: created admin %q. Its API key, shown only this once:\n\n    %s\n\n"+
		"Use it as \"Authorization: Bearer <key>\"; create users and keys with POST /admin/users.\n\n",
		store.BootstrapAdminName, key)
	if err != nil {
		return errcode.Wrap(errcode.InvalidArgument, err, "printing the bootstrap admin's key")
	}
	return nil
}

// newBackend returns the mock backend (host processes, its unpacked
// images under the data dir) or the microVM one, with what releases it.
func newBackend(ctx context.Context, cfg Config, log *slog.Logger) (runner.Backend, func(), error) {
	l := log.With("component", "backend")
	if cfg.Mock {
		b, err := runner.NewMockBackend(runner.MockOptions{WorkDir: filepath.Join(cfg.DataDir, mockDir), Logger: l})
		if err != nil {
			return nil, nil, err
		}
		return b, func() {
			if err := b.Close(); err != nil {
				l.Warn("closing the mock backend", "err", err)
			}
		}, nil
	}
	b, err := runner.NewVMBackend(ctx, runner.VMOptions{Kernel: cfg.KernelPath, Owner: cfg.DataDir, Logger: l})
	if err != nil {
		return nil, nil, err
	}
	// Before any run boots: the VMs a predecessor on this data dir left
	// running when it died (SIGKILL, a crash) are killed and their runtime
	// dirs removed. What cannot be removed now is retried at the next start.
	if dirs, err := b.ReapOrphanVMs(ctx); err != nil || len(dirs) > 0 {
		l.Warn("reaped orphaned vms", "removed", len(dirs), "dirs", dirs, "err", err)
	}
	return b, func() {}, nil
}

// wrapHint is errcode.Wrap with a hint for the operator.
func wrapHint(code errcode.Code, err error, hint, format string, args ...any) error {
	e := errcode.New(code, format, args...).WithHint(hint)
	e.Err = err
	return e
}
