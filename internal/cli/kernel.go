package cli

import (
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/vm"
)

func (a *app) kernelCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "kernel",
		Short: "Add, fetch, list and remove guest kernels",
		Long: `kernel manages the guest kernels in the registry. Each kernel is validated (an
ELF vmlinux for x86_64 or aarch64, or an x86 bzImage), stored content-addressed
in kernels/ and recorded with the VMMs that can boot it: Firecracker needs an
uncompressed ELF vmlinux, QEMU boots a bzImage (or a vmlinux with a PVH note).

The default kernel of a VMM — used by 'hyphae run' without --kernel — is the
most recently added kernel that VMM can boot; adding a kernel again (same name)
makes it the newest.`,
		Example: `  hyphae kernel fetch --debian
  hyphae kernel add ./vmlinux --name fc-6.1
  hyphae kernel list --json`,
	}
	cmd.AddCommand(a.kernelAddCommand(), a.kernelFetchCommand(), a.kernelListCommand(), a.kernelRmCommand())
	return cmd
}

func (a *app) printKernel(k vm.Kernel) error {
	return a.emit(k, func(w io.Writer) {
		fmt.Fprintf(w, "Added kernel %s\n", k.Name)
		fields(w,
			"  format", k.Format+" ("+k.Arch+")",
			"  vmms", strings.Join(k.VMMs, ", "),
			"  default for", orNone(k.DefaultFor),
			"  sha256", k.SHA256,
			"  path", k.Path,
		)
	}, func(w io.Writer) { fmt.Fprintln(w, k.Name) })
}

func orNone(s []string) string {
	if len(s) == 0 {
		return "-"
	}
	return strings.Join(s, ", ")
}

func (a *app) kernelAddCommand() *cobra.Command {
	var name string
	cmd := &cobra.Command{
		Use:   "add <path>",
		Short: "Validate a kernel file and add it to the registry",
		Example: `  hyphae kernel add /var/cache/hyphae/kernels/vmlinuz
  hyphae kernel add ./vmlinux --name fc-6.1 --json`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withRuntime(cmd.Context(), func(rt *vm.Runtime) error {
				k, err := rt.AddKernel(cmd.Context(), args[0], name)
				if err != nil {
					return err
				}
				return a.printKernel(k)
			})
		},
	}
	cmd.Flags().StringVar(&name, "name", "", "kernel name (default: the file's name)")
	return cmd
}

func (a *app) kernelFetchCommand() *cobra.Command {
	var (
		name, sum, cacheDir string
		debian              bool
	)
	cmd := &cobra.Command{
		Use:   "fetch <url> --sha256 <hex> | fetch --debian",
		Short: "Download a kernel (pinned by SHA-256), or Debian's cloud kernel through apt",
		Long: `fetch downloads a kernel over HTTP(S), streamed to disk while it is hashed and
retried with backoff; a digest other than --sha256 is refused and nothing is
left behind. --debian gets Debian's cloud kernel (linux-image-cloud-amd64,
verified by apt) into --cache-dir and adds it: the kernel for the QEMU driver.`,
		Example: `  hyphae kernel fetch --debian
  hyphae kernel fetch https://example.org/vmlinux-6.1 --sha256 3f2a…  --name fc-6.1`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if debian == (len(args) == 1) {
				return usageError(errcode.New(errcode.InvalidArgument, "give either a URL with --sha256 or --debian"))
			}
			if !debian && sum == "" {
				return usageError(errcode.New(errcode.InvalidArgument, "--sha256 is required with a URL"))
			}
			return a.withRuntime(cmd.Context(), func(rt *vm.Runtime) error {
				var (
					k   vm.Kernel
					err error
				)
				if debian {
					k, err = rt.FetchDebianKernel(cmd.Context(), cacheDir, name)
				} else {
					k, err = rt.FetchKernel(cmd.Context(), args[0], sum, name)
				}
				if err != nil {
					return err
				}
				return a.printKernel(k)
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&name, "name", "", "kernel name (default: the URL's or package file's name)")
	f.StringVar(&sum, "sha256", "", "expected SHA-256 of the download (hex)")
	f.BoolVar(&debian, "debian", false, "fetch Debian's cloud kernel through apt")
	f.StringVar(&cacheDir, "cache-dir", "", "where --debian keeps the package's kernel (default /var/cache/hyphae/kernels)")
	return cmd
}

func (a *app) kernelListCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List registered kernels and the VMMs each is the default for",
		Example: `  hyphae kernel list
  hyphae kernel list --json | jq -r '.[] | select(.default_for | index("qemu")) | .name'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.withRuntime(cmd.Context(), func(rt *vm.Runtime) error {
				ks, err := rt.ListKernels(cmd.Context())
				if err != nil {
					return err
				}
				return a.emit(ks, func(w io.Writer) {
					rows := make([][]string, 0, len(ks))
					for _, k := range ks {
						rows = append(rows, []string{k.Name, k.Format, k.Arch, strings.Join(k.VMMs, ","), orNone(k.DefaultFor), sizeText(k.SizeBytes), ago(k.CreatedAt)})
					}
					table(w, []string{"NAME", "FORMAT", "ARCH", "VMMS", "DEFAULT FOR", "SIZE", "ADDED"}, rows)
				}, func(w io.Writer) {
					for _, k := range ks {
						fmt.Fprintln(w, k.Name)
					}
				})
			})
		},
	}
}

func (a *app) kernelRmCommand() *cobra.Command {
	return &cobra.Command{
		Use:     "rm <name>...",
		Short:   "Remove kernels from the registry (the stored file goes with its last name)",
		Example: `  hyphae kernel rm fc-6.1 --json`,
		Args:    cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			removed := []string{}
			err := a.withRuntime(cmd.Context(), func(rt *vm.Runtime) error {
				for _, n := range args {
					if err := rt.RemoveKernel(cmd.Context(), n); err != nil {
						return err
					}
					removed = append(removed, n)
				}
				return nil
			})
			if err != nil {
				return err
			}
			return a.emit(map[string]any{"removed": removed}, func(w io.Writer) {
				for _, n := range removed {
					fmt.Fprintln(w, "Removed kernel", n)
				}
			}, nil)
		},
	}
}
