package gateway

import (
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/hyphae-run/hyphae/dimension/events"
	"github.com/hyphae-run/hyphae/dimension/runner"
	"github.com/hyphae-run/hyphae/errcode"
)

// Defaults of Config (ISSUE 4, "Gateway"); the run timeouts' defaults are
// package runner's.
const (
	DefaultHost                 = "0.0.0.0"
	DefaultPort                 = 3000
	DefaultMaxConcurrent        = 200
	DefaultDrainTimeout         = 60 * time.Second
	DefaultMaxUploadBytes int64 = 2 << 30
	// DefaultMaxBodyBytes bounds JSON request bodies. A run's payload
	// travels in one protocol frame (4 MiB at most), so a larger body could
	// never be delivered anyway.
	DefaultMaxBodyBytes int64 = 4 << 20
)

// envPrefix starts every environment variable the gateway reads.
const envPrefix = "DIMENSION_"

// Config is the gateway's configuration. ParseConfig fills it from flags
// and DIMENSION_* variables; tests build it directly.
type Config struct {
	Host string
	Port int
	// MaxConcurrent is the number of run permits: runs (VMs) executing at
	// once.
	MaxConcurrent int
	// DrainTimeout is how long a shutdown lets running runs finish before
	// stopping them.
	DrainTimeout time.Duration
	// KernelPath is the guest kernel for real VMs (unused with Mock).
	KernelPath string
	// Mock runs bundles as host processes under the agent protocol instead
	// of in microVMs, for development hosts without a VMM.
	Mock bool
	// DataDir holds the SQLite store, the embedded NATS server's files,
	// the hyphae registry (images) and upload spool files.
	DataDir string
	// NATSURL names an external NATS server or cluster; empty embeds one.
	NATSURL string
	// DatabaseURL selects PostgreSQL; empty uses SQLite under DataDir.
	DatabaseURL string
	// Token, when set, is a bearer token that acts as an admin. It is only
	// read from the environment: a flag would show it in ps(1).
	Token string
	// WorkerID names this host in events, invocations and upload jobs;
	// empty means the host name. Gateways sharing a database need distinct
	// ones: a restart reaps only its own worker's runs and jobs.
	WorkerID string
	// Run timeouts: defaults (used when neither the request nor the
	// bundle's manifest sets one) and maxima (everything is clamped to
	// them).
	BootTimeout, ProcessingTimeout       time.Duration
	MaxBootTimeout, MaxProcessingTimeout time.Duration
	// EventRetention is how long run events are kept (the stream's max
	// age); EventMaxBytes caps the event log's size, dropping the oldest
	// events first (-1: unlimited).
	EventRetention time.Duration
	EventMaxBytes  int64
	// MaxUploadBytes caps a bundle upload or push request.
	MaxUploadBytes int64
	// MaxBodyBytes caps every other request body.
	MaxBodyBytes int64
	// MetricsPublic serves GET /metrics without an API key, for a
	// scraper on a trusted network; otherwise it needs an admin's key
	// (or DIMENSION_TOKEN) as its bearer token.
	MetricsPublic bool
	// Version is reported by /health.
	Version string
}

// DefaultDataDir returns $XDG_DATA_HOME/dimension, else
// ~/.local/share/dimension.
func DefaultDataDir(getenv func(string) string) string {
	if x := getenv("XDG_DATA_HOME"); x != "" {
		return filepath.Join(x, "dimension")
	}
	home := getenv("HOME")
	if home == "" {
		if h, err := os.UserHomeDir(); err == nil {
			home = h
		}
	}
	return filepath.Join(home, ".local", "share", "dimension")
}

