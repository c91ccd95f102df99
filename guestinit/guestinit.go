// Package guestinit is hyphae-init, the PID 1 of every hyphae VM, as a
// library: it mounts the pseudo filesystems (optionally under a writable
// overlay root), loads the kernel modules of a hyphae.modules drive and
// applies a static ip= network configuration (for kernels whose NIC driver
// is a module and that lack CONFIG_IP_PNP, such as Debian's), reads the
// image's /etc/hyphae files and the kernel command line, runs the program (or the dimension agent) as its only child while
// reaping every orphan, forwards termination signals to it, reports how it
// ended on the console in one line and reboots.
//
// The kernel-facing steps (mounts, reboot) run only when Config asks for
// them, so that tests can drive the parsing, the environment precedence and
// the exit-status reporting in-process; cmd/hyphae-init turns everything on.
package guestinit

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
	"golang.org/x/sys/unix"
)

// ProcCmdline is where a guest reads its kernel command line.
const ProcCmdline = "/proc/cmdline"

// Config says where init finds its inputs and which kernel-facing steps it
// takes.
type Config struct {
	// Root is where the image's files are found: /etc/hyphae, the agent,
	// the program and the working directory are resolved under it. "" means
	// "/", which is what a guest uses.
	Root string
	// CmdlinePath is the file holding the kernel command line; "" means
	// ProcCmdline. With MountFilesystems it is read after /proc is mounted
	// and before the overlay switch.
	CmdlinePath string
	// Stdout and Stderr are the console, inherited by the program; the
	// status line goes to Stdout. nil means os.Stdout and os.Stderr.
	Stdout, Stderr *os.File
	// Logger receives warnings and diagnostics; nil discards them.
	Logger *slog.Logger
	// MountFilesystems makes Run set up the running system as PID 1 does:
	// the hyphae.overlay root switch, devtmpfs, proc, sysfs, cgroup2 and
	// tmpfs on /run and /tmp, then the hyphae.modules kernel modules and
	// the static network configuration of ip=. It needs Root "/".
	MountFilesystems bool
	// Halt ends the machine after the status line is printed. nil means
	// Reboot. Boot never returns even if Halt does.
	Halt func()
}

