package firecracker

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/vmm"
	"github.com/hyphae-run/hyphae/vmm/vmmproc"
)

// Defaults for Options.
const (
	DefaultBinary = "firecracker"
	// DefaultStartTimeout bounds the wait for the API socket and the
	// configuration calls. Firecracker binds its socket in a few ms.
	DefaultStartTimeout = 10 * time.Second
	// killWait bounds how long Kill and Cleanup wait for the killed
	// process to be reaped.
	killWait = 5 * time.Second
	// describePause is the pause between GET / attempts while waiting
	// for the API to answer.
	describePause = 20 * time.Millisecond
)

// Files in a VM's runtime directory.
const (
	apiSocketName   = "firecracker.sock"
	vsockSocketName = "vsock.sock"
	consoleName     = "console.log"
	logName         = "firecracker.log"
	scratchName     = "scratch.ext4"
	configName      = "config.json"
)

// Options tune a Machine.
type Options struct {
	// Binary is the firecracker program (DefaultBinary when empty),
	// a path or a name looked up on PATH.
	Binary string
	// Logger gets lifecycle events; nil discards them.
	Logger *slog.Logger
	// UseConfigFile configures Firecracker with --config-file instead of
	// API calls. Firecracker then boots the guest at once.
	UseConfigFile bool
	// StartTimeout bounds Start's waits (DefaultStartTimeout when zero).
	StartTimeout time.Duration
	// ScratchSize is the writable layer's size in bytes
	// (DefaultScratchSize when zero).
	ScratchSize int64
	// Jail, when set, runs Firecracker under its jailer (see jail.go):
	// the kernel, images and writable layer are staged into a chroot and
	// Firecracker runs as an unprivileged user in its own cgroup.
	Jail *JailOptions
}

// Machine is one Firecracker microVM. It implements vmm.Machine.
type Machine struct {
	spec   vmm.Spec
	opts   Options
	log    *slog.Logger
	cfg    Config
	paths  ConfigOptions
	dir    string
	client *Client
	// consolePath is where the guest console is logged.
	consolePath string
	// jail is set when Firecracker runs under the jailer.
	jail *jailLayout

	mu   sync.Mutex
	proc *vmmproc.Process
	// jailCgroups are the cgroups the jailer makes for this VM, removed
	// with it.
	jailCgroups []string
	startedAt   time.Time
	// began is set once Start has run (successfully or not): a Machine
	// boots once.
	began   bool
	cleaned bool
}

var _ vmm.Machine = (*Machine)(nil)