// defaults returns the configuration with every default applied.
func defaults(getenv func(string) string) Config {
	return Config{
		Host:                 DefaultHost,
		Port:                 DefaultPort,
		MaxConcurrent:        DefaultMaxConcurrent,
		DrainTimeout:         DefaultDrainTimeout,
		DataDir:              DefaultDataDir(getenv),
		BootTimeout:          runner.DefaultBootTimeout,
		ProcessingTimeout:    runner.DefaultProcessingTimeout,
		MaxBootTimeout:       runner.DefaultMaxBootTimeout,
		MaxProcessingTimeout: runner.DefaultMaxProcessingTimeout,
		EventRetention:       events.DefaultMaxAge,
		EventMaxBytes:        events.DefaultMaxBytes,
		MaxUploadBytes:       DefaultMaxUploadBytes,
		MaxBodyBytes:         DefaultMaxBodyBytes,
		Version:              "dev",
	}
}

// ParseConfig reads the configuration: defaults, overridden by DIMENSION_*
// variables from getenv, overridden by flags in args (flag names are the
// variables' lowercase names with '-' for '_': DIMENSION_MAX_CONCURRENT is
// --max-concurrent). Usage and flag errors are written to out.
func ParseConfig(args []string, getenv func(string) string, out io.Writer) (Config, error) {
	c := defaults(getenv)
	fs := flag.NewFlagSet("dimension-server", flag.ContinueOnError)
	fs.SetOutput(out)
	var errs []string
	bind := func(name, usage string, v flag.Value) {
		env := envPrefix + strings.ToUpper(strings.ReplaceAll(name, "-", "_"))
		if s := getenv(env); s != "" {
			if err := v.Set(s); err != nil {
				errs = append(errs, fmt.Sprintf("%s=%q: %v", env, s, err))
			}
		}
		fs.Var(v, name, usage+" ($"+env+")")
	}
	bind("host", "address to listen on", (*stringValue)(&c.Host))
	bind("port", "TCP port to listen on", (*intValue)(&c.Port))
	bind("max-concurrent", "run permits: runs executing at once", (*intValue)(&c.MaxConcurrent))
	bind("drain-timeout-secs", "on shutdown, how long running runs may finish before being stopped", (*secondsValue)(&c.DrainTimeout))
	bind("kernel-path", "guest kernel for microVMs", (*stringValue)(&c.KernelPath))
	bind("mock", "run bundles as host processes instead of microVMs (no VMM needed)", (*boolValue)(&c.Mock))
	bind("data-dir", "directory for the store, the embedded NATS server, images and uploads", (*stringValue)(&c.DataDir))
	bind("nats-url", "external NATS server or cluster (default: embedded)", (*stringValue)(&c.NATSURL))
	// DATABASE_URL is the conventional name; DIMENSION_DATABASE_URL wins.
	c.DatabaseURL = getenv("DATABASE_URL")
	bind("database-url", "PostgreSQL URL (default: $DATABASE_URL, else SQLite under the data dir)", (*stringValue)(&c.DatabaseURL))
	bind("worker-id", "name of this host in events (default: the host name)", (*stringValue)(&c.WorkerID))
	bind("boot-timeout-secs", "default boot timeout", (*secondsValue)(&c.BootTimeout))
	bind("processing-timeout-secs", "default processing timeout", (*secondsValue)(&c.ProcessingTimeout))
	bind("max-boot-timeout-secs", "largest boot timeout a bundle or request may ask for", (*secondsValue)(&c.MaxBootTimeout))
	bind("max-processing-timeout-secs", "largest processing timeout a bundle or request may ask for", (*secondsValue)(&c.MaxProcessingTimeout))
	bind("event-retention", "how long run events are kept, as a Go duration (168h = 7 days)", (*durationValue)(&c.EventRetention))
	bind("event-max-bytes", "largest size of the event log before the oldest events go (-1: unlimited)", (*int64Value)(&c.EventMaxBytes))
	bind("max-upload-bytes", "largest bundle upload or push request", (*int64Value)(&c.MaxUploadBytes))
	bind("max-body-bytes", "largest body of any other request", (*int64Value)(&c.MaxBodyBytes))
	bind("metrics-public", "serve GET /metrics without an API key (default: admins only)", (*boolValue)(&c.MetricsPublic))
	// The token is environment-only (see Config.Token).
	c.Token = getenv(envPrefix + "TOKEN")
	if len(errs) > 0 {
		return Config{}, errcode.New(errcode.InvalidArgument, "bad configuration: %s", strings.Join(errs, "; "))
	}
	if err := fs.Parse(args); err != nil {
		return Config{}, errcode.Wrap(errcode.InvalidArgument, err, "bad command line")
	}
	if fs.NArg() > 0 {
		return Config{}, errcode.New(errcode.InvalidArgument, "unexpected arguments %q", fs.Args())
	}
	return c, c.Validate()
}

