package network

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/hyphae-run/hyphae/guest"
	"github.com/hyphae-run/hyphae/internal/testenv"
	"github.com/hyphae-run/hyphae/kernel/kerneltest"
	"github.com/hyphae-run/hyphae/vmm"
	"github.com/hyphae-run/hyphae/vmm/qemu"
)

// qemuBootTimeout bounds one guest run under TCG on a busy 2-core host.
const qemuBootTimeout = 3 * time.Minute

// TestQEMUGuestNetwork boots a real guest under QEMU/TCG with Debian's
// cloud kernel on a TAP that Setup made in a "host" namespace, where QEMU
// runs too. The host namespace's uplink is a veth to a "remote" namespace
// (198.51.100.2/24) with no route back to the pool. The guest's program
// dials a server in the remote namespace, which must see the masqueraded
// uplink address, and a server on the host's TAP address, which the
// filter must drop. Nothing leaves the namespaces the test made.
func TestQEMUGuestNetwork(t *testing.T) {
	testenv.RequiresRoot(t)
	bin := testenv.RequiresTool(t, qemu.DefaultBinary)
	testenv.RequiresTool(t, "qemu-img")
	testenv.RequiresTool(t, "mkfs.ext4")
	kernelPath := kerneltest.Path(t)

	host, remote := newTestNS(t, "host"), newTestNS(t, "remote")
	run(t, "ip", "-n", host.name, "link", "add", "up0", "type", "veth", "peer", "name", "up0", "netns", remote.name)
	host.ip(t, "addr", "add", "198.51.100.1/24", "dev", "up0")
	host.ip(t, "link", "set", "up0", "up")
	remote.ip(t, "addr", "add", "198.51.100.2/24", "dev", "up0")
	remote.ip(t, "link", "set", "up0", "up")
	m := newTestManager(t, host, Config{Uplink: "up0"})

	public := listenIn(t, remote, "198.51.100.2:8080")
	hostSvc := listenIn(t, host, "0.0.0.0:9090")

	ctx, cancel := context.WithTimeout(context.Background(), qemuBootTimeout)
	defer cancel()
	const vmID = "qemu-net"
	att, err := m.Setup(ctx, vmID, Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Teardown(context.Background(), vmID) })
	remoteAddr, hostAddr := "198.51.100.2:8080", net.JoinHostPort(att.HostIP.String(), "9090")

	spec := vmm.Spec{
		ID: vmID, VCPUs: 1, MemoryMiB: 256, Kernel: kernelPath, BootArgs: "quiet",
		Drives:     []vmm.Drive{{ID: "root", Path: netprobeImage(t, remoteAddr, hostAddr), Root: true}},
		RuntimeDir: filepath.Join(t.TempDir(), "vm"),
	}
	nic := vmm.NetworkInterface{ID: "eth0", TapName: att.TapName, MAC: att.MAC.String()}
	modStart := time.Now()
	if err := qemu.AddNetwork(ctx, &spec, nic, att.BootArgs, qemu.NetworkOptions{ModulesCache: t.TempDir()}); err != nil {
		t.Fatal(err)
	}
	modTime := time.Since(modStart)
	vm, err := qemu.New(spec, qemu.Options{Binary: bin, Accel: qemu.AccelTCG})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = vm.Cleanup() })

	// QEMU opens the TAP by name in its own network namespace, so it is
	// spawned from a thread inside the host namespace.
	bootStart := time.Now()
	if err := inNamespace(host, func() error { return vm.Start(ctx) }); err != nil {
		t.Fatal(err)
	}
	pid := vm.Info().PID
	if err := vm.Wait(ctx); err != nil {
		t.Fatalf("guest did not finish: %v\n%s", err, consoleOf(t, vm))
	}
	wall := time.Since(bootStart)
	console := consoleOf(t, vm)
	lines := map[string]string{}
	for _, l := range strings.Split(console, "\n") {
		if rest, ok := strings.CutPrefix(strings.TrimSpace(l), "netprobe: "); ok {
			k, v, _ := strings.Cut(rest, " ")
			lines[k] = v
		}
	}
	if _, ok := lines["done"]; !ok {
		t.Fatalf("the guest program did not finish; console:\n%s", console)
	}

	// Through NAT: the remote saw the host's uplink address.
	if got := lines[remoteAddr]; !strings.HasPrefix(got, "ok 198.51.100.1:") {
		t.Errorf("guest → remote %s: %q, want ok with the masqueraded 198.51.100.1", remoteAddr, got)
	}
	if seen := public.connections(); len(seen) != 1 || !strings.Contains(seen[0], "<-198.51.100.1:") {
		t.Errorf("remote server saw %v, want one connection from 198.51.100.1", seen)
	}
	// The host's own services are out of reach.
	if got := lines[hostAddr]; !strings.HasPrefix(got, "fail") {
		t.Errorf("guest → host %s: %q, want it blocked", hostAddr, got)
	}
	if seen := hostSvc.connections(); len(seen) != 0 {
		t.Errorf("host server saw %v", seen)
	}
	dropped := 0
	for _, r := range host.listRules(t).rulesOf("vm-" + vmID + "-host") {
		if strings.Contains(r.Expr, `"drop"`) {
			dropped += r.Packets
		}
	}
	if dropped == 0 {
		t.Error("no packet counted by the guest → host drop rule")
	}
	if st, ok := guest.ParseStatusLine(lastStatusLine(console)); !ok || st.ExitCode != 0 {
		t.Errorf("guest status %+v (%v)", st, ok)
	}
	t.Logf("modules drive ready in %v; boot to exit %v wall (TCG), guest uptime at the program: %s",
		modTime.Round(time.Millisecond), wall.Round(time.Millisecond), lines["uptime"])

	// Afterwards: no QEMU, no TAP, no rules.
	if err := vm.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if err := m.Teardown(context.Background(), vmID); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pid, 0); err == nil {
		t.Errorf("qemu (pid %d) still runs", pid)
	}
	if host.hasLink(t, att.TapName) {
		t.Errorf("%s left in the host namespace", att.TapName)
	}
	if host.listRules(t).mentions(vmID) {
		t.Error("rules of the VM left")
	}
	if t.Failed() {
		t.Logf("console:\n%s", console)
	}
}

