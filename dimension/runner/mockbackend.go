package runner

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hyphae-run/hyphae/agent"
	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
	"github.com/hyphae-run/hyphae/guestbin"
	"github.com/hyphae-run/hyphae/internal/tailbuf"
)

// MockOptions configure the mock backend.
type MockOptions struct {
	// AgentBinary is the dimension-agent executable ("" =
	// guestbin.Locate("dimension-agent")).
	AgentBinary string
	// WorkDir holds the unpacked images and the runs' directories; ""
	// makes a fresh temporary directory. Close removes what the backend
	// made in it.
	WorkDir string
	// Debugfs is the e2fsprogs debugfs program ("" = "debugfs" on PATH or
	// in /sbin, /usr/sbin).
	Debugfs string
	// Logger receives diagnostics (nil = slog.Default()).
	Logger *slog.Logger
}

// mockKillWait bounds how long Close waits for the agent after closing
// its channel, before it kills it.
const mockKillWait = 3 * time.Second

// MockBackend runs bundles as host processes, for development where no
// VMM exists (DIMENSION_MOCK=true). Each run is the real dimension-agent
// binary, a child of this process, speaking the host↔guest protocol over
// a socketpair (channel fd:3), which runs the bundle's entrypoint: the
// same Request, events socket, stderr lines, stdout-final and Done as in
// a VM, without the VM.
//
// The bundle's files come from its registry image, unpacked once per
// image with debugfs rdump (read-only access; images are immutable, so
// the tree is shared by the image's runs and removed by Close). The
// image's entrypoint, env and workdir are rewritten for the host into a
// per-run hyphae root (the agent's -root): an absolute program or argument
// that names a file of the image, the PATH lookup of a bare program name
// and the working directory point into the unpacked tree; a bare name the
// image lacks is looked up on the host. Symlinks with absolute targets
// resolve on the host, and runs of one image share its tree: mock mode is
// not an isolation boundary, and it trusts its images.
type MockBackend struct {
	opts    MockOptions
	log     *slog.Logger
	agent   string
	debugfs string
	work    string
	ownWork bool

	mu     sync.Mutex
	trees  map[string]*tree // unpacked images by imageKey
	closed bool
}

// tree is one image unpacked (or being unpacked).
type tree struct {
	ready chan struct{}
	dir   string
	err   error
}

var _ Backend = (*MockBackend)(nil)

// NewMockBackend finds the agent and debugfs and prepares the work
// directory.
func NewMockBackend(o MockOptions) (*MockBackend, error) {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	b := &MockBackend{opts: o, log: o.Logger, trees: map[string]*tree{}}
	var err error
	if b.agent = o.AgentBinary; b.agent == "" {
		if b.agent, err = guestbin.Locate("dimension-agent"); err != nil {
			return nil, err
		}
	}
	if b.debugfs, err = findDebugfs(o.Debugfs); err != nil {
		return nil, err
	}
	if b.work = o.WorkDir; b.work == "" {
		if b.work, err = os.MkdirTemp("", "hyphae-mock-"); err != nil {
			return nil, errcode.Wrap(errcode.StagingFailed, err, "creating the mock work directory")
		}
		b.ownWork = true
	} else if err := os.MkdirAll(b.work, 0o700); err != nil {
		return nil, errcode.Wrap(errcode.StagingFailed, err, "creating the mock work directory")
	}
	if strings.ContainsAny(b.work, "\"\n") {
		return nil, errcode.New(errcode.InvalidArgument, "mock work directory %q: quotes and newlines are not supported", b.work)
	}
	return b, nil
}

func findDebugfs(p string) (string, error) {
	cands := []string{p}
	if p == "" {
		cands = []string{"debugfs", "/usr/sbin/debugfs", "/sbin/debugfs"}
	}
	for _, c := range cands {
		if found, err := exec.LookPath(c); err == nil {
			return found, nil
		}
	}
	return "", errcode.New(errcode.MissingTool, "debugfs not found").WithHint("apt-get install e2fsprogs")
}

// Name is "mock".
func (b *MockBackend) Name() string { return "mock" }

// Mock is true.
func (b *MockBackend) Mock() bool { return true }

// Close removes the unpacked images (and the work directory when the
// backend made it). Runs must have ended.
func (b *MockBackend) Close() error {
	b.mu.Lock()
	b.closed = true
	trees := b.trees
	b.trees = map[string]*tree{}
	b.mu.Unlock()
	var errs []error
	for _, t := range trees {
		<-t.ready
		if t.err == nil {
			errs = append(errs, os.RemoveAll(t.dir))
		}
	}
	if b.ownWork {
		errs = append(errs, os.RemoveAll(b.work))
	}
	if err := errors.Join(errs...); err != nil {
		return errcode.Wrap(errcode.StagingFailed, err, "removing the mock work directory")
	}
	return nil
}

