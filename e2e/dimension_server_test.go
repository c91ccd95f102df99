package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hyphae-run/hyphae/dimension/events"
	"github.com/hyphae-run/hyphae/dimension/sse"
	"github.com/hyphae-run/hyphae/internal/testenv"
	"github.com/hyphae-run/hyphae/vmm/vmmproc"
)

// Bounds of the dimension end-to-end test's waits. Under TCG a boot takes
// a few seconds; these only keep a broken gateway from hanging the test.
const (
	dimRequestTimeout = 3 * time.Minute
	dimStartTimeout   = 1 * time.Minute
	dimStopTimeout    = 2 * time.Minute
)

// dimBins holds the statically built binaries the dimension test needs:
// the guest's hyphae-init and dimension-agent (HYPHAE_LIBEXEC points here),
// dimension-server, and the two Go bundles.
type dimBins struct {
	dir                   string
	server, echoGo, dimbd string
}

var (
	dimBinsOnce sync.Once
	dimBinsVal  dimBins
	dimBinsErr  error
)

// dimBinaries builds dimBins once per test binary, under the shared e2e
// temp root (which TestMain removes).
func dimBinaries(t *testing.T, e *env) dimBins {
	t.Helper()
	dimBinsOnce.Do(func() {
		root := testenv.ModuleRoot(t)
		dir := filepath.Join(e.dir, "dimbin")
		build := func(out, pkgDir string, pkgs ...string) error {
			cmd := exec.Command("go", append([]string{"build", "-trimpath", "-o", out}, pkgs...)...)
			cmd.Dir = pkgDir
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
			if b, err := cmd.CombinedOutput(); err != nil {
				return fmt.Errorf("go build %v: %v\n%s", pkgs, err, b)
			}
			return nil
		}
		b := dimBins{dir: dir, server: filepath.Join(dir, "dimension-server"),
			echoGo: filepath.Join(e.dir, "bundles", "echo-go"), dimbd: filepath.Join(e.dir, "bundles", "dimbundle")}
		if dimBinsErr = build(dir+"/", root, "./cmd/hyphae-init", "./cmd/dimension-agent", "./cmd/dimension-server"); dimBinsErr != nil {
			return
		}
		if dimBinsErr = build(b.echoGo, filepath.Join(root, "examples", "echo-go"), "."); dimBinsErr != nil {
			return
		}
		if dimBinsErr = build(b.dimbd, root, "./e2e/testdata/dimbundle"); dimBinsErr != nil {
			return
		}
		dimBinsVal = b
	})
	if dimBinsErr != nil {
		t.Fatal(dimBinsErr)
	}
	return dimBinsVal
}

// dimServer is a dimension-server subprocess and an HTTP client of it.
type dimServer struct {
	t                *testing.T
	url, token       string
	dir, data, rtDir string
	cmd              *exec.Cmd
	exited           chan struct{}
	waitErr          error
	log              *lockedLog
}

// lockedLog collects the server's stderr for failure messages.
type lockedLog struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *lockedLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *lockedLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// listeningRE finds the address in the "dimension-server listening" log
// line (the server listens on port 0: the kernel picks a free one).
var listeningRE = regexp.MustCompile(`msg="dimension-server listening" addr=(127\.0\.0\.1:\d+)`)

