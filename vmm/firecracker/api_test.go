package firecracker

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
)

// serveUnix runs h on a fresh Unix socket and returns its path.
func serveUnix(t *testing.T, h http.Handler) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "api.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return path
}

func TestClientErrors(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("PUT /fault", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusBadRequest)
		w.Write([]byte(`{"fault_message":"The kernel file cannot be opened"}`))
	})
	mux.HandleFunc("PUT /plain", func(w http.ResponseWriter, _ *http.Request) {
		http.Error(w, "internal trouble", http.StatusInternalServerError)
	})
	mux.HandleFunc("PUT /slow", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
		case <-time.After(10 * time.Second):
		}
	})
	mux.HandleFunc("GET /", func(w http.ResponseWriter, _ *http.Request) {
		w.Write([]byte(`{"app_name":"Firecracker","id":"x","state":"Not started","vmm_version":"1.16.1"}`))
	})
	mux.HandleFunc("PUT /garbage-ok", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("{")) })
	sock := serveUnix(t, mux)
	c := NewClient(sock, 0)
	defer c.Close()
	// Only the call meant to time out gets a short bound: on a loaded
	// machine the others must not.
	hasty := NewClient(sock, 200*time.Millisecond)
	defer hasty.Close()
	ctx := context.Background()

	info, err := c.Describe(ctx)
	if err != nil || info.State != "Not started" || info.VMMVersion != "1.16.1" {
		t.Errorf("Describe: %+v, %v", info, err)
	}

	cases := []struct {
		path   string
		code   errcode.Code
		status int
		fault  string
	}{
		{"/fault", errcode.APIError, 400, "The kernel file cannot be opened"},
		{"/plain", errcode.APIError, 500, "internal trouble"},
		{"/slow", errcode.Timeout, 0, ""},
	}
	for _, tc := range cases {
		cl := c
		if tc.code == errcode.Timeout {
			cl = hasty
		}
		err := cl.Put(ctx, tc.path, map[string]string{})
		if !errcode.HasCode(err, tc.code) {
			t.Errorf("%s: %v, want code %s", tc.path, err, tc.code)
			continue
		}
		var fe *FaultError
		if tc.status == 0 {
			if errors.As(err, &fe) {
				t.Errorf("%s: unexpected fault %v", tc.path, fe)
			}
			continue
		}
		if !errors.As(err, &fe) || fe.Status != tc.status || fe.Fault != tc.fault || fe.Method != "PUT" || fe.Path != tc.path {
			t.Errorf("%s: fault %+v", tc.path, fe)
		}
		if !strings.Contains(err.Error(), tc.fault) {
			t.Errorf("%s: message %q hides the fault", tc.path, err)
		}
	}

	var out InstanceInfo
	if err := c.do(ctx, http.MethodPut, "/garbage-ok", nil, &out); !errcode.HasCode(err, errcode.APIError) {
		t.Errorf("undecodable answer: %v", err)
	}
	gone := NewClient(filepath.Join(t.TempDir(), "none.sock"), 0)
	if _, err := gone.Describe(ctx); !errcode.HasCode(err, errcode.APIError) {
		t.Errorf("missing socket: %v", err)
	}
}

// TestClientAgainstStandin checks that the stand-in, like Firecracker,
// refuses bodies its API description forbids, and that the refusal
// reaches the caller as a fault.
func TestClientAgainstStandin(t *testing.T) {
	m := startMachine(t, testSpec(t), Options{})
	ctx := context.Background()
	cases := []struct {
		name  string
		call  func() error
		fault string
	}{
		{"too many vcpus", func() error { return m.client.PutMachineConfig(ctx, MachineConfig{VCPUCount: 64, MemSizeMiB: 128}) }, "deserializing"},
		{"reserved cid", func() error { return m.client.PutVsock(ctx, Vsock{GuestCID: 2, UDSPath: "/x"}) }, "deserializing"},
		{"after start", func() error { return m.client.PutBootSource(ctx, BootSource{KernelImagePath: "/k"}) }, "after starting"},
		{"start twice", func() error { return m.client.InstanceStart(ctx) }, "after starting"},
		{"unknown path", func() error { return m.client.Put(ctx, "/nope", struct{}{}) }, "Invalid request method and/or path"},
		{"metrics not configured", func() error { return m.client.Action(ctx, ActionFlushMetrics) }, "metrics"},
	}
	for _, c := range cases {
		err := c.call()
		var fe *FaultError
		if !errcode.HasCode(err, errcode.APIError) || !errors.As(err, &fe) || fe.Status != 400 || !strings.Contains(fe.Fault, c.fault) {
			t.Errorf("%s: %v, want a 400 fault containing %q", c.name, err, c.fault)
		}
	}
}

func FuzzFaultMessage(f *testing.F) {
	for _, s := range []string{`{"fault_message":"x"}`, `{"fault_message":""}`, `{}`, "plain", strings.Repeat("é", 600)} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		msg := faultMessage(body)
		var e struct {
			FaultMessage string `json:"fault_message"`
		}
		if json.Unmarshal(body, &e) == nil && e.FaultMessage != "" {
			if msg != e.FaultMessage {
				t.Fatalf("fault_message %q reported as %q", e.FaultMessage, msg)
			}
			return
		}
		if len(msg) > 512+len("…") {
			t.Fatalf("raw fallback of %d bytes is unbounded", len(msg))
		}
	})
}
