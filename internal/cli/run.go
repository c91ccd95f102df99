package cli

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/spf13/cobra"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/network"
	"github.com/hyphae-run/hyphae/registry"
	"github.com/hyphae-run/hyphae/vm"
)

// ExitTimeout is hyphae run's exit code when --timeout expired, as
// timeout(1) has it.
const ExitTimeout = 124

// exitStatus ends a command with a chosen exit code (hyphae run returns the
// program's). err, when set, is rendered first.
type exitStatus struct {
	code int
	err  error
}

func (e exitStatus) Error() string {
	if e.err != nil {
		return e.err.Error()
	}
	return fmt.Sprintf("exit status %d", e.code)
}

func (e exitStatus) Unwrap() error { return e.err }

// EnvNetPool names the IPv4 CIDR networked VMs take their /30 subnets
// from (network.DefaultPool when unset). It is a host setting rather than a
// flag: every hyphae process sharing a home should use the same pool.
const EnvNetPool = "HYPHAE_NET_POOL"

// withRuntime runs fn with a vm.Runtime over the open registry.
func (a *app) withRuntime(ctx context.Context, fn func(*vm.Runtime) error) error {
	return a.withRegistry(ctx, func(reg *registry.Registry) error {
		return fn(vm.New(vm.Options{Registry: reg, Logger: a.logger, NetworkPool: a.env.Getenv(EnvNetPool)}))
	})
}

// maxJSONOutput bounds the program output run --json keeps.
const maxJSONOutput = 1 << 20

// runJSON is the JSON of a foreground `hyphae run --json`.
type runJSON struct {
	vm.Result
	Output          string `json:"output"`
	OutputTruncated bool   `json:"output_truncated"`
}

// detachJSON is the JSON of `hyphae run --detach --json`.
type detachJSON struct {
	ID          string `json:"id"`
	Driver      string `json:"driver"`
	PID         int    `json:"pid"`
	RuntimeDir  string `json:"runtime_dir"`
	ConsolePath string `json:"console_path"`
}

// boundedBuffer keeps the first max bytes written to it.
type boundedBuffer struct {
	buf       bytes.Buffer
	max       int
	truncated bool
}

func (b *boundedBuffer) Write(p []byte) (int, error) {
	room := b.max - b.buf.Len()
	if room < len(p) {
		b.truncated = true
		if room > 0 {
			b.buf.Write(p[:room])
		}
		return len(p), nil
	}
	return b.buf.Write(p)
}