// startDimension starts dimension-server on 127.0.0.1 with a random free
// port, its data and runtime dirs in a fresh directory under the e2e temp
// root, and waits until /health answers. The server is stopped (SIGTERM,
// then SIGKILL) when the test ends, if the test did not stop it.
func startDimension(t *testing.T, e *env, bins dimBins, kernel string) *dimServer {
	t.Helper()
	dir, err := os.MkdirTemp(e.dir, "dim")
	if err != nil {
		t.Fatal(err)
	}
	s := &dimServer{t: t, token: "e2e-token-" + strconv.FormatInt(time.Now().UnixNano(), 36), dir: dir,
		data: filepath.Join(dir, "data"), rtDir: filepath.Join(dir, "vms"), exited: make(chan struct{}), log: &lockedLog{}}
	if err := os.Mkdir(s.rtDir, 0o700); err != nil {
		t.Fatal(err)
	}
	var env []string
	for _, kv := range os.Environ() {
		// Nothing of the caller's dimension configuration leaks in.
		if !strings.HasPrefix(kv, "DIMENSION_") {
			env = append(env, kv)
		}
	}
	env = append(env,
		"DIMENSION_HOST=127.0.0.1", "DIMENSION_PORT=0",
		"DIMENSION_DATA_DIR="+s.data, "DIMENSION_KERNEL_PATH="+kernel, "DIMENSION_TOKEN="+s.token,
		"DIMENSION_DRAIN_TIMEOUT_SECS=20", "DIMENSION_WORKER_ID=e2e-worker",
		"HYPHAE_LIBEXEC="+bins.dir, vmmproc.EnvRuntimeDir+"="+s.rtDir)
	s.cmd = exec.Command(bins.server)
	s.cmd.Env = env
	s.cmd.Dir = dir
	stderr, err := s.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	s.cmd.Stdout = s.log
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	addr := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			s.log.Write([]byte(line + "\n"))
			if m := listeningRE.FindStringSubmatch(line); m != nil {
				select {
				case addr <- m[1]:
				default:
				}
			}
		}
		_, _ = io.Copy(s.log, stderr)
	}()
	go func() {
		s.waitErr = s.cmd.Wait()
		close(s.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-s.exited:
		default:
			_ = s.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-s.exited:
			case <-time.After(dimStopTimeout):
				_ = s.cmd.Process.Kill()
				<-s.exited
			}
		}
		if t.Failed() {
			t.Logf("dimension-server log:\n%s", s.log.String())
		}
	})
	select {
	case a := <-addr:
		s.url = "http://" + a
	case <-s.exited:
		t.Fatalf("dimension-server exited at start (%v):\n%s", s.waitErr, s.log.String())
	case <-time.After(dimStartTimeout):
		t.Fatalf("dimension-server did not start listening within %s:\n%s", dimStartTimeout, s.log.String())
	}
	var h healthBody
	s.get("/health", http.StatusOK, &h)
	if h.Status != "ok" || h.Mock || h.RunningVMs != 0 {
		t.Fatalf("health at start = %+v, want ok, not mock, nothing running", h)
	}
	return s
}

// healthBody is GET /health's answer.
type healthBody struct {
	Status     string `json:"status"`
	Version    string `json:"version"`
	RunningVMs int    `json:"running_vms"`
	Mock       bool   `json:"mock"`
	WorkerID   string `json:"worker_id"`
}

// stop sends SIGTERM and waits for a clean exit.
func (s *dimServer) stop() {
	s.t.Helper()
	if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		s.t.Fatal(err)
	}
	select {
	case <-s.exited:
	case <-time.After(dimStopTimeout):
		s.t.Fatalf("dimension-server did not exit within %s of SIGTERM", dimStopTimeout)
	}
	if s.waitErr != nil {
		s.t.Errorf("dimension-server exited with %v after SIGTERM", s.waitErr)
	}
}

// reply is an HTTP answer read whole.
type reply struct {
	status int
	header http.Header
	body   []byte
}

// do sends a request with the admin token and reads the whole answer.
func (s *dimServer) do(method, path, contentType string, body io.Reader) reply {
	s.t.Helper()
	return s.doAs(s.token, method, path, contentType, body)
}

// doAs sends a request with token and reads the whole answer.
func (s *dimServer) doAs(token, method, path, contentType string, body io.Reader) reply {
	s.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), dimRequestTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, s.url+path, body)
	if err != nil {
		s.t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		s.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		s.t.Fatalf("%s %s: reading the answer: %v", method, path, err)
	}
	return reply{status: resp.StatusCode, header: resp.Header, body: b}
}

// expect checks the status and decodes the JSON body into out (when not
// nil).
func (r reply) expect(t *testing.T, what string, status int, out any) {
	t.Helper()
	if r.status != status {
		t.Fatalf("%s: status %d, want %d: %s", what, r.status, status, r.body)
	}
	if out != nil {
		if err := json.Unmarshal(r.body, out); err != nil {
			t.Fatalf("%s: %v in %s", what, err, r.body)
		}
	}
}

func (s *dimServer) get(path string, status int, out any) {
	s.t.Helper()
	s.do("GET", path, "", nil).expect(s.t, "GET "+path, status, out)
}

// postJSON posts v as JSON.
func (s *dimServer) postJSON(path string, v any) reply {
	s.t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		s.t.Fatal(err)
	}
	return s.do("POST", path, "application/json", bytes.NewReader(b))
}

// postFile posts a multipart form with text fields and one file part,
// streamed from disk (a pushed image is 150 MB).
func (s *dimServer) postFile(path string, fields map[string]string, fileField, file string) reply {
	s.t.Helper()
	pr, pw := io.Pipe()
	mw := multipart.NewWriter(pw)
	go func() {
		err := func() error {
			for k, v := range fields {
				if err := mw.WriteField(k, v); err != nil {
					return err
				}
			}
			w, err := mw.CreateFormFile(fileField, filepath.Base(file))
			if err != nil {
				return err
			}
			f, err := os.Open(file)
			if err != nil {
				return err
			}
			defer f.Close()
			if _, err := io.Copy(w, f); err != nil {
				return err
			}
			return mw.Close()
		}()
		pw.CloseWithError(err)
	}()
	return s.do("POST", path, mw.FormDataContentType(), pr)
}

