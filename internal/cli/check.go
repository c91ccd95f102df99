package cli

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guestbin"
	"github.com/hyphae-run/hyphae/registry"
)

// prereq is one prerequisite `hyphae check` reports. The VM runtime adds
// its own (KVM, firecracker, jailer, qemu, kernels) to prereqs.
type prereq struct {
	Name string
	// Required prerequisites make check exit non-zero when missing;
	// optional ones only matter for what For names.
	Required bool
	For      string
	Probe    func(ctx context.Context, a *app) probeResult
}

// probeResult is what one probe found.
type probeResult struct {
	OK     bool
	Detail string // version, path, or what is wrong
	Hint   string // how to fix it, when not OK
}

// checkReport is the JSON shape of `hyphae check --json`.
type checkReport struct {
	OK     bool          `json:"ok"`
	Checks []checkResult `json:"checks"`
}

type checkResult struct {
	Name     string `json:"name"`
	Required bool   `json:"required"`
	For      string `json:"for"`
	Status   string `json:"status"` // "ok", "missing" (required) or "unavailable" (optional)
	Detail   string `json:"detail,omitempty"`
	Hint     string `json:"hint,omitempty"`
}

// prereqs lists every check, in the order they are shown.
func prereqs() []prereq {
	return []prereq{
		toolPrereq("mkfs.ext4", true, "building images", "e2fsprogs", "-V"),
		toolPrereq("debugfs", true, "reading images back (tests, inspection)", "e2fsprogs", "-V"),
		{Name: guestbin.Init, Required: true, For: "every image (/sbin/init)", Probe: probeGuestBinary(guestbin.Init)},
		{Name: "home", Required: true, For: "the registry", Probe: probeHome},
		toolPrereq("node", false, "JavaScript projects", "nodejs", "--version"),
		toolPrereq("cargo", false, "Rust projects", "cargo", "--version"),
		toolPrereq("go", false, "Go projects", "golang-go", "version"),
	}
}

// probeTimeout bounds each version query, so a hung tool cannot hang check.
const probeTimeout = 10 * time.Second

// toolPrereq checks for a program on PATH and reports the first line of its
// version output.
func toolPrereq(program string, required bool, forWhat, debPackage string, versionArgs ...string) prereq {
	return prereq{Name: program, Required: required, For: forWhat, Probe: func(ctx context.Context, _ *app) probeResult {
		path, err := exec.LookPath(program)
		if err != nil {
			return probeResult{Detail: "not found on PATH", Hint: "apt-get install " + debPackage}
		}
		ctx, cancel := context.WithTimeout(ctx, probeTimeout)
		defer cancel()
		var out bytes.Buffer
		cmd := exec.CommandContext(ctx, path, versionArgs...)
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Run(); err != nil && out.Len() == 0 {
			return probeResult{Detail: fmt.Sprintf("%s does not run: %v", path, err), Hint: "reinstall " + debPackage}
		}
		line, _, _ := strings.Cut(strings.TrimSpace(out.String()), "\n")
		return probeResult{OK: true, Detail: strings.TrimSpace(line) + " (" + path + ")"}
	}}
}

func probeGuestBinary(name string) func(context.Context, *app) probeResult {
	return func(context.Context, *app) probeResult {
		p, err := guestbin.Locate(name)
		if err != nil {
			return probeResult{Detail: strings.TrimPrefix(err.Error(), string(errcode.CodeOf(err))+": "), Hint: errcode.HintOf(err)}
		}
		return probeResult{OK: true, Detail: p}
	}
}

// probeHome opens the registry when it exists, which also verifies (and
// repairs) it. A home not created yet is fine when it can be created: check
// itself leaves nothing behind.
func probeHome(ctx context.Context, a *app) probeResult {
	const hint = "pass --home DIR or set HYPHAE_HOME to a writable directory"
	if _, err := os.Stat(filepath.Join(a.home, registry.DBFile)); errors.Is(err, os.ErrNotExist) {
		dir := a.home
		for {
			if _, err := os.Stat(dir); err == nil {
				break
			}
			dir = filepath.Dir(dir)
		}
		if err := unix.Access(dir, unix.W_OK); err != nil {
			return probeResult{Detail: fmt.Sprintf("%s cannot be created: %s is not writable", a.home, dir), Hint: hint}
		}
		return probeResult{OK: true, Detail: a.home + " (not created yet)"}
	}
	var n int
	err := a.withRegistry(ctx, func(r *registry.Registry) error {
		imgs, err := r.ListImages(ctx)
		n = len(imgs)
		return err
	})
	if err != nil {
		h := errcode.HintOf(err)
		if h == "" {
			h = hint
		}
		return probeResult{Detail: err.Error(), Hint: h}
	}
	return probeResult{OK: true, Detail: fmt.Sprintf("%s (%d images)", a.home, n)}
}

func (a *app) checkCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "check",
		Short: "Report every prerequisite with its status and how to fix it",
		Long: `check probes what hyphae needs on this host and prints each prerequisite
with its status and, when it is missing, a hint. It exits 1 when a required
prerequisite is missing; optional ones (node, cargo, go) only matter for their
kind of project. The VM runtime's entries probe KVM by booting a guest (the
answer is cached for the host's boot), look for firecracker and QEMU, show the
default kernel of each VMM and which VMM --vmm auto picks, and why. The
entries for run --network (nftables over netlink, /dev/net/tun; both need
root) and run --jail (the jailer and its release, the hyphae-fc system user,
cgroups, the chroot base) are optional.`,
		Example: `  hyphae check
  hyphae check --json | jq '.checks[] | select(.status != "ok")'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			vc := &vmChecks{}
			defer vc.close()
			report := a.runChecks(cmd.Context(), slices.Concat(prereqs(), vmPrereqs(vc), netPrereqs()))
			if err := a.emit(report, func(w io.Writer) { printChecks(w, report) }, nil); err != nil {
				return err
			}
			if report.OK {
				return nil
			}
			if !a.json {
				var missing []string
				for _, c := range report.Checks {
					if c.Status == "missing" {
						missing = append(missing, c.Name)
					}
				}
				fmt.Fprintf(a.env.Stderr, "Error: %s: required prerequisites missing: %s\n", errcode.MissingTool, strings.Join(missing, ", "))
			}
			return errSilent
		},
	}
}

func (a *app) runChecks(ctx context.Context, ps []prereq) checkReport {
	report := checkReport{OK: true, Checks: []checkResult{}}
	for _, p := range ps {
		res := p.Probe(ctx, a)
		c := checkResult{Name: p.Name, Required: p.Required, For: p.For, Status: "ok", Detail: res.Detail}
		if !res.OK {
			c.Status, c.Hint = "unavailable", res.Hint
			if p.Required {
				c.Status = "missing"
				report.OK = false
			}
		}
		report.Checks = append(report.Checks, c)
	}
	return report
}

func printChecks(w io.Writer, r checkReport) {
	rows := make([][]string, 0, len(r.Checks))
	for _, c := range r.Checks {
		need := "optional"
		if c.Required {
			need = "required"
		}
		rows = append(rows, []string{c.Name, c.Status, need, c.For, c.Detail})
	}
	table(w, []string{"CHECK", "STATUS", "NEED", "FOR", "DETAIL"}, rows)
	for _, c := range r.Checks {
		if c.Hint != "" {
			fmt.Fprintf(w, "Hint (%s): %s\n", c.Name, c.Hint)
		}
	}
}