func (a *app) runCommand() *cobra.Command {
	var (
		o           vm.RunOptions
		env         []string
		timeout     time.Duration
		stopTimeout time.Duration
		detach      bool
		allow       []string
	)
	cmd := &cobra.Command{
		Use:   "run <name[:tag]>",
		Short: "Boot an image in a microVM and run its program",
		Long: `run boots the image in a fresh microVM with a private writable layer (the image
itself is never written), streams the program's output and exits with the
program's exit code (128+signal when a signal killed it). Kernel boot messages
and hyphae-init's own lines are hidden unless --log-level debug.

--vmm auto (the default) takes Firecracker when its binary is on PATH and KVM
really works, else QEMU (KVM when it works, else TCG); 'hyphae check' says
which and why. The kernel is --kernel (a registered name or a path), else the
most recently added kernel the VMM can boot; a kernel the VMM cannot boot is
refused before anything starts.

--env values travel on the kernel command line, which the guest can read:
never pass secrets that way. --timeout stops the VM gracefully when it runs
out and exits 124 (E302). Ctrl-C stops the VM gracefully (Ctrl-Alt-Del: the
program gets SIGTERM), then SIGTERM and SIGKILL to the VMM within
--stop-timeout. Afterwards no VMM, runtime directory, writable layer or VM
record remains.

--detach prints the VM id and leaves the VM running; see 'hyphae list vms',
'hyphae logs', 'hyphae stop'.

--network (root) gives the guest a TAP (hyphae-tap<N>) with a /30 from the
pool ($HYPHAE_NET_POOL, default 172.16.0.0/16: host .1, guest .2), configured
through the kernel's ip= argument, a resolv.conf, and outbound NAT. The guest
cannot reach the host itself, private (RFC 1918), shared, link-local or
loopback ranges, or the pool; each --allow CIDR[:PORT] opens one destination
(all ports, or TCP and UDP to PORT). --no-nat drops the masquerade: the guest
then only talks to its TAP's host address, as far as --allow permits. The
TAP, rules (nftables table inet hyphae) and lease go with the VM; a later
networked run reclaims those of VMs that died. Run every command of a home
whose VMs are networked in the same network namespace.

--jail (firecracker only) runs Firecracker under its jailer as the system
user hyphae-fc, in a chroot under /srv/jailer with the VM's CPU and memory as
cgroup v2 limits; 'hyphae check' says how to create the user.`,
		Example: `  hyphae run hello-go
  hyphae run hello-go --env GREETING=hi --timeout 30s
  hyphae run web:v1 --vmm qemu --vcpus 2 --memory 512 --kernel vmlinuz-6.1.0-57-cloud-amd64
  hyphae run worker --detach --json
  hyphae run fetcher --network --allow 10.0.0.53:53 --allow 192.168.1.0/24:443
  hyphae run worker --vmm firecracker --jail --network`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			o.Image = args[0]
			var err error
			if o.Env, err = parseEnv(env); err != nil {
				return err
			}
			if timeout < 0 || stopTimeout < 0 {
				return usageError(errcode.New(errcode.InvalidArgument, "--timeout and --stop-timeout must not be negative"))
			}
			for _, s := range allow {
				al, err := network.ParseAllow(s)
				if err != nil {
					return usageError(err)
				}
				o.Allow = append(o.Allow, al)
			}
			ctx := cmd.Context()
			return a.withRuntime(ctx, func(rt *vm.Runtime) error {
				v, err := rt.Start(ctx, o)
				if err != nil {
					return err
				}
				if detach {
					return a.detach(ctx, v)
				}
				return a.supervise(ctx, v, timeout, stopTimeout)
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.Kernel, "kernel", "", "kernel: a registered name or a path (default: the VMM's default kernel)")
	f.StringVar(&o.VMM, "vmm", vm.Auto, "VMM: auto, firecracker or qemu")
	f.IntVar(&o.VCPUs, "vcpus", 0, "vCPUs: 1 or an even number up to 32 (default: the image's, else 1)")
	f.IntVar(&o.MemoryMiB, "memory", 0, "guest memory in `MiB` (default: the image's, else 256)")
	f.StringVar(&o.BootArgs, "boot-args", "", "extra kernel command line arguments")
	f.StringArrayVar(&env, "env", nil, "environment variable `KEY=VALUE` for the program (repeatable; not for secrets)")
	f.DurationVar(&timeout, "timeout", 0, "stop the VM after this long and exit 124 (0: no limit)")
	f.DurationVar(&stopTimeout, "stop-timeout", vm.DefaultStopTimeout, "bound on a graceful stop before the VMM is killed")
	f.BoolVarP(&detach, "detach", "d", false, "print the VM id and leave it running")
	f.BoolVar(&o.Network, "network", false, "give the guest a TAP, an address from the pool and outbound NAT (root)")
	f.BoolVar(&o.NoNAT, "no-nat", false, "with --network: no outbound NAT, the guest reaches only what --allow permits on its host address")
	f.StringArrayVar(&allow, "allow", nil, "with --network: let the guest reach `CIDR[:PORT]` despite the isolation rules (repeatable)")
	f.BoolVar(&o.Jail, "jail", false, "run Firecracker under its jailer as the hyphae-fc system user (firecracker driver only)")
	return cmd
}

func (a *app) detach(ctx context.Context, v *vm.VM) error {
	if err := v.Detach(ctx); err != nil {
		return err
	}
	info := v.Info()
	d := detachJSON{ID: v.ID(), Driver: info.Driver, PID: info.PID, RuntimeDir: info.RuntimeDir, ConsolePath: info.ConsolePath}
	text := func(w io.Writer) { fmt.Fprintln(w, d.ID) }
	return a.emit(d, text, text)
}

func (a *app) supervise(ctx context.Context, v *vm.VM, timeout, stopTimeout time.Duration) error {
	var out io.Writer = a.env.Stdout
	var captured *boundedBuffer
	if a.json {
		captured = &boundedBuffer{max: maxJSONOutput}
		out = captured
	}
	res, err := v.Supervise(ctx, vm.SuperviseOptions{
		Output:      out,
		ShowAll:     a.logger.Enabled(ctx, slog.LevelDebug),
		Timeout:     timeout,
		StopTimeout: stopTimeout,
	})
	code := res.ExitCode
	switch {
	case errcode.HasCode(err, errcode.Timeout) && res.TimedOut:
		code = ExitTimeout
	case err != nil:
		return err
	case code < 0 && res.Stopped:
		// Stopped before the program reported anything: as a shell
		// reports a command ended by Ctrl-C.
		code = 130
	}
	if a.json {
		doc := runJSON{Result: res, Output: captured.buf.String(), OutputTruncated: captured.truncated}
		if err != nil {
			return exitStatus{code: code, err: err}
		}
		if werr := writeJSON(a.env.Stdout, doc); werr != nil {
			return werr
		}
	}
	if code == 0 && err == nil {
		return nil
	}
	return exitStatus{code: code, err: err}
}

// exitCodeOf returns the exit code an exitStatus asks for.
func exitCodeOf(err error) (exitStatus, bool) {
	var ex exitStatus
	ok := errors.As(err, &ex)
	return ex, ok
}
