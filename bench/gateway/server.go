package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime/multipart"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// startupTimeout bounds how long the gateway process may take to answer
// /health; stopTimeout how long it may take to exit after SIGTERM.
const (
	startupTimeout = time.Minute
	stopTimeout    = 30 * time.Second
)

// gatewayProc is the real dimension-server binary running in mock mode on
// its own data directory, so that its memory is measured apart from the
// bench's clients and baselines.
type gatewayProc struct {
	cmd    *exec.Cmd
	url    string
	token  string
	stderr string // file the server logs (errors only) to
	exited chan struct{}
}

// startGateway starts bin on a free 127.0.0.1 port with a fresh data dir
// under dir and a random DIMENSION_TOKEN, and waits until /health answers.
func startGateway(ctx context.Context, bin, dir, libexec string, permits int) (*gatewayProc, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	tok := make([]byte, 24)
	rand.Read(tok)
	g := &gatewayProc{
		url: "http://127.0.0.1:" + strconv.Itoa(port), token: hex.EncodeToString(tok),
		stderr: filepath.Join(dir, "gateway.log"), exited: make(chan struct{}),
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	logf, err := os.Create(g.stderr)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	// Not CommandContext: the process is stopped with SIGTERM by stop, not
	// killed when the bench's deadline passes mid-phase.
	g.cmd = exec.Command(bin)
	g.cmd.Stdout, g.cmd.Stderr = logf, logf
	g.cmd.Env = append(gatewayEnv(os.Environ()),
		"DIMENSION_MOCK=true",
		"DIMENSION_DATA_DIR="+filepath.Join(dir, "data"),
		"DIMENSION_HOST=127.0.0.1",
		"DIMENSION_PORT="+strconv.Itoa(port),
		"DIMENSION_TOKEN="+g.token,
		"DIMENSION_MAX_CONCURRENT="+strconv.Itoa(permits),
		"DIMENSION_DRAIN_TIMEOUT_SECS=5",
		"DIMENSION_WORKER_ID=bench",
		"DIMENSION_LOG_LEVEL=error",
		"HYPHAE_LIBEXEC="+libexec,
	)
	if err := g.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { g.cmd.Wait(); close(g.exited) }()

	deadline := time.Now().Add(startupTimeout)
	for {
		req, _ := http.NewRequestWithContext(ctx, "GET", g.url+"/health", nil)
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return g, nil
			}
		}
		select {
		case <-g.exited:
			return nil, fmt.Errorf("dimension-server exited at start (%v):\n%s", g.cmd.ProcessState, g.logTail())
		case <-ctx.Done():
			g.stop()
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			g.stop()
			return nil, fmt.Errorf("dimension-server did not answer /health within %s:\n%s", startupTimeout, g.logTail())
		}
	}
}

// gatewayEnv is the bench's environment without the gateway's own
// variables, so a DATABASE_URL or DIMENSION_NATS_URL in the caller's shell
// cannot point the measured server at other infrastructure.
func gatewayEnv(env []string) []string {
	var out []string
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(k, "DIMENSION_") || k == "DATABASE_URL" || k == "HYPHAE_LIBEXEC" {
			continue
		}
		out = append(out, kv)
	}
	return out
}

// freePort asks the kernel for an unused port. Another process could take
// it before the server binds; the server then fails to start and says so.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// stop ends the server with SIGTERM (graceful shutdown), then SIGKILL if
// it has not exited within stopTimeout.
func (g *gatewayProc) stop() {
	select {
	case <-g.exited:
		return
	default:
	}
	g.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-g.exited:
	case <-time.After(stopTimeout):
		g.cmd.Process.Kill()
		<-g.exited
	}
}

func (g *gatewayProc) logTail() string {
	data, _ := os.ReadFile(g.stderr)
	if len(data) > 4096 {
		data = data[len(data)-4096:]
	}
	return string(data)
}

// rss returns the server process's resident set (VmRSS) and its peak
// (VmHWM) since start or since resetPeak.
func (g *gatewayProc) rss() (cur, peak int64, err error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", g.cmd.Process.Pid))
	if err != nil {
		return 0, 0, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		fields := strings.Fields(v)
		if len(fields) == 0 {
			continue
		}
		n, _ := strconv.ParseInt(fields[0], 10, 64)
		switch k {
		case "VmRSS":
			cur = n << 10
		case "VmHWM":
			peak = n << 10
		}
	}
	if cur == 0 {
		return 0, 0, fmt.Errorf("no VmRSS in /proc/%d/status", g.cmd.Process.Pid)
	}
	return cur, peak, nil
}

// resetPeak sets the server's VmHWM back to its current RSS (proc(5),
// clear_refs value 5), so the next peak covers one phase only.
func (g *gatewayProc) resetPeak() error {
	return os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", g.cmd.Process.Pid), []byte("5"), 0)
}

// runningVMs returns GET /health's count of runs in progress.
func (b *bench) runningVMs(ctx context.Context) (int, error) {
	var h struct {
		RunningVMs int `json:"running_vms"`
	}
	err := b.getJSON(ctx, "/health", &h)
	return h.RunningVMs, err
}

// getJSON decodes the answer of an authenticated GET.
func (b *bench) getJSON(ctx context.Context, path string, v any) error {
	req, _ := http.NewRequestWithContext(ctx, "GET", b.url+path, nil)
	req.Header.Set("Authorization", "Bearer "+b.key)
	resp, err := b.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %d %s", path, resp.StatusCode, data)
	}
	return json.Unmarshal(data, v)
}

// pushBundle registers the ext4 image at path as name:latest through
// POST /bundles/push, the way a client without docker would.
func (b *bench) pushBundle(ctx context.Context, name, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	pr, pw := io.Pipe()
	mw := multipart.NewWriter(pw)
	go func() {
		err := mw.WriteField("name", name)
		if err == nil {
			var part io.Writer
			if part, err = mw.CreateFormFile("file", filepath.Base(path)); err == nil {
				_, err = io.Copy(part, f)
			}
		}
		if err == nil {
			err = mw.Close()
		}
		pw.CloseWithError(err)
	}()
	req, _ := http.NewRequestWithContext(ctx, "POST", b.url+"/bundles/push", pr)
	req.Header.Set("Authorization", "Bearer "+b.key)
	req.Header.Set("Content-Type", mw.FormDataContentType())
	resp, err := b.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusCreated {
		return errors.New("POST /bundles/push: " + resp.Status + " " + string(bytes.TrimSpace(data)))
	}
	return nil
}
