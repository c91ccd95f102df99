package cli

import (
	"context"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/registry"
	"github.com/hyphae-run/hyphae/vm"
)

// listCommand is the parent of `list bundles` (images); the VM runtime adds
// `list vms` beside it.
func (a *app) listCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List registered objects",
		Example: `  hyphae list bundles
  hyphae list images --json`,
	}
	cmd.AddCommand(&cobra.Command{
		Use:     "bundles",
		Aliases: []string{"images"},
		Short:   "List images (one row per tag, plus untagged digests)",
		Example: `  hyphae list bundles
  hyphae list images -q          # refs only
  hyphae list images --json | jq -r '.[].digest'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.withRegistry(cmd.Context(), func(reg *registry.Registry) error {
				imgs, err := reg.ListImages(cmd.Context())
				if err != nil {
					return err
				}
				if imgs == nil {
					imgs = []registry.Image{}
				}
				return a.emit(imgs, func(w io.Writer) {
					rows := make([][]string, 0, len(imgs))
					for _, img := range imgs {
						name, tag := img.Name, img.Tag
						if name == "" {
							name, tag = "<none>", "<none>"
						}
						rows = append(rows, []string{name, tag, shortDigest(img.Digest), sizeText(img.SizeBytes), ago(img.CreatedAt), img.Source})
					}
					table(w, []string{"NAME", "TAG", "DIGEST", "SIZE", "CREATED", "SOURCE"}, rows)
				}, func(w io.Writer) {
					for _, img := range imgs {
						fmt.Fprintln(w, img.Ref())
					}
				})
			})
		},
	})
	cmd.AddCommand(a.listVMsCommand())
	return cmd
}

// imageDetail is the JSON of `hyphae inspect` on an image: the image as
// resolved plus every tag naming its digest.
type imageDetail struct {
	registry.Image
	Tags []string `json:"tags"`
}

func (a *app) inspectCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "inspect <name[:tag]|digest|vm-id>",
		Short: "Show everything the registry knows about an image or a VM",
		Long: `inspect resolves a reference — name (tag latest), name:tag, sha256:<digest> or a
digest prefix of at least 12 hex digits — and prints the image's digest, file,
size, source, entrypoint, default resources and every tag that names it. A VM
id (or a prefix naming one VM) shows the VM: spec, PID, state, uptime, paths.`,
		Example: `  hyphae inspect hello
  hyphae inspect hello:v1 --json
  hyphae inspect 3f2a9c01b7de`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withRegistry(cmd.Context(), func(reg *registry.Registry) error {
				d, err := inspectImage(cmd.Context(), reg, args[0])
				if errcode.HasCode(err, errcode.NotFound) || errcode.HasCode(err, errcode.InvalidName) {
					// Not an image: perhaps a VM id.
					if s, verr := vm.New(vm.Options{Registry: reg, Logger: a.logger}).Get(cmd.Context(), args[0]); verr == nil {
						return a.printVM(s)
					}
				}
				if err != nil {
					return err
				}
				return a.emit(d, func(w io.Writer) {
					fields(w,
						"digest", d.Digest,
						"tags", fmt.Sprint(d.Tags),
						"path", d.Path,
						"size", fmt.Sprintf("%s (%d bytes)", sizeText(d.SizeBytes), d.SizeBytes),
						"source", d.Source,
						"entrypoint", argvText(d.Entrypoint),
						"vcpus", orDefault(d.VCPUs, ""),
						"memory", orDefault(d.MemoryMiB, " MiB"),
						"created", d.CreatedAt.Format("2006-01-02 15:04:05 MST")+" ("+ago(d.CreatedAt)+")",
					)
				}, func(w io.Writer) { fmt.Fprintln(w, d.Digest) })
			})
		},
	}
}

func inspectImage(ctx context.Context, reg *registry.Registry, ref string) (imageDetail, error) {
	img, err := reg.LookupImage(ctx, ref)
	if err != nil {
		return imageDetail{}, err
	}
	all, err := reg.ListImages(ctx)
	if err != nil {
		return imageDetail{}, err
	}
	d := imageDetail{Image: img, Tags: []string{}}
	for _, other := range all {
		if other.Digest == img.Digest && other.Name != "" && other.Owner == "" {
			d.Tags = append(d.Tags, other.Ref())
		}
	}
	return d, nil
}

func (a *app) rmCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "rm <name[:tag]|digest>...",
		Short: "Remove image tags (the file goes with the last tag)",
		Long: `rm removes each reference: name[:tag] removes that tag, a digest removes every
tag of that digest. An image file is deleted once no tag names it. rm refuses
(E502) while a created or running VM uses the image.`,
		Example: `  hyphae rm hello:v1
  hyphae rm hello old-build:2024-01 --json`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			removed := []string{}
			err := a.withRegistry(cmd.Context(), func(reg *registry.Registry) error {
				for _, ref := range args {
					if err := reg.RemoveImage(cmd.Context(), ref); err != nil {
						return err
					}
					removed = append(removed, ref)
				}
				return nil
			})
			if err != nil && (len(removed) == 0 || a.json) {
				return err
			}
			// In text, report what did go also when a later reference
			// failed (JSON output stays one document: the error).
			if perr := a.emit(map[string]any{"removed": removed}, func(w io.Writer) {
				for _, r := range removed {
					fmt.Fprintln(w, "Removed", r)
				}
			}, nil); perr != nil {
				return perr
			}
			return err
		},
	}
}

func (a *app) gcCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "gc",
		Short: "Remove image and kernel files that no registry record points to",
		Long: `gc deletes files under images/ and kernels/ that no record names (leftovers of
crashed builds, files of a recovered database's lost entries you removed), and
temp files older than an hour. Files of registered images are never touched.`,
		Example: `  hyphae gc
  hyphae gc --json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.withRegistry(cmd.Context(), func(reg *registry.Registry) error {
				removed, err := reg.GC(cmd.Context())
				if err != nil {
					return err
				}
				if removed == nil {
					removed = []string{}
				}
				return a.emit(map[string]any{"removed": removed}, func(w io.Writer) {
					for _, p := range removed {
						fmt.Fprintln(w, "Removed", p)
					}
					fmt.Fprintf(w, "%d files removed\n", len(removed))
				}, nil)
			})
		},
	}
}

// orDefault renders a default resource of an image; 0 means the runtime
// chooses.
func orDefault(n int, unit string) string {
	if n == 0 {
		return "runtime default"
	}
	return fmt.Sprint(n) + unit
}