// bundleBody is a bundle as the API shows it.
type bundleBody struct {
	ID          string `json:"id"`
	Name        string `json:"name"`
	Tag         string `json:"tag"`
	ImageDigest string `json:"image_digest"`
}

// runAccepted is an async POST /run's 202 body.
type runAccepted struct {
	InvocationID string `json:"invocation_id"`
	Status       string `json:"status"`
	EventsURL    string `json:"events_url"`
}

// runResult is a sync POST /run's 200 body (and a 504's details).
type runResult struct {
	InvocationID string `json:"invocation_id"`
	Status       string `json:"status"`
	Stdout       string `json:"stdout"`
	ExitCode     int    `json:"exit_code"`
	DurationMs   int64  `json:"duration_ms"`
	Reason       string `json:"reason"`
	EventsURL    string `json:"events_url"`
}

// invocationBody is GET /invocations/{id}'s answer.
type invocationBody struct {
	ID         string `json:"id"`
	BundleID   string `json:"bundle_id"`
	Mode       string `json:"mode"`
	Status     string `json:"status"`
	ExitCode   *int   `json:"exit_code"`
	DurationMs *int64 `json:"duration_ms"`
}

// startAsync posts an async run and returns its invocation id.
func (s *dimServer) startAsync(bundle string, payload any) string {
	s.t.Helper()
	var acc runAccepted
	s.postJSON("/run", map[string]any{"bundle_id": bundle, "mode": "async", "payload": payload}).
		expect(s.t, "POST /run async "+bundle, http.StatusAccepted, &acc)
	if acc.InvocationID == "" || acc.Status != "pending" || acc.EventsURL != "/runs/"+acc.InvocationID+"/events" {
		s.t.Fatalf("async run accepted as %+v", acc)
	}
	return acc.InvocationID
}

// sseFrame is one event of a stream: the frame as sent and its parsed
// data.
type sseFrame struct {
	sse.Frame
	ev events.Event
}

// sseStream is an open GET /runs/{id}/events.
type sseStream struct {
	t      *testing.T
	resp   *http.Response
	rd     *sse.Reader
	cancel context.CancelFunc
}

// openEvents opens a run's event stream, resuming after lastID when it is
// not empty. Every read is bounded by dimRequestTimeout from the open.
// eventsRequest is GET /runs/{id}/events after lastID ("" for all).
func (s *dimServer) eventsRequest(t *testing.T, ctx context.Context, id, lastID string) *http.Request {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, "GET", s.url+"/runs/"+id+"/events", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+s.token)
	if lastID != "" {
		req.Header.Set("Last-Event-ID", lastID)
	}
	return req
}

// eventsStatus returns the status of GET /runs/{id}/events after lastID,
// without reading the stream.
func (s *dimServer) eventsStatus(t *testing.T, id, lastID string) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), dimRequestTimeout)
	defer cancel()
	resp, err := http.DefaultClient.Do(s.eventsRequest(t, ctx, id, lastID))
	if err != nil {
		t.Fatalf("GET events of %s: %v", id, err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

func (s *dimServer) openEvents(t *testing.T, id, lastID string) *sseStream {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), dimRequestTimeout)
	resp, err := http.DefaultClient.Do(s.eventsRequest(t, ctx, id, lastID))
	if err != nil {
		cancel()
		t.Fatalf("GET events of %s: %v", id, err)
	}
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		cancel()
		t.Fatalf("GET events of %s: status %d, %s: %s", id, resp.StatusCode, resp.Header.Get("Content-Type"), b)
	}
	st := &sseStream{t: t, resp: resp, rd: sse.NewReader(resp.Body), cancel: cancel}
	t.Cleanup(st.close)
	return st
}

func (st *sseStream) close() {
	st.cancel()
	st.resp.Body.Close()
}

// next returns the next event, skipping comments (heartbeats); io.EOF at
// the stream's end. Malformed ids or data fail the test.
func (st *sseStream) next() (sseFrame, error) {
	for {
		f, err := st.rd.Next()
		if err != nil {
			return sseFrame{}, err
		}
		if f.IsComment() {
			continue
		}
		seq, err := strconv.ParseUint(f.ID, 10, 64)
		if err != nil {
			return sseFrame{}, fmt.Errorf("event id %q: %v", f.ID, err)
		}
		ev, err := events.ParseData(seq, f.Event, []byte(f.Data))
		if err != nil {
			return sseFrame{}, fmt.Errorf("event %s data %q: %v", f.ID, f.Data, err)
		}
		return sseFrame{Frame: f, ev: ev}, nil
	}
}

// until reads events up to and including the first that match accepts.
func (st *sseStream) until(match func(sseFrame) bool) []sseFrame {
	st.t.Helper()
	var got []sseFrame
	for {
		f, err := st.next()
		if err != nil {
			st.t.Fatalf("stream ended (%v) before the awaited event; got %v", err, labelsOf(got))
		}
		got = append(got, f)
		if match(f) {
			return got
		}
	}
}