// Start unpacks the image (once), writes the run's hyphae root and
// spawns the agent on a socketpair.
func (b *MockBackend) Start(ctx context.Context, req BootRequest) (Session, error) {
	root, err := b.unpack(ctx, req.ImagePath)
	if err != nil {
		return nil, err
	}
	runDir, err := os.MkdirTemp(b.work, "run-")
	if err != nil {
		return nil, errcode.Wrap(errcode.StagingFailed, err, "creating the run directory")
	}
	s := &mockSession{dir: runDir, done: make(chan struct{}), log: b.log.With("run", req.RunID), output: tailbuf.New(consoleTailBytes)}
	fail := func(err error) (Session, error) {
		tail := s.ConsoleTail()
		_ = s.Close()
		if tail != "" {
			err = errcode.Wrap(errcode.BootFailed, err, "the mock agent's output ends:\n%s", tail)
		}
		return nil, err
	}
	if err := writeMockRoot(runDir, root, req); err != nil {
		return fail(err)
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fail(errcode.Wrap(errcode.ChannelFailed, err, "creating the channel socketpair"))
	}
	hostEnd, agentEnd := os.NewFile(uintptr(fds[0]), "channel-host"), os.NewFile(uintptr(fds[1]), "channel-agent")
	defer agentEnd.Close()
	conn, err := net.FileConn(hostEnd)
	hostEnd.Close()
	if err != nil {
		return fail(errcode.Wrap(errcode.ChannelFailed, err, "opening the channel"))
	}
	s.conn = conn
	cmd := exec.Command(b.agent, "-channel", "fd:3", "-root", runDir)
	cmd.Env = []string{
		"PATH=" + os.Getenv("PATH"),
		agent.EnvEventsSocket + "=" + filepath.Join(runDir, "events.sock"),
	}
	cmd.Dir = runDir
	cmd.ExtraFiles = []*os.File{agentEnd}
	cmd.Stdout = s.output
	cmd.Stderr = s.output
	// Its own process group keeps terminal signals meant for the server
	// away; Pdeathsig makes the agent stop its bundle if the server dies.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		return fail(errcode.Wrap(errcode.SpawnFailed, err, "starting %s", b.agent))
	}
	s.cmd = cmd
	go func() {
		_ = cmd.Wait()
		close(s.done)
	}()
	if ctx.Err() != nil {
		return fail(errcode.Wrap(errcode.BootFailed, ctx.Err(), "mock run %s", req.RunID))
	}
	s.log.Debug("mock agent started", "pid", cmd.Process.Pid, "root", root)
	return s, nil
}

// imageKey identifies an image file's content: registry images are
// content-addressed and never rewritten, but a path reused for another
// file must not hit a stale tree.
func imageKey(path string) (string, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return "", errcode.Wrap(errcode.NotFound, err, "image %s", path)
	}
	st, err := os.Stat(abs)
	if err != nil {
		return "", errcode.Wrap(errcode.NotFound, err, "image %s", path)
	}
	if !st.Mode().IsRegular() {
		return "", errcode.New(errcode.InvalidArgument, "image %s is not a regular file", path)
	}
	sys, _ := st.Sys().(*syscall.Stat_t)
	var ino uint64
	if sys != nil {
		ino = sys.Ino
	}
	return strings.Join([]string{abs, st.ModTime().UTC().String(), strconv.FormatInt(st.Size(), 10), strconv.FormatUint(ino, 10)}, "|"), nil
}

// unpack returns the image's unpacked tree, unpacking it on first use.
// Concurrent runs of one image wait for the same unpacking; a failed one
// is not remembered.
func (b *MockBackend) unpack(ctx context.Context, image string) (string, error) {
	key, err := imageKey(image)
	if err != nil {
		return "", err
	}
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return "", errcode.New(errcode.Draining, "the mock backend is closed")
	}
	t, ok := b.trees[key]
	if !ok {
		t = &tree{ready: make(chan struct{})}
		b.trees[key] = t
	}
	b.mu.Unlock()
	if !ok {
		t.dir, t.err = b.rdump(context.WithoutCancel(ctx), image)
		if t.err != nil {
			b.mu.Lock()
			delete(b.trees, key)
			b.mu.Unlock()
		}
		close(t.ready)
	}
	select {
	case <-t.ready:
		return t.dir, t.err
	case <-ctx.Done():
		return "", errcode.Wrap(errcode.Timeout, ctx.Err(), "unpacking image %s", image)
	}
}

// rdumpTimeout bounds one image's unpacking, which is shared by the runs
// waiting for it and so is not bound to any one run's deadline.
const rdumpTimeout = 5 * time.Minute