func (c Config) withDefaults() Config {
	if c.Root == "" {
		c.Root = "/"
	}
	if c.CmdlinePath == "" {
		c.CmdlinePath = ProcCmdline
	}
	if c.Stdout == nil {
		c.Stdout = os.Stdout
	}
	if c.Stderr == nil {
		c.Stderr = os.Stderr
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Halt == nil {
		c.Halt = func() { Reboot(c.Logger) }
	}
	return c
}

// Result is how a run ended.
type Result struct {
	// Code is the program's exit code, 128+Signal when a signal killed it,
	// or -1 when Err is set.
	Code int
	// Signal is the signal that killed the program, or 0.
	Signal int
	// Err is the fatal init error (code E304) that kept the program from
	// running to its end.
	Err error
}

// Line renders the console status line: guest.FormatExit, or
// guest.FormatFatal for a fatal error.
func (r Result) Line() string {
	if r.Err != nil {
		return guest.FormatFatal(r.Err.Error())
	}
	return guest.FormatExit(r.Code, r.Signal)
}

// fatal makes err a fatal Result whose message starts with E304.
func fatal(err error) Result {
	if errcode.CodeOf(err) != errcode.InitFatal {
		err = errcode.Wrap(errcode.InitFatal, err, "init failed")
	}
	return Result{Code: -1, Err: err}
}

// Boot is PID 1: Run, print the status line on the console, then Halt. It
// never returns: a panic becomes a fatal line, and if Halt comes back Boot
// sleeps forever, because PID 1 exiting panics the kernel.
func Boot(ctx context.Context, cfg Config) {
	cfg = cfg.withDefaults()
	res := runRecovered(ctx, cfg)
	fmt.Fprintln(cfg.Stdout, res.Line())
	cfg.Halt()
	for {
		time.Sleep(time.Hour)
	}
}

func runRecovered(ctx context.Context, cfg Config) (res Result) {
	defer func() {
		if p := recover(); p != nil {
			res = fatal(errcode.New(errcode.InitFatal, "internal error: %v", p))
		}
	}()
	return Run(ctx, cfg)
}

// Run prepares the system (when cfg.MountFilesystems), loads the plan and
// supervises the program until it exits. It prints nothing and does not
// halt; Boot does both. Cancelling ctx kills the program.
func Run(ctx context.Context, cfg Config) Result {
	cfg = cfg.withDefaults()
	cmdline, err := prepare(cfg)
	if err != nil {
		return fatal(err)
	}
	if err := writeResolvConf(cfg.Root, cmdline); err != nil {
		return fatal(err)
	}
	plan, err := LoadPlan(cfg.Root, cmdline)
	if err != nil {
		return fatal(err)
	}
	return supervise(ctx, cfg, plan)
}

// prepare mounts what the guest needs, when asked to, and returns the
// kernel command line. The command line is read before the overlay
// switch, while the /proc it comes from is certainly the kernel's.
func prepare(cfg Config) (string, error) {
	if !cfg.MountFilesystems {
		return readCmdline(cfg.CmdlinePath)
	}
	if cfg.Root != "/" {
		return "", errcode.New(errcode.InitFatal, "MountFilesystems needs Root \"/\", not %q", cfg.Root)
	}
	disableCtrlAltDel(cfg.Logger)
	if err := mountPseudo(procFS(), cfg.Logger); err != nil {
		return "", err
	}
	cmdline, err := readCmdline(cfg.CmdlinePath)
	if err != nil {
		return "", err
	}
	if spec, ok := guest.CmdlineValue(cmdline, guest.CmdlineOverlay); ok {
		if err := enterOverlay(spec, cfg.Logger); err != nil {
			return "", err
		}
	}
	for _, fs := range pseudoFilesystems() {
		if err := mountPseudo(fs, cfg.Logger); err != nil {
			return "", err
		}
	}
	if err := ensureConsole(); err != nil {
		return "", err
	}
	if err := prepareNetwork(cmdline, cfg.Logger); err != nil {
		return "", err
	}
	return cmdline, nil
}

// prepareNetwork loads the hyphae.modules drivers and applies a static
// ip= argument, before the program starts, so that it finds its network
// up.
func prepareNetwork(cmdline string, log *slog.Logger) error {
	if dev, ok := guest.CmdlineValue(cmdline, guest.CmdlineModules); ok {
		if err := loadModules(dev, log); err != nil {
			return err
		}
	}
	v, ok := guest.CmdlineValue(cmdline, cmdlineIP)
	if !ok {
		return nil
	}
	ipc, static, err := parseIPArg(v)
	if err != nil {
		return err
	}
	if !static {
		log.Debug("ip= asks for no static configuration; leaving it to the kernel", "ip", v)
		return nil
	}
	return configureNetwork(ipc, deviceWait, log)
}

// disableCtrlAltDel makes the kernel turn Ctrl-Alt-Del into SIGINT for
// PID 1 instead of restarting at once. Ctrl-Alt-Del is how Firecracker
// (SendCtrlAltDel) and the qemu driver (QMP send-key) ask for a graceful
// stop, so the program must get to hear of it. Inside a PID namespace the
// kernel refuses (EINVAL); there is no keyboard there anyway.
func disableCtrlAltDel(log *slog.Logger) {
	if err := unix.Reboot(unix.LINUX_REBOOT_CMD_CAD_OFF); err != nil {
		log.Debug("cannot turn Ctrl-Alt-Del off", "err", err)
	}
}

// writeResolvConf writes /etc/resolv.conf from the hyphae.dns token, when
// the command line has one (networked VMs). Without it the image's own file
// stays as it is.
func writeResolvConf(root, cmdline string) error {
	servers, ok := guest.CmdlineValue(cmdline, guest.CmdlineDNS)
	if !ok {
		return nil
	}
	p := filepath.Join(root, guest.ResolvConfPath)
	if err := os.WriteFile(p, guest.ResolvConf(servers), 0o644); err != nil {
		return errcode.Wrap(errcode.InitFatal, err, "cannot write %s", guest.ResolvConfPath)
	}
	return nil
}

func readCmdline(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", errcode.Wrap(errcode.InitFatal, err, "cannot read the kernel command line")
	}
	return string(b), nil
}

// Reboot syncs the filesystems and restarts the machine, which ends the VM:
// Firecracker exits with reboot=k and QEMU with -no-reboot; in a PID
// namespace it ends the namespace. If the kernel refuses, Reboot logs why
// and sleeps forever rather than return into a PID 1 that would exit.
func Reboot(log *slog.Logger) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	unix.Sync()
	err := unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART)
	log.Error("reboot failed; halting here", "err", err)
	for {
		time.Sleep(time.Hour)
	}
}
