// Command gateway is the gateway's load benchmark (not a test): it builds
// the real dimension-server, starts it as a separate process in mock mode
// (bundles as host processes under the real agent) on a free 127.0.0.1
// port with its own data dir, pushes a bundle to it and drives it over
// HTTP. It prints
//
//   - runs per second (sync POST /run at a fixed concurrency),
//   - p50/p99 from POST /run (async) to the first SSE event,
//   - SSE events per second delivered to S concurrent subscribers of one run,
//   - the gateway process's RSS (from /proc/<pid>/status, so the bench's
//     clients are not counted) with R concurrent runs and S subscribers.
//
// The first three are each next to a baseline measured in the same run
// without HTTP (a runner and an event log of the same kinds called
// directly in the bench process), so the ratio is the gateway's own cost
// on this machine; the RSS is next to the gateway's own RSS before the
// load. Every phase is bounded in count and by -timeout.
//
//	go run ./bench/gateway [-runs 200] [-concurrency 8] [-latency-runs 100]
//	    [-subscribers 100] [-events 2000] [-concurrent-runs 200] [-timeout 10m]
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hyphae-run/hyphae/dimension/events"
	"github.com/hyphae-run/hyphae/dimension/runner"
	"github.com/hyphae-run/hyphae/dimension/sse"
	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/dimension/store/sqlite"
	"github.com/hyphae-run/hyphae/guestbin"
	"github.com/hyphae-run/hyphae/image"
	"github.com/hyphae-run/hyphae/registry"
)

type flags struct {
	runs, concurrency, latencyRuns, subscribers, events, concurrentRuns int
	timeout                                                             time.Duration
}

func main() {
	var f flags
	flag.IntVar(&f.runs, "runs", 200, "sync runs for the runs-per-second figure")
	flag.IntVar(&f.concurrency, "concurrency", 8, "clients issuing those runs at once")
	flag.IntVar(&f.latencyRuns, "latency-runs", 100, "async runs for the POST-to-first-event latency (one at a time)")
	flag.IntVar(&f.subscribers, "subscribers", 100, "SSE subscribers of the fan-out run and of the RSS phase")
	flag.IntVar(&f.events, "events", 2000, "events the fan-out run emits")
	flag.IntVar(&f.concurrentRuns, "concurrent-runs", 200, "runs held in progress at once for the RSS figure")
	flag.DurationVar(&f.timeout, "timeout", 10*time.Minute, "bound on the whole benchmark")
	flag.Parse()
	ctx, cancel := context.WithTimeout(context.Background(), f.timeout)
	defer cancel()
	if err := run(ctx, f); err != nil {
		fmt.Fprintln(os.Stderr, "bench/gateway:", err)
		os.Exit(1)
	}
}

// bench is the gateway under load (a separate process, reached at url
// with the bearer token key) and what the baselines use directly.
type bench struct {
	f      flags
	gw     *gatewayProc
	url    string
	key    string
	owner  string // of the baselines' invocations
	bundle store.Bundle
	image  string
	st     store.Store
	log    *events.Log
	run    *runner.Runner
	client *http.Client
	tmp    string
}

func run(ctx context.Context, f flags) error {
	b, cleanup, err := setup(ctx, f)
	if cleanup != nil {
		defer cleanup()
	}
	if err != nil {
		return err
	}
	fmt.Printf("gateway load benchmark (dimension-server pid %d, mock mode, %d CPUs, %s)\n\n", b.gw.cmd.Process.Pid, runtime.NumCPU(), runtime.Version())

	base, gw, err := b.throughput(ctx)
	if err != nil {
		return err
	}
	fmt.Printf("runs/s (%d sync runs, %d at a time):   gateway %7.1f   runner alone %7.1f   ratio %.2f\n",
		f.runs, f.concurrency, gw, base, gw/base)

	bl, gl, err := b.firstEventLatency(ctx)
	if err != nil {
		return err
	}
	fmt.Printf("POST /run → first SSE event (%d runs):  gateway p50 %6.1f ms p99 %6.1f ms   runner+log p50 %6.1f ms p99 %6.1f ms   p50 ratio %.2f\n",
		f.latencyRuns, ms(pct(gl, 50)), ms(pct(gl, 99)), ms(pct(bl, 50)), ms(pct(bl, 99)), float64(pct(gl, 50))/float64(pct(bl, 50)))

	bf, gf, err := b.fanOut(ctx)
	if err != nil {
		return err
	}
	fmt.Printf("SSE events/s to %d subscribers of one run (%d events): gateway %9.0f   log subscriptions %9.0f   ratio %.2f\n",
		f.subscribers, f.events, gf, bf, gf/bf)

	before, loaded, peak, err := b.memory(ctx)
	if err != nil {
		return err
	}
	fmt.Printf("gateway process RSS (pid %d, VmRSS/VmHWM): before %s   with %d runs + %d SSE subscribers %s (peak %s)   ratio %.2f   (aim: under 200 MB)\n",
		b.gw.cmd.Process.Pid, mib(before), f.concurrentRuns, f.subscribers, mib(loaded), mib(peak), float64(loaded)/float64(before))
	return nil
}