// Floors of the event log's retention (see Validate).
const (
	retentionMargin = time.Minute
	minEventBytes   = 64 << 20
)

// Validate checks the configuration's values.
func (c Config) Validate() error {
	bad := func(format string, args ...any) error {
		return errcode.New(errcode.InvalidArgument, "bad configuration: "+format, args...)
	}
	switch {
	case c.Port < 0 || c.Port > 65535:
		return bad("port %d is out of range 0..65535", c.Port)
	case c.MaxConcurrent < 1:
		return bad("max concurrent %d must be at least 1", c.MaxConcurrent)
	case c.DrainTimeout < 0:
		return bad("drain timeout %s is negative", c.DrainTimeout)
	case c.BootTimeout <= 0 || c.ProcessingTimeout <= 0 || c.MaxBootTimeout <= 0 || c.MaxProcessingTimeout <= 0:
		return bad("timeouts must be positive")
	case c.BootTimeout > c.MaxBootTimeout:
		return bad("boot timeout %s is over the maximum %s", c.BootTimeout, c.MaxBootTimeout)
	case c.ProcessingTimeout > c.MaxProcessingTimeout:
		return bad("processing timeout %s is over the maximum %s", c.ProcessingTimeout, c.MaxProcessingTimeout)
	case c.EventRetention < c.MaxBootTimeout+c.MaxProcessingTimeout+retentionMargin:
		// A run whose last event aged out could append no more (each
		// append expects its run's last sequence), so history must
		// outlive the longest run.
		return bad("event retention %s must outlast the longest run: at least the maximum boot and processing timeouts plus %s (%s)",
			c.EventRetention, retentionMargin, c.MaxBootTimeout+c.MaxProcessingTimeout+retentionMargin)
	case c.EventMaxBytes < minEventBytes && c.EventMaxBytes != -1:
		return bad("event log max bytes %d must be at least %d (64 MiB), or -1 for unlimited", c.EventMaxBytes, minEventBytes)
	case c.MaxUploadBytes <= 0 || c.MaxBodyBytes <= 0:
		return bad("body limits must be positive")
	case c.DataDir == "":
		return bad("data dir is empty")
	}
	return nil
}

// Addr returns the listen address, host:port.
func (c Config) Addr() string { return net.JoinHostPort(c.Host, strconv.Itoa(c.Port)) }

// LogValue renders the configuration for the start-up log without
// secrets: the token only as set or not, URLs without their passwords.
func (c Config) LogValue() slog.Value {
	return slog.GroupValue(
		slog.String("addr", c.Addr()),
		slog.Int("max_concurrent", c.MaxConcurrent),
		slog.Duration("drain_timeout", c.DrainTimeout),
		slog.Bool("mock", c.Mock),
		slog.String("kernel_path", c.KernelPath),
		slog.String("data_dir", c.DataDir),
		slog.String("nats_url", redactURL(c.NATSURL)),
		slog.String("database_url", redactURL(c.DatabaseURL)),
		slog.Bool("token_set", c.Token != ""),
		slog.String("worker_id", c.WorkerID),
		slog.Duration("boot_timeout", c.BootTimeout),
		slog.Duration("processing_timeout", c.ProcessingTimeout),
		slog.Duration("max_boot_timeout", c.MaxBootTimeout),
		slog.Duration("max_processing_timeout", c.MaxProcessingTimeout),
		slog.Duration("event_retention", c.EventRetention),
		slog.Int64("event_max_bytes", c.EventMaxBytes),
		slog.Int64("max_upload_bytes", c.MaxUploadBytes),
		slog.Int64("max_body_bytes", c.MaxBodyBytes),
		slog.Bool("metrics_public", c.MetricsPublic),
		slog.String("version", c.Version),
	)
}