// New checks spec and prepares a Machine without touching the host: the
// runtime directory (spec.RuntimeDir, else one named after spec.ID under
// vmmproc.RuntimeDir()) is created by Start.
func New(spec vmm.Spec, opts Options) (*Machine, error) {
	if opts.Binary == "" {
		opts.Binary = DefaultBinary
	}
	if opts.StartTimeout <= 0 {
		opts.StartTimeout = DefaultStartTimeout
	}
	if opts.ScratchSize <= 0 {
		opts.ScratchSize = DefaultScratchSize
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	dir := spec.RuntimeDir
	if dir == "" {
		// A bad id leaves dir empty; BuildConfig below reports the id
		// together with the spec's other problems.
		dir, _ = vmmproc.VMDir(spec.ID)
	}
	if dir != "" {
		if abs, err := filepath.Abs(dir); err == nil {
			dir = abs
		}
	}
	spec.RuntimeDir = dir
	paths := ConfigOptions{
		ScratchPath: filepath.Join(dir, scratchName),
		VsockPath:   filepath.Join(dir, vsockSocketName),
		LogPath:     filepath.Join(dir, logName),
	}
	cfg, err := BuildConfig(spec, paths)
	if err != nil {
		return nil, err
	}
	socket, consolePath := filepath.Join(dir, apiSocketName), filepath.Join(dir, consoleName)
	var jail *jailLayout
	if opts.Jail != nil {
		if jail, cfg, err = newJail(spec, &opts); err != nil {
			return nil, err
		}
		paths = ConfigOptions{ScratchPath: jail.host(jailScratch), VsockPath: jail.host(jailVsock), LogPath: jail.host(jailLog)}
		socket = jail.host(jailAPISocket)
		if !jail.opts.NoDaemonize {
			consolePath = jail.host(jailConsole)
		}
	}
	for _, s := range []string{socket, paths.VsockPath} {
		if err := vmmproc.CheckSocketPath(s); err != nil {
			return nil, err
		}
	}
	return &Machine{
		spec:        spec,
		opts:        opts,
		log:         log.With("vm", spec.ID, "driver", vmm.Firecracker),
		cfg:         cfg,
		paths:       paths,
		dir:         dir,
		client:      NewClient(socket, 0),
		consolePath: consolePath,
		jail:        jail,
	}, nil
}

// Config returns the Firecracker configuration the machine boots with.
func (m *Machine) Config() Config { return m.cfg }

// Start creates the runtime directory and writable layer, spawns
// firecracker, waits for its API, configures the VM and starts the guest.
// On failure everything it made is removed again.
func (m *Machine) Start(ctx context.Context) (err error) {
	m.mu.Lock()
	switch {
	case m.cleaned:
		m.mu.Unlock()
		return errcode.New(errcode.InvalidArgument, "machine %s was cleaned up", m.spec.ID)
	case m.began:
		m.mu.Unlock()
		return errcode.New(errcode.InvalidArgument, "machine %s was already started", m.spec.ID)
	}
	m.began = true
	// Not held during the waits below, so that Kill, Stop and Info work
	// on a start that hangs.
	m.mu.Unlock()
	defer func() {
		if err != nil {
			m.mu.Lock()
			_ = m.teardownLocked()
			m.mu.Unlock()
		}
	}()

	if err := vmmproc.PrepareDir(m.dir); err != nil {
		return err
	}
	// Firecracker refuses to bind over an existing path, and a wait for
	// the socket must not succeed on one an earlier VMM left.
	for _, s := range []string{apiSocketName, vsockSocketName} {
		if err := vmmproc.RemoveStaleSocket(filepath.Join(m.dir, s)); err != nil {
			return err
		}
	}
	// Leftovers of an earlier VM of the same id are not ours to reuse:
	// its writable layer holds its writes, its logs are not ours.
	for _, f := range []string{scratchName, logName, configName, consoleName, jailerLogName} {
		if err := os.Remove(filepath.Join(m.dir, f)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return errcode.Wrap(errcode.SpawnFailed, err, "removing a leftover %s", f)
		}
	}
	begin := time.Now()
	spawn := m.spawn
	if m.jail != nil {
		spawn = m.spawnJailed
	}
	proc, err := spawn(ctx)
	if err != nil {
		return err
	}
	m.mu.Lock()
	m.proc = proc
	cleaned := m.cleaned
	m.mu.Unlock()
	if cleaned {
		// Cleanup ran while we were preparing: the deferred teardown
		// kills what we just spawned.
		return errcode.New(errcode.InvalidArgument, "machine %s was cleaned up during start", m.spec.ID)
	}
	m.log.Info("firecracker spawned", "pid", proc.PID(), "config_file", m.opts.UseConfigFile)

	sctx, cancel := context.WithTimeout(ctx, m.opts.StartTimeout)
	defer cancel()
	if err := proc.WaitForSocket(sctx, m.client.socket); err != nil {
		return err
	}
	info, err := m.describe(sctx, proc)
	if err != nil {
		return err
	}
	m.log.Debug("firecracker API up", "version", info.VMMVersion, "state", info.State, "took", time.Since(begin))
	if m.opts.UseConfigFile {
		if info.State != "Running" {
			return errcode.New(errcode.BootFailed, "Firecracker read the config file but the VM is %q; console log ends:\n%s",
				info.State, proc.LogTail(2048))
		}
	} else {
		if m.jail != nil && !m.jail.opts.NoDaemonize {
			// Firecracker's stdout is /dev/null under --daemonize.
			if err := m.client.Put(sctx, "/serial", serialDevice{SerialOutPath: jailConsole}); err != nil {
				return err
			}
		}
		if err := m.client.Configure(sctx, m.cfg); err != nil {
			return err
		}
		if err := m.client.InstanceStart(sctx); err != nil {
			return err
		}
	}
	m.mu.Lock()
	m.startedAt = time.Now()
	m.mu.Unlock()
	m.log.Info("guest started", "took", time.Since(begin))
	return nil
}

// spawn makes the writable layer and Firecracker's log in the runtime
// directory and starts firecracker there.
func (m *Machine) spawn(ctx context.Context) (*vmmproc.Process, error) {
	begin := time.Now()
	if err := makeScratch(ctx, m.paths.ScratchPath, m.opts.ScratchSize); err != nil {
		return nil, err
	}
	m.log.Debug("writable layer ready", "path", m.paths.ScratchPath, "took", time.Since(begin))
	// Firecracker opens its log file without creating it.
	if err := os.WriteFile(m.paths.LogPath, nil, 0o600); err != nil {
		return nil, errcode.Wrap(errcode.SpawnFailed, err, "creating the Firecracker log")
	}

	args := []string{"--api-sock", m.client.socket, "--id", m.spec.ID}
	if m.opts.UseConfigFile {
		path := filepath.Join(m.dir, configName)
		doc, err := json.MarshalIndent(m.cfg, "", "  ")
		if err != nil {
			return nil, errcode.Wrap(errcode.SpawnFailed, err, "encoding the Firecracker config")
		}
		if err := os.WriteFile(path, doc, 0o600); err != nil {
			return nil, errcode.Wrap(errcode.SpawnFailed, err, "writing the Firecracker config")
		}
		args = append(args, "--config-file", path)
	}
	return vmmproc.Start(vmmproc.Config{
		Binary:  m.opts.Binary,
		Args:    args,
		Dir:     m.dir,
		LogPath: m.consolePath,
		Logger:  m.log,
	})
}

// describe calls GET / until it succeeds, the process exits or ctx ends.
func (m *Machine) describe(ctx context.Context, proc *vmmproc.Process) (InstanceInfo, error) {
	for {
		info, err := m.client.Describe(ctx)
		if err == nil {
			return info, nil
		}
		t := time.NewTimer(describePause)
		select {
		case <-ctx.Done():
			t.Stop()
			return InstanceInfo{}, errcode.Wrap(errcode.Timeout, err, "Firecracker API did not answer GET / in time")
		case <-proc.Done():
			t.Stop()
			return InstanceInfo{}, errcode.New(errcode.BootFailed, "firecracker exited during start; console log ends:\n%s", proc.LogTail(2048))
		case <-t.C:
		}
	}
}

// process returns the VMM process, or nil before Start.
func (m *Machine) process() *vmmproc.Process {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.proc
}

// Wait blocks until firecracker exits or ctx ends. Under the jailer
// Firecracker is not hyphae's child, so its exit status is not known and
// Wait returns nil once it has exited.
func (m *Machine) Wait(ctx context.Context) error {
	p := m.process()
	if p == nil {
		return errcode.New(errcode.VMNotRunning, "machine %s was not started", m.spec.ID)
	}
	return p.Wait(ctx)
}

// Stop sends Ctrl+Alt+Del (the guest's reboot=k makes Firecracker exit),
// then SIGTERM, then SIGKILL, each bounded by its share of timeout.
func (m *Machine) Stop(ctx context.Context, timeout time.Duration) error {
	p := m.process()
	if p == nil {
		return errcode.New(errcode.VMNotRunning, "machine %s was not started", m.spec.ID)
	}
	how, err := p.Stop(ctx, m.client.SendCtrlAltDel, timeout)
	if err != nil {
		return err
	}
	m.log.Info("firecracker stopped", "how", how)
	return nil
}

// Kill sends SIGKILL and waits (bounded) for the process to be reaped.
func (m *Machine) Kill() error {
	p := m.process()
	if p == nil {
		return nil
	}
	return p.KillWait(killWait)
}

// Console opens the console log (the guest's serial port) from its start.
func (m *Machine) Console() (io.ReadCloser, error) {
	f, err := os.Open(m.consolePath)
	if err != nil {
		return nil, errcode.Wrap(errcode.VMNotFound, err, "console log of %s", m.spec.ID)
	}
	return f, nil
}

// DialChannel opens the host↔guest channel over hybrid vsock, retrying
// until the guest listens, ctx ends or firecracker exits.
func (m *Machine) DialChannel(ctx context.Context) (net.Conn, error) {
	p := m.process()
	if p == nil {
		return nil, errcode.New(errcode.VMNotRunning, "machine %s was not started", m.spec.ID)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-p.Done():
			cancel()
		case <-ctx.Done():
		}
	}()
	port := m.spec.ChannelPort
	if port == 0 {
		port = vmm.DefaultChannelPort
	}
	conn, err := DialVsock(ctx, m.paths.VsockPath, port, m.log)
	if err != nil && p.Exited() {
		return nil, errcode.Wrap(errcode.VMNotRunning, err, "firecracker exited; console log ends:\n%s", p.LogTail(2048))
	}
	return conn, err
}