// setup builds the guest binaries, the behaviour bundle and
// dimension-server; imports the bundle into the baselines' registry and
// store; starts the gateway process and pushes the bundle's image to it.
func setup(ctx context.Context, f flags) (*bench, func(), error) {
	tmp, err := os.MkdirTemp("", "bench-gateway-")
	if err != nil {
		return nil, nil, err
	}
	var closers []func()
	cleanup := func() {
		for i := len(closers) - 1; i >= 0; i-- {
			closers[i]()
		}
		os.RemoveAll(tmp)
	}
	root, err := moduleRoot()
	if err != nil {
		return nil, cleanup, err
	}
	libexec := filepath.Join(tmp, "libexec")
	for _, p := range [][2]string{
		{filepath.Join(libexec, "hyphae-init"), "./cmd/hyphae-init"},
		{filepath.Join(libexec, "dimension-agent"), "./cmd/dimension-agent"},
		{filepath.Join(tmp, "bundle"), "./dimension/gateway/testdata/bundle"},
		{filepath.Join(tmp, "bin", "dimension-server"), "./cmd/dimension-server"},
	} {
		cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-o", p[0], p[1])
		cmd.Dir, cmd.Env = root, append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			return nil, cleanup, fmt.Errorf("go build %s: %v\n%s", p[1], err, out)
		}
	}
	os.Setenv(guestbin.EnvLibexec, libexec)

	quiet := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))
	st, err := sqlite.Open(ctx, filepath.Join(tmp, "dimension.db"), quiet)
	if err != nil {
		return nil, cleanup, err
	}
	closers = append(closers, func() { st.Close() })
	// The baselines' invocations need an owner.
	if _, _, err := st.EnsureBootstrapAdmin(ctx); err != nil {
		return nil, cleanup, err
	}
	owner, err := st.GetUserByName(ctx, store.BootstrapAdminName)
	if err != nil {
		return nil, cleanup, err
	}
	evlog, err := events.Open(ctx, events.Options{StoreDir: filepath.Join(tmp, "nats"), Logger: quiet})
	if err != nil {
		return nil, cleanup, err
	}
	closers = append(closers, func() { evlog.Close() })
	reg, err := registry.Open(ctx, filepath.Join(tmp, "hyphae"), quiet)
	if err != nil {
		return nil, cleanup, err
	}
	closers = append(closers, func() { reg.Close() })
	builder := image.Builder{Store: reg, Logger: quiet}
	res, err := builder.Build(ctx, image.BuildOptions{Binary: filepath.Join(tmp, "bundle"), Name: "bundle", WithAgent: true})
	if err != nil {
		return nil, cleanup, err
	}
	bundle, err := st.PutBundle(ctx, store.Bundle{Owner: owner.ID, Name: "bundle", Tag: "latest", ImageDigest: res.Digest, SizeBytes: res.SizeBytes})
	if err != nil {
		return nil, cleanup, err
	}
	backend, err := runner.NewMockBackend(runner.MockOptions{WorkDir: filepath.Join(tmp, "mock"), Logger: quiet})
	if err != nil {
		return nil, cleanup, err
	}
	closers = append(closers, func() { backend.Close() })
	permits := max(f.concurrentRuns, f.concurrency) + 8
	rn, err := runner.New(runner.Options{Backend: backend, Events: evlog, Store: st, MaxConcurrent: permits, WorkerID: "bench", Logger: quiet})
	if err != nil {
		return nil, cleanup, err
	}
	closers = append(closers, func() {
		dctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		rn.Drain(dctx)
	})
	gw, err := startGateway(ctx, filepath.Join(tmp, "bin", "dimension-server"), filepath.Join(tmp, "gateway"), libexec, permits)
	if err != nil {
		return nil, cleanup, err
	}
	closers = append(closers, gw.stop)
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 512, MaxConnsPerHost: 0}}
	b := &bench{
		f: f, gw: gw, url: gw.url, key: gw.token, owner: owner.ID, bundle: bundle,
		image: reg.ImagePath(res.Digest), st: st, log: evlog, run: rn, client: client, tmp: tmp,
	}
	if err := b.pushBundle(ctx, "bundle", b.image); err != nil {
		return nil, cleanup, err
	}
	// One warm-up run on each side unpacks the image for its mock
	// backend, so no phase pays for it.
	if _, err := b.postRun(ctx, "sync", map[string]any{"mode": "exit"}); err != nil {
		return nil, cleanup, fmt.Errorf("warm-up run: %w", err)
	}
	if _, out, err := b.directRun(ctx, `{"mode":"exit"}`); err != nil || out.Status != runner.StatusCompleted {
		return nil, cleanup, fmt.Errorf("direct warm-up run: %v %s %v", err, out.Status, out.Err)
	}
	return b, cleanup, nil
}

func moduleRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", err
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", errors.New("run from inside the hyphae module (go run ./bench/gateway)")
	}
	return filepath.Dir(mod), nil
}

// postRun issues POST /run and returns the invocation id.
func (b *bench) postRun(ctx context.Context, mode string, payload any) (string, error) {
	body, _ := json.Marshal(map[string]any{"bundle_id": "bundle", "mode": mode, "payload": payload})
	req, _ := http.NewRequestWithContext(ctx, "POST", b.url+"/run", strings.NewReader(string(body)))
	req.Header.Set("Authorization", "Bearer "+b.key)
	req.Header.Set("Content-Type", "application/json")
	resp, err := b.client.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusAccepted {
		return "", fmt.Errorf("POST /run: %d %s", resp.StatusCode, data)
	}
	var out struct {
		InvocationID string `json:"invocation_id"`
		Status       string `json:"status"`
	}
	if err := json.Unmarshal(data, &out); err != nil {
		return "", err
	}
	if mode == "sync" && out.Status != runner.StatusCompleted {
		return "", fmt.Errorf("sync run ended %s: %s", out.Status, data)
	}
	return out.InvocationID, nil
}

// openEvents opens a run's SSE stream.
func (b *bench) openEvents(ctx context.Context, id string) (*http.Response, *sse.Reader, error) {
	req, _ := http.NewRequestWithContext(ctx, "GET", b.url+"/runs/"+id+"/events", nil)
	req.Header.Set("Authorization", "Bearer "+b.key)
	resp, err := b.client.Do(req)
	if err != nil {
		return nil, nil, err
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		return nil, nil, fmt.Errorf("GET events: %d", resp.StatusCode)
	}
	return resp, sse.NewReader(bufio.NewReaderSize(resp.Body, 64<<10)), nil
}

// nextEvent returns the next non-comment frame.
func nextEvent(rd *sse.Reader) (sse.Frame, error) {
	for {
		f, err := rd.Next()
		if err != nil || !f.IsComment() {
			return f, err
		}
	}
}

// directRun runs the bundle through the runner alone, as the gateway
// would, without HTTP.
func (b *bench) directRun(ctx context.Context, payload string) (string, runner.Outcome, error) {
	id, err := b.createInvocation(ctx, store.ModeSync)
	if err != nil {
		return "", runner.Outcome{}, err
	}
	p, err := b.run.Acquire()
	if err != nil {
		return "", runner.Outcome{}, err
	}
	return id, b.run.Run(ctx, p, b.directRequest(id, payload)), nil
}

// createInvocation records a baseline run in the bench's own store, as
// POST /run does in the gateway's.
func (b *bench) createInvocation(ctx context.Context, mode store.Mode) (string, error) {
	inv, err := b.st.CreateInvocation(ctx, store.Invocation{Owner: b.owner, BundleID: b.bundle.ID, BundleRef: b.bundle.Ref(), Mode: mode, WorkerID: "bench"})
	return inv.ID, err
}

func (b *bench) directRequest(id, payload string) runner.Request {
	return runner.Request{RunID: id, UserID: b.owner, BundleID: b.bundle.ID, BundleRef: b.bundle.Ref(),
		ImagePath: b.image, Payload: json.RawMessage(payload)}
}

// startDirect starts invocation id on the bench's runner in the
// background, as an async POST /run does; done closes when it has ended.
func (b *bench) startDirect(ctx context.Context, id, payload string) (done <-chan struct{}, err error) {
	p, err := b.run.Acquire()
	if err != nil {
		return nil, err
	}
	ch := make(chan struct{})
	go func() {
		defer close(ch)
		b.run.Run(context.WithoutCancel(ctx), p, b.directRequest(id, payload))
	}()
	return ch, nil
}

