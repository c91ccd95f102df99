package gateway

import (
	"bytes"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/hyphae-run/hyphae/dimension/events"
)

func TestParseConfig(t *testing.T) {
	base := map[string]string{"HOME": "/home/u"}
	tests := []struct {
		name    string
		env     map[string]string
		args    []string
		check   func(Config) bool
		wantErr string
	}{
		{"defaults", nil, nil, func(c Config) bool {
			return c.Addr() == "0.0.0.0:3000" && c.MaxConcurrent == 200 && c.DrainTimeout == time.Minute && !c.Mock &&
				c.DataDir == "/home/u/.local/share/dimension" && c.BootTimeout == 30*time.Second &&
				c.ProcessingTimeout == 300*time.Second && c.MaxBootTimeout == 60*time.Second &&
				c.MaxProcessingTimeout == 600*time.Second && c.MaxBodyBytes == DefaultMaxBodyBytes && !c.MetricsPublic &&
				c.EventRetention == 7*24*time.Hour && c.EventMaxBytes == events.DefaultMaxBytes
		}, ""},
		{"xdg", map[string]string{"XDG_DATA_HOME": "/x"}, nil, func(c Config) bool { return c.DataDir == "/x/dimension" }, ""},
		{"env", map[string]string{
			"DIMENSION_PORT": "8080", "DIMENSION_HOST": "127.0.0.1", "DIMENSION_MAX_CONCURRENT": "5", "DIMENSION_MOCK": "true",
			"DIMENSION_DRAIN_TIMEOUT_SECS": "7", "DIMENSION_KERNEL_PATH": "/k", "DIMENSION_DATA_DIR": "/d",
			"DIMENSION_NATS_URL": "nats://n:4222", "DIMENSION_DATABASE_URL": "postgres://db/x", "DIMENSION_TOKEN": "tok",
			"DIMENSION_BOOT_TIMEOUT_SECS": "10", "DIMENSION_PROCESSING_TIMEOUT_SECS": "20",
			"DIMENSION_MAX_BOOT_TIMEOUT_SECS": "11", "DIMENSION_MAX_PROCESSING_TIMEOUT_SECS": "21",
			"DIMENSION_MAX_UPLOAD_BYTES": "100", "DIMENSION_MAX_BODY_BYTES": "50", "DIMENSION_WORKER_ID": "w1",
			"DIMENSION_METRICS_PUBLIC": "true", "DIMENSION_EVENT_RETENTION": "36h", "DIMENSION_EVENT_MAX_BYTES": "100000000",
		}, nil, func(c Config) bool {
			return c.Addr() == "127.0.0.1:8080" && c.MaxConcurrent == 5 && c.Mock && c.DrainTimeout == 7*time.Second &&
				c.KernelPath == "/k" && c.DataDir == "/d" && c.NATSURL == "nats://n:4222" && c.DatabaseURL == "postgres://db/x" &&
				c.Token == "tok" && c.BootTimeout == 10*time.Second && c.ProcessingTimeout == 20*time.Second &&
				c.MaxBootTimeout == 11*time.Second && c.MaxProcessingTimeout == 21*time.Second &&
				c.MaxUploadBytes == 100 && c.MaxBodyBytes == 50 && c.WorkerID == "w1" && c.MetricsPublic &&
				c.EventRetention == 36*time.Hour && c.EventMaxBytes == 100000000
		}, ""},
		{"event log flags over env", map[string]string{"DIMENSION_EVENT_RETENTION": "36h"},
			[]string{"--event-retention", "90m", "--event-max-bytes=-1"}, func(c Config) bool {
				return c.EventRetention == 90*time.Minute && c.EventMaxBytes == -1
			}, ""},
		{"flags over env", map[string]string{"DIMENSION_PORT": "8080", "DIMENSION_MOCK": "false"},
			[]string{"--port", "9090", "--mock", "--max-concurrent=3"}, func(c Config) bool {
				return c.Port == 9090 && c.Mock && c.MaxConcurrent == 3
			}, ""},
		{"metrics flag over env", map[string]string{"DIMENSION_METRICS_PUBLIC": "true"},
			[]string{"--metrics-public=false"}, func(c Config) bool { return !c.MetricsPublic }, ""},
		{"DATABASE_URL", map[string]string{"DATABASE_URL": "postgres://plain/x"}, nil, func(c Config) bool {
			return c.DatabaseURL == "postgres://plain/x"
		}, ""},
		{"DIMENSION_DATABASE_URL wins", map[string]string{"DATABASE_URL": "postgres://plain/x", "DIMENSION_DATABASE_URL": "postgres://dim/x"}, nil, func(c Config) bool {
			return c.DatabaseURL == "postgres://dim/x"
		}, ""},
		{"bad env int", map[string]string{"DIMENSION_PORT": "x"}, nil, nil, "DIMENSION_PORT"},
		{"bad env bool", map[string]string{"DIMENSION_MOCK": "yes please"}, nil, nil, "DIMENSION_MOCK"},
		{"negative secs", map[string]string{"DIMENSION_DRAIN_TIMEOUT_SECS": "-1"}, nil, nil, "DIMENSION_DRAIN_TIMEOUT_SECS"},
		{"bad retention", map[string]string{"DIMENSION_EVENT_RETENTION": "7 days"}, nil, nil, "DIMENSION_EVENT_RETENTION"},
		{"zero retention", nil, []string{"--event-retention", "0s"}, nil, "event retention"},
		{"zero event bytes", map[string]string{"DIMENSION_EVENT_MAX_BYTES": "0"}, nil, nil, "event log max bytes"},
		{"tiny event log", map[string]string{"DIMENSION_EVENT_MAX_BYTES": "1000"}, nil, nil, "event log max bytes"},
		// Shorter than the longest run (60 s boot + 600 s processing).
		{"retention under a run", nil, []string{"--event-retention", "10m"}, nil, "must outlast the longest run"},
		{"port range", nil, []string{"--port", "70000"}, nil, "port"},
		{"zero permits", nil, []string{"--max-concurrent", "0"}, nil, "max concurrent"},
		{"default over max", map[string]string{"DIMENSION_BOOT_TIMEOUT_SECS": "90"}, nil, nil, "boot timeout"},
		{"unknown flag", nil, []string{"--nope"}, nil, "command line"},
		{"stray argument", nil, []string{"serve"}, nil, "unexpected"},
		{"token is not a flag", nil, []string{"--token", "x"}, nil, "command line"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env := map[string]string{}
			for k, v := range base {
				env[k] = v
			}
			for k, v := range tt.env {
				env[k] = v
			}
			c, err := ParseConfig(tt.args, func(k string) string { return env[k] }, io.Discard)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %v, want one mentioning %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !tt.check(c) {
				t.Fatalf("config %+v", c)
			}
		})
	}
}

// The start-up log shows the configuration but no secret.
func TestConfigLogValueHidesSecrets(t *testing.T) {
	c := defaults(func(string) string { return "" })
	c.Token = "supersecret-token"
	c.DatabaseURL = "postgres://dim:pgsecret@db:5432/dim?sslmode=disable"
	c.NATSURL = "nats://u:natssecret@n1:4222,nats://n2:4222,nats://natstoken@n3:4222"
	var buf bytes.Buffer
	slog.New(slog.NewTextHandler(&buf, nil)).Info("start", "config", c)
	out := buf.String()
	for _, secret := range []string{"supersecret", "pgsecret", "natssecret", "natstoken"} {
		if strings.Contains(out, secret) {
			t.Fatalf("log shows %q: %s", secret, out)
		}
	}
	for _, want := range []string{"token_set=true", "db:5432", "n2:4222", "n3:4222", "max_concurrent=200", "event_retention=168h0m0s", "event_max_bytes=1073741824"} {
		if !strings.Contains(out, want) {
			t.Fatalf("log lacks %q: %s", want, out)
		}
	}
	if got := redactURL("host=/run/pg password=pw"); strings.Contains(got, "pw") {
		t.Fatalf("key=value DSN shown: %s", got)
	}
}
