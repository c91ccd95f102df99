package cli

import (
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/vm"
)

// listVMsCommand is `hyphae list vms`.
func (a *app) listVMsCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "vms",
		Short: "List running VMs (after reconciling the registry with live processes)",
		Long: `vms lists the VMs that are starting or running. Before listing, records whose
VMM process is gone are removed with their runtime directories, so the list
never shows a VM that is not there.`,
		Example: `  hyphae list vms
  hyphae list vms -q            # ids only
  hyphae list vms --json | jq -r '.[].id'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.withRuntime(cmd.Context(), func(rt *vm.Runtime) error {
				vms, err := rt.List(cmd.Context())
				if err != nil {
					return err
				}
				return a.emit(vms, func(w io.Writer) {
					rows := make([][]string, 0, len(vms))
					for _, s := range vms {
						rows = append(rows, []string{s.ID, s.Image, driverText(s), s.State, fmt.Sprint(s.PID), uptimeText(s), fmt.Sprint(s.Detached)})
					}
					table(w, []string{"ID", "IMAGE", "VMM", "STATE", "PID", "UPTIME", "DETACHED"}, rows)
				}, func(w io.Writer) {
					for _, s := range vms {
						fmt.Fprintln(w, s.ID)
					}
				})
			})
		},
	}
}

func driverText(s vm.Status) string {
	if s.Accel != "" {
		return s.Driver + "/" + s.Accel
	}
	return s.Driver
}

func uptimeText(s vm.Status) string {
	if s.StartedAt == nil {
		return "-"
	}
	return (time.Duration(s.UptimeSeconds * float64(time.Second))).Round(time.Second).String()
}

// printVM prints `hyphae inspect` of a VM.
func (a *app) printVM(s vm.Status) error {
	return a.emit(s, func(w io.Writer) {
		started := "-"
		if s.StartedAt != nil {
			started = s.StartedAt.Local().Format("2006-01-02 15:04:05 MST")
		}
		fields(w,
			"id", s.ID,
			"image", s.Image+" ("+s.ImageDigest+")",
			"state", s.State,
			"vmm", driverText(s),
			"pid", fmt.Sprint(s.PID),
			"detached", fmt.Sprint(s.Detached),
			"started", started,
			"uptime", uptimeText(s),
			"kernel", s.Kernel,
			"vcpus", fmt.Sprint(s.Spec.VCPUs),
			"memory", fmt.Sprintf("%d MiB", s.Spec.MemoryMiB),
			"boot args", s.Spec.BootArgs,
			"runtime dir", s.RuntimeDir,
			"console", s.ConsolePath,
		)
	}, func(w io.Writer) { fmt.Fprintln(w, s.ID) })
}

func (a *app) logsCommand() *cobra.Command {
	var o vm.LogOptions
	cmd := &cobra.Command{
		Use:   "logs <vm-id>",
		Short: "Print a VM's program output (-f: follow until the VM exits)",
		Long: `logs prints what the VM's program has written to the console so far. With -f it
keeps following until the VM exits, then cleans the VM up. --all adds the
kernel's, hyphae-init's and the VMM's own lines, tagged with their source.
An id prefix that names one VM is enough.`,
		Example: `  hyphae logs 3f2a9c01b7de
  hyphae logs 3f2a -f
  hyphae logs 3f2a --json`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withRuntime(cmd.Context(), func(rt *vm.Runtime) error {
				if !a.json {
					_, err := rt.Logs(cmd.Context(), args[0], a.env.Stdout, o)
					return err
				}
				buf := &boundedBuffer{max: maxJSONOutput}
				st, err := rt.Logs(cmd.Context(), args[0], buf, o)
				if err != nil {
					return err
				}
				doc := map[string]any{"id": args[0], "output": buf.buf.String(), "output_truncated": buf.truncated}
				if st != nil {
					doc["exit_code"] = st.Status.ExitCode
				}
				return writeJSON(a.env.Stdout, doc)
			})
		},
	}
	cmd.Flags().BoolVarP(&o.Follow, "follow", "f", false, "follow the output until the VM exits")
	cmd.Flags().BoolVar(&o.All, "all", false, "include kernel, hyphae-init and VMM lines")
	return cmd
}

func (a *app) stopCommand() *cobra.Command {
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "stop <vm-id>...",
		Short: "Stop VMs gracefully, then remove them",
		Long: `stop asks each VM's guest to shut down (Ctrl-Alt-Del through the VMM: the
program gets SIGTERM), then sends SIGTERM and SIGKILL to the VMM, all within
--timeout, and removes the VM's runtime directory, writable layer and record.
It works on VMs started by any hyphae process (run --detach included).`,
		Example: `  hyphae stop 3f2a9c01b7de
  hyphae stop 3f2a --timeout 30s --json`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if timeout < 0 {
				return usageError(errcode.New(errcode.InvalidArgument, "--timeout must not be negative"))
			}
			var results []vm.StopResult
			err := a.withRuntime(cmd.Context(), func(rt *vm.Runtime) error {
				for _, id := range args {
					r, err := rt.Stop(cmd.Context(), id, timeout)
					if err != nil {
						return err
					}
					results = append(results, r)
				}
				return nil
			})
			if err != nil && (len(results) == 0 || a.json) {
				return err
			}
			if perr := a.emit(results, func(w io.Writer) {
				for _, r := range results {
					fmt.Fprintf(w, "Stopped %s (%s, %s)\n", r.ID, r.Method, time.Duration(r.TookMS)*time.Millisecond)
				}
			}, func(w io.Writer) {
				for _, r := range results {
					fmt.Fprintln(w, r.ID)
				}
			}); perr != nil {
				return perr
			}
			return err
		},
	}
	cmd.Flags().DurationVar(&timeout, "timeout", vm.DefaultStopTimeout, "bound on the whole stop")
	return cmd
}