// parallel runs fn n times, c at a time, and returns the elapsed time.
func parallel(ctx context.Context, n, c int, fn func(context.Context) error) (time.Duration, error) {
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, c)
	start := time.Now()
	for range c {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(n) {
				if err := fn(ctx); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	return time.Since(start), <-errs
}

func (b *bench) throughput(ctx context.Context) (base, gw float64, err error) {
	d, err := parallel(ctx, b.f.runs, b.f.concurrency, func(ctx context.Context) error {
		_, out, err := b.directRun(ctx, `{"mode":"exit"}`)
		if err == nil && out.Status != runner.StatusCompleted {
			err = fmt.Errorf("direct run ended %s (%s): %v", out.Status, out.Reason, out.Err)
		}
		return err
	})
	if err != nil {
		return 0, 0, err
	}
	base = float64(b.f.runs) / d.Seconds()
	d, err = parallel(ctx, b.f.runs, b.f.concurrency, func(ctx context.Context) error {
		_, err := b.postRun(ctx, "sync", map[string]any{"mode": "exit"})
		return err
	})
	if err != nil {
		return 0, 0, err
	}
	return base, float64(b.f.runs) / d.Seconds(), nil
}

// firstEventLatency measures, one run at a time, from the start of a run
// to the first event its reader receives: over HTTP (POST /run async, then
// GET /runs/{id}/events) and directly (runner.Run started, log
// subscription).
func (b *bench) firstEventLatency(ctx context.Context) (base, gw []time.Duration, err error) {
	for range b.f.latencyRuns {
		t0 := time.Now()
		id, err := b.postRun(ctx, "async", map[string]any{"mode": "exit"})
		if err != nil {
			return nil, nil, err
		}
		resp, rd, err := b.openEvents(ctx, id)
		if err != nil {
			return nil, nil, err
		}
		if _, err := nextEvent(rd); err != nil {
			resp.Body.Close()
			return nil, nil, err
		}
		gw = append(gw, time.Since(t0))
		_, _ = io.Copy(io.Discard, resp.Body) // to the end of the run
		resp.Body.Close()
	}
	for range b.f.latencyRuns {
		id, err := b.createInvocation(ctx, store.ModeAsync)
		if err != nil {
			return nil, nil, err
		}
		t0 := time.Now()
		done, err := b.startDirect(ctx, id, `{"mode":"exit"}`)
		if err != nil {
			return nil, nil, err
		}
		sub, err := b.log.Subscribe(ctx, id, 0)
		if err != nil {
			return nil, nil, err
		}
		if _, ok := <-sub.Events(); !ok {
			return nil, nil, fmt.Errorf("direct subscription ended: %v", sub.Err())
		}
		base = append(base, time.Since(t0))
		sub.Close()
		<-done
	}
	return base, gw, nil
}

// fanOut measures delivery of one run's events to many readers at once:
// the run waits at a gate until every reader is live, then emits
// f.events events; the figure is events delivered (summed over readers)
// per second from the gate's release until the last reader got completed.
func (b *bench) fanOut(ctx context.Context) (base, gw float64, err error) {
	viaHTTP := func(ctx context.Context, payload map[string]any) (string, error) {
		return b.postRun(ctx, "async", payload)
	}
	gwRate, err := b.fanOutOnce(ctx, "http", viaHTTP, func(ctx context.Context, id string, live chan<- struct{}) (int, error) {
		resp, rd, err := b.openEvents(ctx, id)
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		n := 0
		for {
			f, err := nextEvent(rd)
			if err == io.EOF {
				return n, nil
			}
			if err != nil {
				return n, err
			}
			n++
			if f.Event == "tick" && f.Data != "" && n == 5 { // started, payload_delivered, ticks 1..3
				live <- struct{}{}
			}
		}
	})
	if err != nil {
		return 0, 0, err
	}
	// The baseline's run goes through the bench's runner and event log,
	// which are not the gateway's.
	var done <-chan struct{}
	direct := func(ctx context.Context, payload map[string]any) (string, error) {
		id, err := b.createInvocation(ctx, store.ModeAsync)
		if err != nil {
			return "", err
		}
		body, _ := json.Marshal(payload)
		done, err = b.startDirect(ctx, id, string(body))
		return id, err
	}
	baseRate, err := b.fanOutOnce(ctx, "log", direct, func(ctx context.Context, id string, live chan<- struct{}) (int, error) {
		sub, err := b.log.Subscribe(ctx, id, 0)
		if err != nil {
			return 0, err
		}
		defer sub.Close()
		n := 0
		for range sub.Events() {
			n++
			if n == 5 {
				live <- struct{}{}
			}
		}
		return n, sub.Err()
	})
	if done != nil {
		<-done
	}
	return baseRate, gwRate, err
}

func (b *bench) fanOutOnce(ctx context.Context, name string,
	start func(context.Context, map[string]any) (string, error),
	read func(context.Context, string, chan<- struct{}) (int, error),
) (float64, error) {
	gate := filepath.Join(b.tmp, "gate-"+name)
	id, err := start(ctx, map[string]any{"mode": "gate", "gate": gate, "n": b.f.events})
	if err != nil {
		return 0, err
	}
	live := make(chan struct{}, b.f.subscribers)
	counts := make(chan int, b.f.subscribers)
	errs := make(chan error, b.f.subscribers)
	for range b.f.subscribers {
		go func() {
			n, err := read(ctx, id, live)
			if err != nil {
				errs <- err
				return
			}
			counts <- n
		}()
	}
	for range b.f.subscribers {
		select {
		case <-live:
		case err := <-errs:
			return 0, err
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
	t0 := time.Now()
	if err := os.WriteFile(gate, nil, 0o644); err != nil {
		return 0, err
	}
	total := 0
	for range b.f.subscribers {
		select {
		case n := <-counts:
			total += n
		case err := <-errs:
			return 0, err
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
	// Only what came after the gate counts.
	delivered := total - 5*b.f.subscribers
	return float64(delivered) / time.Since(t0).Seconds(), nil
}

// memory holds f.concurrentRuns sleeping runs in progress with
// f.subscribers SSE readers on them, and samples the gateway process's
// RSS before, and then with them all in flight (peak: since before); then
// stops them.
func (b *bench) memory(ctx context.Context) (before, loaded, peak int64, err error) {
	if err := b.gw.resetPeak(); err != nil {
		return 0, 0, 0, err
	}
	if before, _, err = b.gw.rss(); err != nil {
		return 0, 0, 0, err
	}
	ids := make([]string, 0, b.f.concurrentRuns)
	for range b.f.concurrentRuns {
		id, err := b.postRun(ctx, "async", map[string]any{"mode": "sleep"})
		if err != nil {
			return 0, 0, 0, err
		}
		ids = append(ids, id)
	}
	var wg sync.WaitGroup
	sleeping := make(chan error, b.f.subscribers)
	for i := range b.f.subscribers {
		id := ids[i%len(ids)]
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, rd, err := b.openEvents(ctx, id)
			if err != nil {
				sleeping <- err
				return
			}
			defer resp.Body.Close()
			signalled := false
			for {
				f, err := nextEvent(rd)
				if err != nil {
					if !signalled {
						sleeping <- err
					}
					return
				}
				if f.Event == "sleeping" && !signalled {
					signalled = true
					sleeping <- nil
				}
			}
		}()
	}
	for range b.f.subscribers {
		if err := <-sleeping; err != nil {
			return 0, 0, 0, err
		}
	}
	// Every run, subscribed or not, is in progress once its row says so.
	for _, id := range ids {
		for {
			var inv store.Invocation
			if err := b.getJSON(ctx, "/invocations/"+id, &inv); err != nil {
				return 0, 0, 0, err
			}
			if inv.Status == store.StatusRunning {
				break
			}
			if inv.Status.Final() {
				return 0, 0, 0, fmt.Errorf("run %s ended %s (%s) before the RSS sample", id, inv.Status, inv.Error)
			}
			select {
			case <-ctx.Done():
				return 0, 0, 0, ctx.Err()
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	if n, err := b.runningVMs(ctx); err != nil || n != len(ids) {
		return 0, 0, 0, fmt.Errorf("gateway reports %d runs in progress (%v), want %d", n, err, len(ids))
	}
	if loaded, peak, err = b.gw.rss(); err != nil {
		return 0, 0, 0, err
	}
	for _, id := range ids {
		req, _ := http.NewRequestWithContext(ctx, "POST", b.url+"/run/"+id+"/stop", nil)
		req.Header.Set("Authorization", "Bearer "+b.key)
		resp, err := b.client.Do(req)
		if err != nil {
			return 0, 0, 0, err
		}
		resp.Body.Close()
	}
	wg.Wait()
	return before, loaded, peak, nil
}

func pct(ds []time.Duration, p int) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	i := (len(s)*p + 99) / 100
	return s[max(0, min(len(s)-1, i-1))]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func mib(n int64) string { return fmt.Sprintf("%.0f MiB", float64(n)/(1<<20)) }