// inNamespace runs fn on a thread inside ns; processes fn spawns start
// there. The thread stays locked, so Go discards it afterwards.
func inNamespace(ns *testNS, fn func() error) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := netns.Set(ns.ns.handle); err != nil {
			done <- err
			return
		}
		done <- fn()
	}()
	return <-done
}

// netprobeImage builds a root filesystem with hyphae-init and
// testdata/netprobe as the entrypoint, dialing addrs.
func netprobeImage(t *testing.T, addrs ...string) string {
	t.Helper()
	libexec := testenv.GuestBinaries(t, "hyphae-init")
	tree := t.TempDir()
	for _, d := range []string{"sbin", "bin", "etc/hyphae", "dev", "proc", "sys", "run", "tmp"} {
		if err := os.MkdirAll(filepath.Join(tree, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	initBin, err := os.ReadFile(filepath.Join(libexec, "hyphae-init"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(tree, "sbin", "init"), initBin, 0o755); err != nil {
		t.Fatal(err)
	}
	build := exec.Command("go", "build", "-trimpath", "-o", filepath.Join(tree, "bin", "netprobe"), "./testdata/netprobe")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build netprobe: %v\n%s", err, out)
	}
	ep, err := guest.EncodeEntrypoint(append([]string{"/bin/netprobe"}, addrs...))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(tree, "etc", "hyphae", "entrypoint"), ep, 0o644); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(t.TempDir(), "root.ext4")
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-d", tree, img, "64M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	return img
}

func consoleOf(t *testing.T, vm *qemu.Machine) string {
	t.Helper()
	r, err := vm.Console()
	if err != nil {
		return fmt.Sprintf("<no console: %v>", err)
	}
	defer r.Close()
	b, _ := io.ReadAll(r)
	return string(b)
}

// lastStatusLine returns the last line that is init's status line.
func lastStatusLine(console string) string {
	last := ""
	sc := bufio.NewScanner(strings.NewReader(console))
	for sc.Scan() {
		if _, ok := guest.ParseStatusLine(strings.TrimSpace(sc.Text())); ok {
			last = strings.TrimSpace(sc.Text())
		}
	}
	return last
}