// rest reads events until the stream ends, failing the test unless it
// ends cleanly right after a completed event (see readAll).
func (st *sseStream) rest() []sseFrame {
	st.t.Helper()
	got, err := st.readAll()
	if err != nil {
		st.t.Fatal(err)
	}
	return got
}

// readAll reads events until the stream ends. Unless the stream ends
// cleanly (io.EOF), right after a completed event when any event came, it
// returns an error. It does not touch the test, so any goroutine may call
// it.
func (st *sseStream) readAll() ([]sseFrame, error) {
	var got []sseFrame
	for {
		f, err := st.next()
		if err == io.EOF {
			if len(got) > 0 && !got[len(got)-1].ev.IsCompleted() {
				return got, fmt.Errorf("stream ended after %v, not after a completed event", tail(labelsOf(got), 5))
			}
			return got, nil
		}
		if err != nil {
			return got, fmt.Errorf("reading the stream after %d events (%v): %v", len(got), tail(labelsOf(got), 5), err)
		}
		if len(got) > 0 && got[len(got)-1].ev.IsCompleted() {
			return got, fmt.Errorf("event %s %s came after the completed event", f.ID, f.Event)
		}
		got = append(got, f)
	}
}

// label is an event's kind, or "state:<phase>" for state events.
func label(f sseFrame) string {
	if f.ev.Kind == events.KindState {
		var b struct {
			Phase string `json:"phase"`
		}
		_ = json.Unmarshal(f.ev.Body, &b)
		return "state:" + b.Phase
	}
	return f.ev.Kind
}

func labelsOf(fs []sseFrame) []string {
	out := make([]string, len(fs))
	for i, f := range fs {
		out[i] = label(f)
	}
	return out
}

func tail(s []string, n int) []string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// stateBody decodes a state event's body.
type stateBody struct {
	Phase      string `json:"phase"`
	Status     string `json:"status"`
	ExitCode   *int   `json:"exit_code"`
	DurationMs *int64 `json:"duration_ms"`
	Reason     string `json:"reason"`
	VMM        string `json:"vmm"`
	Mock       *bool  `json:"mock"`
}

func stateOf(t *testing.T, f sseFrame) stateBody {
	t.Helper()
	var b stateBody
	if err := json.Unmarshal(f.ev.Body, &b); err != nil {
		t.Fatalf("state event %s body %s: %v", f.ID, f.ev.Body, err)
	}
	return b
}

// checkIDs checks that the frames' ids are first, first+1, … (one
// increasing sequence without gaps) and that each belongs to run.
func checkIDs(t *testing.T, fs []sseFrame, first uint64, run string) {
	t.Helper()
	for i, f := range fs {
		if f.ev.Seq != first+uint64(i) {
			t.Fatalf("event %d has id %d, want %d (ids %v…)", i, f.ev.Seq, first+uint64(i), idsOf(fs[:min(len(fs), 20)]))
		}
		if f.ev.RunID != run {
			t.Fatalf("event %d run_id %q, want %q", f.ev.Seq, f.ev.RunID, run)
		}
	}
}

func idsOf(fs []sseFrame) []string {
	out := make([]string, len(fs))
	for i, f := range fs {
		out[i] = f.ID
	}
	return out
}

// sameFrames fails unless a and b are the same events, frame for frame
// (id, event name and data bytes).
func sameFrames(t *testing.T, what string, got, want []sseFrame) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d events %v, want %d %v", what, len(got), idsOf(got), len(want), idsOf(want))
	}
	for i := range got {
		if got[i].Frame != want[i].Frame {
			t.Fatalf("%s: event %d differs:\n got %+v\nwant %+v", what, i, got[i].Frame, want[i].Frame)
		}
	}
}

// dirsIn lists the directories directly in dir.
func dirsIn(dir string) []string {
	var out []string
	entries, _ := os.ReadDir(dir)
	for _, d := range entries {
		if d.IsDir() {
			out = append(out, filepath.Join(dir, d.Name()))
		}
	}
	return out
}

// health asks GET /health once, within a short bound. It does not touch
// the test, so any goroutine may call it.
func (s *dimServer) health() (healthBody, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var h healthBody
	req, err := http.NewRequestWithContext(ctx, "GET", s.url+"/health", nil)
	if err != nil {
		return h, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return h, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return h, err
	}
	if resp.StatusCode != http.StatusOK {
		return h, fmt.Errorf("/health: status %d: %s", resp.StatusCode, b)
	}
	if err := json.Unmarshal(b, &h); err != nil || h.Status != "ok" {
		return h, fmt.Errorf("/health answered %s (%v)", b, err)
	}
	return h, nil
}
