package cli

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
	"github.com/hyphae-run/hyphae/image"
	"github.com/hyphae-run/hyphae/registry"
)

// builder returns an image.Builder over reg that shows progress on stderr
// unless --quiet.
func (a *app) builder(reg *registry.Registry) *image.Builder {
	b := &image.Builder{Store: reg, Logger: a.logger}
	if !a.quiet {
		b.Progress = a.env.Stderr
	}
	return b
}

// parseEnv parses repeated --env K=V flags.
func parseEnv(values []string) ([]guest.EnvVar, error) {
	vars := make([]guest.EnvVar, 0, len(values))
	for _, v := range values {
		e, err := guest.ParseEnvVar(v)
		if err != nil {
			return nil, usageError(err)
		}
		vars = append(vars, e)
	}
	return vars, nil
}

func (a *app) buildCommand() *cobra.Command {
	var (
		o          image.BuildOptions
		entrypoint string
		env        []string
	)
	cmd := &cobra.Command{
		Use:   "build <dir> | build --binary FILE",
		Short: "Build an image from a project directory or a prebuilt program",
		Long: `build turns a project into a content-addressed ext4 image and tags it
name:tag in the registry. The project kind comes from its marker file:
package.json (JavaScript: the project plus the host's node and its libraries),
Cargo.toml (Rust: a static release build) or go.mod (Go: CGO_ENABLED=0).
--binary packs a prebuilt, statically linked program instead.

Rebuilding unchanged input returns the cached image without running mkfs;
--force rebuilds anyway. --dry-run stages the tree and prints the digest it
would have, without writing an image.`,
		Example: `  hyphae build ./examples/hello-go
  hyphae build ./examples/hello-js --name web --tag v1 --env PORT=8080
  hyphae build ./app --entrypoint "node server.js --port 8080" --size 256
  hyphae build --binary ./bin/tool --name tool --json`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) == 1 {
				o.Dir = args[0]
			}
			if (o.Dir == "") == (o.Binary == "") {
				return usageError(errcode.New(errcode.InvalidArgument, "give either a project directory or --binary FILE"))
			}
			if entrypoint != "" {
				argv, err := image.SplitCommand(entrypoint)
				if err != nil {
					return usageError(err)
				}
				o.Entrypoint = argv
			}
			var err error
			if o.Env, err = parseEnv(env); err != nil {
				return err
			}
			return a.withRegistry(cmd.Context(), func(reg *registry.Registry) error {
				res, err := a.builder(reg).Build(cmd.Context(), o)
				if err != nil {
					return err
				}
				return a.printResult(res)
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.Binary, "binary", "", "pack this prebuilt static program instead of a project")
	f.StringVar(&o.Name, "name", "", "image name (default: the directory's or binary's base name)")
	f.StringVar(&o.Tag, "tag", "", "image tag (default: latest)")
	f.StringVar(&entrypoint, "entrypoint", "", "command to run, split like a shell does (default: from the project)")
	f.StringArrayVar(&env, "env", nil, "environment variable `KEY=VALUE` baked into the image (repeatable)")
	f.IntVar(&o.SizeMiB, "size", 0, "image size in `MiB` (default: derived from the content)")
	f.BoolVar(&o.Force, "force", false, "rebuild even when a cached image matches")
	f.BoolVar(&o.WithAgent, "with-agent", false, "ship dimension-agent as /sbin/dimension-agent")
	f.BoolVar(&o.DryRun, "dry-run", false, "stage and digest only; write and register nothing")
	f.StringVar(&o.Node, "node", "", "node executable for JavaScript projects (default: node on PATH)")
	return cmd
}

func (a *app) importCommand() *cobra.Command {
	var (
		o   image.ImportOptions
		env []string
	)
	cmd := &cobra.Command{
		Use:   "import <archive.tar|->",
		Short: "Import a docker save / OCI image archive as an image",
		Long: `import reads a "docker save" archive — the classic layout (manifest.json and
per-layer directories) or the OCI layout Docker 25+ writes (index.json and
blobs/sha256/), gzip'd layers too — applies its layers with whiteouts, and
registers the result. The image config's Entrypoint + Cmd, Env and WorkingDir
become the image's entrypoint, environment and working directory.
"-" reads the archive from stdin (then --name is required).`,
		Example: `  docker save alpine:3.20 -o alpine.tar && hyphae import alpine.tar
  docker save myapp | hyphae import - --name myapp --tag v2
  hyphae import app.tar --with-agent --env LOG_LEVEL=debug --json`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			o.Archive = args[0]
			if o.Archive == "-" {
				o.Stdin = a.env.Stdin
			}
			var err error
			if o.Env, err = parseEnv(env); err != nil {
				return err
			}
			return a.withRegistry(cmd.Context(), func(reg *registry.Registry) error {
				res, err := a.builder(reg).Import(cmd.Context(), o)
				if err != nil {
					return err
				}
				return a.printResult(res)
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.Name, "name", "", "image name (default: the archive's file name)")
	f.StringVar(&o.Tag, "tag", "", "image tag (default: latest)")
	f.StringArrayVar(&env, "env", nil, "environment variable `KEY=VALUE` added to the image's (repeatable)")
	f.IntVar(&o.SizeMiB, "size", 0, "image size in `MiB` (default: derived from the content)")
	f.BoolVar(&o.Force, "force", false, "rebuild even when a cached image matches")
	f.BoolVar(&o.WithAgent, "with-agent", false, "ship dimension-agent as /sbin/dimension-agent")
	return cmd
}

// printResult prints a build or import result; its JSON is image.Result.
func (a *app) printResult(res image.Result) error {
	return a.emit(res, func(w io.Writer) {
		verb := "Built"
		switch {
		case res.DryRun:
			verb = "Would build"
		case res.Cached:
			verb = "Cached"
		}
		fmt.Fprintf(w, "%s %s:%s\n", verb, res.Name, res.Tag)
		fields(w,
			"  digest", res.Digest,
			"  path", res.Path,
			"  size", sizeText(res.SizeBytes),
			"  entrypoint", argvText(res.Entrypoint),
		)
	}, func(w io.Writer) { fmt.Fprintln(w, res.Digest) })
}