// Identity returns what identifies the firecracker process across hyphae
// restarts (PID plus start time), for the registry. ok is false before
// Start.
func (m *Machine) Identity() (id vmmproc.Identity, ok bool) {
	p := m.process()
	if p == nil {
		return vmmproc.Identity{}, false
	}
	return p.Identity(), true
}

// Info describes the machine.
func (m *Machine) Info() vmm.Info {
	m.mu.Lock()
	defer m.mu.Unlock()
	info := vmm.Info{
		ID:          m.spec.ID,
		Driver:      vmm.Firecracker,
		State:       vmm.StateCreated,
		StartedAt:   m.startedAt,
		RuntimeDir:  m.dir,
		ConsolePath: m.consolePath,
		Spec:        m.spec,
	}
	if m.proc != nil {
		info.PID = m.proc.PID()
		info.State = vmm.StateRunning
		if m.proc.Exited() {
			info.State = vmm.StateExited
		}
	}
	return info
}

// Cleanup kills firecracker if it still runs and removes the runtime
// directory with the writable layer, sockets and logs, and under the jailer
// the jail and the VM's cgroups. It is idempotent.
func (m *Machine) Cleanup() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.cleaned = true
	return m.teardownLocked()
}

// teardownLocked is Cleanup with m.mu held.
func (m *Machine) teardownLocked() error {
	var errs []error
	if m.proc != nil && !m.proc.Exited() {
		errs = append(errs, m.proc.KillWait(killWait))
	}
	m.client.Close()
	errs = append(errs, vmmproc.RemoveDir(m.dir))
	if m.jail != nil {
		if m.proc != nil {
			m.proc.Release()
		}
		errs = append(errs, m.jail.remove(m.jailCgroups))
	}
	return errors.Join(errs...)
}