// redactURL drops a URL's password (and a NATS URL's token). A value that is not a URL (such as
// PostgreSQL's key=value form, which may hold password=…) is shown only as
// set.
func redactURL(s string) string {
	if s == "" {
		return ""
	}
	var parts []string
	// NATS takes a comma-separated list of servers.
	for _, one := range strings.Split(s, ",") {
		u, err := url.Parse(strings.TrimSpace(one))
		if err != nil || u.Scheme == "" {
			return "(set, not shown)"
		}
		if _, has := u.User.Password(); has {
			u.User = url.UserPassword(u.User.Username(), "xxxxx")
		} else if u.User != nil && u.Scheme != "postgres" && u.Scheme != "postgresql" {
			// A lone user in a NATS URL is its token (nats://token@host).
			u.User = url.User("xxxxx")
		}
		if q := u.Query(); q.Has("password") {
			q.Set("password", "xxxxx")
			u.RawQuery = q.Encode()
		}
		parts = append(parts, u.Redacted())
	}
	return strings.Join(parts, ",")
}

// flag.Value implementations for the configuration's types. The standard
// flag package's are not exported as types that can wrap a field.
type (
	stringValue   string
	intValue      int
	int64Value    int64
	boolValue     bool
	secondsValue  time.Duration
	durationValue time.Duration
)

func (v *stringValue) Set(s string) error { *v = stringValue(s); return nil }
func (v *stringValue) String() string {
	if v == nil {
		return ""
	}
	return string(*v)
}

func (v *intValue) Set(s string) error {
	n, err := strconv.Atoi(s)
	if err != nil {
		return fmt.Errorf("not an integer")
	}
	*v = intValue(n)
	return nil
}
func (v *intValue) String() string {
	if v == nil {
		return "0"
	}
	return strconv.Itoa(int(*v))
}

func (v *int64Value) Set(s string) error {
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return fmt.Errorf("not an integer")
	}
	*v = int64Value(n)
	return nil
}
func (v *int64Value) String() string {
	if v == nil {
		return "0"
	}
	return strconv.FormatInt(int64(*v), 10)
}

func (v *boolValue) Set(s string) error {
	b, err := strconv.ParseBool(s)
	if err != nil {
		return fmt.Errorf("not a boolean (true or false)")
	}
	*v = boolValue(b)
	return nil
}
func (v *boolValue) String() string { return strconv.FormatBool(v != nil && bool(*v)) }

// IsBoolFlag lets --mock stand for --mock=true.
func (v *boolValue) IsBoolFlag() bool { return true }

func (v *secondsValue) Set(s string) error {
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 || n > int64(time.Duration(1<<62)/time.Second) {
		return fmt.Errorf("not a whole number of seconds")
	}
	*v = secondsValue(time.Duration(n) * time.Second)
	return nil
}
func (v *secondsValue) String() string {
	if v == nil {
		return "0"
	}
	return strconv.FormatInt(int64(time.Duration(*v)/time.Second), 10)
}

func (v *durationValue) Set(s string) error {
	d, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("not a duration (such as 168h or 30m)")
	}
	*v = durationValue(d)
	return nil
}
func (v *durationValue) String() string {
	if v == nil {
		return "0s"
	}
	return time.Duration(*v).String()
}