// rdump unpacks the whole image into a fresh directory.
func (b *MockBackend) rdump(ctx context.Context, image string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, rdumpTimeout)
	defer cancel()
	dir, err := os.MkdirTemp(b.work, "image-")
	if err != nil {
		return "", errcode.Wrap(errcode.StagingFailed, err, "creating a directory for image %s", image)
	}
	start := time.Now()
	out, err := exec.CommandContext(ctx, b.debugfs, "-R", `rdump / "`+dir+`"`, image).CombinedOutput()
	if err == nil {
		_, err = os.Stat(filepath.Join(dir, "etc", "hyphae"))
	}
	if err != nil {
		os.RemoveAll(dir)
		return "", errcode.Wrap(errcode.MalformedArchive, err, "unpacking image %s with debugfs: %s", image, strings.TrimSpace(string(out)))
	}
	b.log.Info("image unpacked for mock runs", "image", image, "dir", dir, "ms", time.Since(start).Milliseconds())
	return dir, nil
}

// writeMockRoot writes the run's hyphae files: the image's program (or the
// manifest's entrypoint) with its paths pointing into the unpacked tree.
func writeMockRoot(runDir, root string, req BootRequest) error {
	prog, err := agent.LoadProgram(root, nil, "")
	if len(req.Entrypoint) > 0 {
		if prog == nil {
			prog, err = &agent.Program{Dir: "/"}, nil
		}
		prog.Argv = req.Entrypoint
	}
	if err != nil {
		return err
	}
	argv := hostArgv(root, prog)
	dir := inTree(root, prog.Dir)
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		dir = root
	}
	ep, err := guest.EncodeEntrypoint(argv)
	if err != nil {
		return err
	}
	env, err := guest.EncodeEnvFile(prog.Env)
	if err != nil {
		return err
	}
	files := map[string][]byte{guest.EntrypointPath: ep, guest.EnvPath: env, guest.WorkdirPath: []byte(dir + "\n")}
	if err := os.MkdirAll(filepath.Join(runDir, filepath.Dir(guest.EntrypointPath)), 0o755); err != nil {
		return errcode.Wrap(errcode.StagingFailed, err, "writing the mock run's hyphae files")
	}
	for p, b := range files {
		if err := os.WriteFile(filepath.Join(runDir, p), b, 0o644); err != nil {
			return errcode.Wrap(errcode.StagingFailed, err, "writing the mock run's hyphae files")
		}
	}
	return nil
}

// hostArgv maps the program and its absolute arguments into the tree.
func hostArgv(root string, prog *agent.Program) []string {
	argv := make([]string, len(prog.Argv))
	for i, a := range prog.Argv {
		argv[i] = a
		if filepath.IsAbs(a) && exists(inTree(root, a)) {
			argv[i] = inTree(root, a)
		}
	}
	if name := argv[0]; name != "" && !strings.Contains(name, "/") {
		path := "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
		for _, v := range prog.Env {
			if v.Key == "PATH" {
				path = v.Value
			}
		}
		for _, d := range filepath.SplitList(path) {
			if c := inTree(root, filepath.Join(d, name)); filepath.IsAbs(d) && isExecutable(c) {
				argv[0] = c
				break
			}
		}
	}
	return argv
}

// inTree is the host path of the image path p.
func inTree(root, p string) string { return filepath.Join(root, filepath.Clean("/"+p)) }

func exists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

func isExecutable(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular() && st.Mode().Perm()&0o111 != 0
}

// mockSession is one agent process.
type mockSession struct {
	dir    string
	log    *slog.Logger
	conn   net.Conn
	cmd    *exec.Cmd
	done   chan struct{} // closed when the agent has exited
	output *tailbuf.Buffer

	once sync.Once
	err  error
}

func (s *mockSession) Conn() io.ReadWriter { return s.conn }

// Stop asks the agent to stop (SIGTERM: it kills the bundle's process
// group and reports Done), then kills it when timeout passes.
func (s *mockSession) Stop(ctx context.Context, timeout time.Duration) error {
	if s.cmd == nil {
		return nil
	}
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-s.done:
		return nil
	case <-t.C:
	case <-ctx.Done():
	}
	_ = s.Kill()
	<-s.done
	return nil
}

func (s *mockSession) Kill() error {
	if s.cmd == nil {
		return nil
	}
	if err := s.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return errcode.Wrap(errcode.StopFailed, err, "killing the mock agent")
	}
	return nil
}

func (s *mockSession) ConsoleTail() string { return s.output.String() }

// Close closes the channel (the agent then kills its bundle and exits),
// kills the agent if it lingers, and removes the run directory.
func (s *mockSession) Close() error {
	s.once.Do(func() {
		if s.conn != nil {
			_ = s.conn.Close()
		}
		if s.cmd != nil {
			select {
			case <-s.done:
			case <-time.After(mockKillWait):
				s.log.Warn("mock agent did not exit after its channel closed; killing it")
				_ = s.Kill()
				<-s.done
			}
		}
		if err := os.RemoveAll(s.dir); err != nil {
			s.err = errcode.Wrap(errcode.StagingFailed, err, "removing the mock run directory")
		}
	})
	return s.err
}
