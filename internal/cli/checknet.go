package cli

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"

	"github.com/google/nftables"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/vmm/firecracker"
)

// netPrereqs are the entries of `hyphae check` for `run --network` and
// `run --jail`. All are optional: only those flags need them.
func netPrereqs() []prereq {
	const forNet, forJail = "hyphae run --network", "hyphae run --jail"
	return []prereq{
		{Name: "nftables", For: forNet + " (NAT and isolation rules)", Probe: probeNftables},
		{Name: "/dev/net/tun", For: forNet + " (the guest's TAP)", Probe: probeTun},
		{Name: "jailer", For: forJail, Probe: probeJailer},
		{Name: "jail user", For: forJail + " (Firecracker runs as " + firecracker.DefaultJailUser + ")", Probe: func(context.Context, *app) probeResult {
			uid, gid, err := firecracker.LookupJailUser("")
			if err != nil {
				return errProbe(err)
			}
			return probeResult{OK: true, Detail: fmt.Sprintf("%s (uid %d, gid %d)", firecracker.DefaultJailUser, uid, gid)}
		}},
		{Name: "cgroups", For: forJail + " (CPU and memory limits)", Probe: func(context.Context, *app) probeResult {
			err := firecracker.CheckCgroups(0)
			if err == nil {
				return probeResult{OK: true, Detail: "cgroup v2 with the cpu and memory controllers"}
			}
			if firecracker.CheckCgroups(1) == nil {
				return probeResult{OK: true, Detail: "cgroup v1 (v2 lacks the controllers: " + errText(err) + ")"}
			}
			return errProbe(err)
		}},
		{Name: "chroot base", For: forJail + " (jails under " + firecracker.DefaultChrootBaseDir + ")", Probe: func(context.Context, *app) probeResult {
			if err := firecracker.CheckChrootBase(firecracker.DefaultChrootBaseDir); err != nil {
				return errProbe(err)
			}
			return probeResult{OK: true, Detail: firecracker.DefaultChrootBaseDir + " (not mounted nodev)"}
		}},
	}
}

// errText is a coded error's message without its code.
func errText(err error) string {
	return strings.TrimPrefix(err.Error(), string(errcode.CodeOf(err))+": ")
}

func errProbe(err error) probeResult {
	return probeResult{Detail: errText(err), Hint: errcode.HintOf(err)}
}

// probeNftables lists the tables over a netlink nftables connection, which
// needs CAP_NET_ADMIN and nf_tables in the kernel; nothing is changed.
func probeNftables(context.Context, *app) probeResult {
	c, err := nftables.New()
	if err != nil {
		return probeResult{Detail: "cannot open an nftables netlink connection: " + err.Error(), Hint: "run as root on a kernel with nf_tables"}
	}
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		hint := "load nf_tables (modprobe nf_tables), or use a kernel with CONFIG_NF_TABLES"
		if os.Geteuid() != 0 {
			hint = "networking needs root (or CAP_NET_ADMIN)"
		}
		return probeResult{Detail: "listing nftables tables failed: " + err.Error(), Hint: hint}
	}
	return probeResult{OK: true, Detail: fmt.Sprintf("netlink works (%d inet tables)", len(tables))}
}

// probeTun opens the TUN/TAP clone device, as creating a TAP does.
func probeTun(context.Context, *app) probeResult {
	f, err := os.OpenFile("/dev/net/tun", os.O_RDWR, 0)
	if err != nil {
		hint := "modprobe tun (or mknod /dev/net/tun c 10 200)"
		if os.IsPermission(err) {
			hint = "networking needs root (or CAP_NET_ADMIN)"
		}
		return probeResult{Detail: err.Error(), Hint: hint}
	}
	f.Close()
	return probeResult{OK: true, Detail: "opens"}
}

// probeJailer reports the jailer's version, which must be the release of
// the Firecracker it runs.
func probeJailer(ctx context.Context, _ *app) probeResult {
	const hint = "install the jailer from the same Firecracker release as firecracker, on PATH"
	jv, jpath, err := versionOf(ctx, firecracker.DefaultJailerBinary)
	if err != nil {
		return probeResult{Detail: errText(err), Hint: hint}
	}
	detail := jv + " (" + jpath + ")"
	fv, _, err := versionOf(ctx, firecracker.DefaultBinary)
	if err != nil {
		return probeResult{OK: true, Detail: detail + "; firecracker not found to compare"}
	}
	if releaseOf(jv) != releaseOf(fv) {
		return probeResult{Detail: fmt.Sprintf("%s, but firecracker is %s", detail, fv), Hint: hint}
	}
	return probeResult{OK: true, Detail: detail + ", same release as firecracker"}
}

// versionOf runs program --version and returns its first output line and
// the program's path.
func versionOf(ctx context.Context, program string) (string, string, error) {
	p, err := exec.LookPath(program)
	if err != nil {
		return "", "", errcode.New(errcode.MissingTool, "%s not found on PATH", program)
	}
	ctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, p, "--version").CombinedOutput()
	if err != nil && len(out) == 0 {
		return "", p, errcode.Wrap(errcode.ProcessFailed, err, "%s does not run", p)
	}
	line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	return strings.TrimSpace(line), p, nil
}

// releaseOf picks the version ("v1.16.1") out of a --version line such as
// "Jailer v1.16.1" or "Firecracker v1.16.1".
func releaseOf(line string) string {
	for _, f := range strings.Fields(line) {
		if len(f) > 1 && f[0] == 'v' && f[1] >= '0' && f[1] <= '9' {
			return f
		}
	}
	return line
}
