package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/hyphae-run/hyphae/guest"
	"github.com/hyphae-run/hyphae/internal/testenv"
	"github.com/hyphae-run/hyphae/kernel/kerneltest"
	"github.com/hyphae-run/hyphae/network"
	"github.com/hyphae-run/hyphae/registry"
)

// The addresses of the networking tests: a "remote" namespace on a veth
// from the namespace hyphae runs in ("host"), in TEST-NET-2, with no route
// back to the pool, so the remote can only answer masqueraded traffic.
const (
	hostUplinkIP = "198.51.100.1"
	remoteIP     = "198.51.100.2"
	remotePort   = "8080"
	hostPort     = "9090"
	// allowedPort is a host-side port the guest may reach with --allow.
	allowedPort = "9091"
)

// netLab is the pair of network namespaces a networking test runs in. The
// host's own namespace is never touched: hyphae runs in "host" through
// `ip netns exec`, with its QEMU, TAP and nftables table.
type netLab struct {
	host, remote string
	// remoteSeen, hostSeen and allowedSeen record the peers of the
	// connections the test servers accepted.
	remoteSeen, hostSeen, allowedSeen *peers
}

type peers struct {
	mu   sync.Mutex
	seen []string
}

func (p *peers) add(s string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.seen = append(p.seen, s)
}

func (p *peers) list() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.seen...)
}

func newNetLab(t *testing.T) *netLab {
	t.Helper()
	testenv.RequiresTool(t, "ip")
	testenv.RequiresTool(t, "nft")
	tag := fmt.Sprintf("%d-%d", os.Getpid(), time.Now().UnixNano()%100000)
	l := &netLab{host: "hye2e-h" + tag, remote: "hye2e-r" + tag, remoteSeen: &peers{}, hostSeen: &peers{}, allowedSeen: &peers{}}
	for _, ns := range []string{l.host, l.remote} {
		mustRun(t, "ip", "netns", "add", ns)
		t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
		mustRun(t, "ip", "-n", ns, "link", "set", "lo", "up")
	}
	mustRun(t, "ip", "-n", l.host, "link", "add", "up0", "type", "veth", "peer", "name", "up0", "netns", l.remote)
	mustRun(t, "ip", "-n", l.host, "addr", "add", hostUplinkIP+"/24", "dev", "up0")
	mustRun(t, "ip", "-n", l.host, "link", "set", "up0", "up")
	mustRun(t, "ip", "-n", l.remote, "addr", "add", remoteIP+"/24", "dev", "up0")
	mustRun(t, "ip", "-n", l.remote, "link", "set", "up0", "up")
	serveIn(t, l.remote, net.JoinHostPort(remoteIP, remotePort), l.remoteSeen)
	serveIn(t, l.host, net.JoinHostPort("0.0.0.0", hostPort), l.hostSeen)
	serveIn(t, l.host, net.JoinHostPort("0.0.0.0", allowedPort), l.allowedSeen)
	return l
}

func mustRun(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// serveIn listens on addr inside namespace ns and answers every
// connection with the peer address it saw, recorded in seen. The socket
// belongs to the namespace it was created in, so only the listen needs a
// thread inside it.
func serveIn(t *testing.T, ns, addr string, seen *peers) {
	t.Helper()
	type result struct {
		ln  net.Listener
		err error
	}
	done := make(chan result, 1)
	go func() {
		// The thread stays locked and is discarded when this goroutine
		// ends, so no other goroutine runs in the namespace.
		runtime.LockOSThread()
		h, err := netns.GetFromName(ns)
		if err != nil {
			done <- result{err: err}
			return
		}
		defer h.Close()
		if err := netns.Set(h); err != nil {
			done <- result{err: err}
			return
		}
		ln, err := net.Listen("tcp4", addr)
		done <- result{ln, err}
	}()
	r := <-done
	if r.err != nil {
		t.Fatalf("listen on %s in %s: %v", addr, ns, r.err)
	}
	t.Cleanup(func() { r.ln.Close() })
	go func() {
		for {
			c, err := r.ln.Accept()
			if err != nil {
				return
			}
			seen.add(c.RemoteAddr().String())
			fmt.Fprintln(c, c.RemoteAddr().String())
			c.Close()
		}
	}()
}

// hyphaeIn runs hyphae inside namespace ns with extra environment.
func (e *env) hyphaeIn(t *testing.T, ns string, extraEnv []string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), commandTimeout)
	defer cancel()
	cmd := e.command(ctx, args...)
	cmd.Args = append([]string{"ip", "netns", "exec", ns}, cmd.Args...)
	cmd.Path = mustLookPath(t, "ip")
	cmd.Env = append(cmd.Env, extraEnv...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	r := result{stdout: out.String(), stderr: errOut.String()}
	if ee, ok := err.(*exec.ExitError); ok {
		r.code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("hyphae %v in %s: %v", args, ns, err)
	}
	return r
}

func mustLookPath(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// buildNetGuest builds testdata/netguest statically and packs it with
// `hyphae build --binary` as netguest.
func (e *env) buildNetGuest(t *testing.T) {
	t.Helper()
	prog := filepath.Join(t.TempDir(), "netguest")
	build := exec.Command("go", "build", "-trimpath", "-o", prog, "./testdata/netguest")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build netguest: %v\n%s", err, out)
	}
	if r := e.hyphae(t, "build", "--binary", prog, "--name", "netguest", "-q"); r.code != 0 {
		t.Fatalf("hyphae build --binary: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
}

// probeLines maps each "netguest: KEY VALUE" line of out to its value.
func probeLines(out string) map[string]string {
	lines := map[string]string{}
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "netguest: "); ok {
			k, v, _ := strings.Cut(rest, " ")
			if lines[k] != "" {
				v = lines[k] + "\n" + v
			}
			lines[k] = v
		}
	}
	return lines
}

// assertNoNetLeftovers checks the host namespace of l and the registry:
// no hyphae TAP, no hyphae nftables table, no lease, and (from inside the
// namespace) no VM row, runtime dir or QEMU.
func (e *env) assertNoNetLeftovers(t *testing.T, l *netLab) {
	t.Helper()
	if taps := l.taps(t); len(taps) != 0 {
		t.Errorf("TAPs left in %s: %v", l.host, taps)
	}
	if l.hasTable(t) {
		t.Errorf("table inet %s left in %s", network.TableName, l.host)
	}
	if leases := e.leases(t); len(leases) != 0 {
		t.Errorf("network leases left: %+v", leases)
	}
	r := e.hyphaeIn(t, l.host, nil, "list", "vms", "--json")
	if r.code != 0 || strings.TrimSpace(r.stdout) != "[]" {
		t.Errorf("list vms in %s: exit %d, %s%s", l.host, r.code, r.stdout, r.stderr)
	}
	e.assertNoLeftovers(t)
}

// taps lists the hyphae TAPs in the host namespace.
func (l *netLab) taps(t *testing.T) []string {
	t.Helper()
	var links []struct {
		Name string `json:"ifname"`
	}
	if err := json.Unmarshal([]byte(mustRun(t, "ip", "-n", l.host, "-j", "link", "show")), &links); err != nil {
		t.Fatal(err)
	}
	var taps []string
	for _, k := range links {
		if strings.HasPrefix(k.Name, network.TapPrefix) {
			taps = append(taps, k.Name)
		}
	}
	return taps
}

// hasTable reads the host namespace's ruleset back with nft.
func (l *netLab) hasTable(t *testing.T) bool {
	t.Helper()
	var rs struct {
		Nftables []struct {
			Table *struct {
				Family string `json:"family"`
				Name   string `json:"name"`
			} `json:"table"`
		} `json:"nftables"`
	}
	if err := json.Unmarshal([]byte(mustRun(t, "ip", "netns", "exec", l.host, "nft", "-j", "list", "ruleset")), &rs); err != nil {
		t.Fatal(err)
	}
	for _, o := range rs.Nftables {
		if o.Table != nil && o.Table.Family == "inet" && o.Table.Name == network.TableName {
			return true
		}
	}
	return false
}

// runtimeDirs lists the VM directories under the runtime dir root.
func runtimeDirs(root string) []string {
	var dirs []string
	entries, _ := os.ReadDir(root)
	for _, d := range entries {
		if d.IsDir() {
			dirs = append(dirs, d.Name())
		}
	}
	return dirs
}

// leases reads the registry's network allocations.
func (e *env) leases(t *testing.T) []network.Allocation {
	t.Helper()
	reg, err := registry.Open(context.Background(), e.home, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	list, err := reg.NetAllocations().List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return list
}

// TestNetwork boots the netguest program under QEMU/TCG with --network in
// a namespace the test made: it reaches a server in the remote namespace
// through NAT (which sees the host's masqueraded uplink address), cannot
// reach a server on its TAP's host address, but can reach the one port
// --allow opens there; it gets a resolv.conf, and its exit code is
// hyphae's. Afterwards nothing of the VM's network remains.
func TestNetwork(t *testing.T) {
	e := setup(t)
	l := newNetLab(t)
	e.buildNetGuest(t)
	remote := net.JoinHostPort(remoteIP, remotePort)
	// A one-lease pool makes the TAP's host address known in advance.
	pool := []string{"HYPHAE_NET_POOL=10.213.5.0/30"}
	const tapHost = "10.213.5.1"

	began := time.Now()
	r := e.hyphaeIn(t, l.host, pool, "run", "netguest", "--network", "--allow", tapHost+":"+allowedPort,
		"--env", "NETGUEST_DIAL="+remote+",gw:"+hostPort+",gw:"+allowedPort, "--env", "NETGUEST_EXIT=5")
	wall := time.Since(began)
	if r.code != 5 {
		t.Fatalf("hyphae run --network: exit %d, want the program's 5\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
	}
	lines := probeLines(r.stdout)
	if got := lines[remote]; !strings.HasPrefix(got, "ok "+hostUplinkIP+":") {
		t.Errorf("guest → remote %s: %q, want ok, seen from the masqueraded %s", remote, got, hostUplinkIP)
	}
	if seen := l.remoteSeen.list(); len(seen) != 1 || !strings.HasPrefix(seen[0], hostUplinkIP+":") {
		t.Errorf("the remote server saw %v, want one connection from %s", seen, hostUplinkIP)
	}
	if got := lines["gw:"+hostPort]; !strings.HasPrefix(got, "fail") {
		t.Errorf("guest → its TAP's host address: %q, want it blocked", got)
	}
	if seen := l.hostSeen.list(); len(seen) != 0 {
		t.Errorf("the server on the host side saw %v, want nothing", seen)
	}
	// Not masqueraded: the host sees the guest's own address.
	if got := lines["gw:"+allowedPort]; !strings.HasPrefix(got, "ok 10.213.5.2:") {
		t.Errorf("guest → allowed %s:%s: %q, want ok from the guest's 10.213.5.2", tapHost, allowedPort, got)
	}
	if seen := l.allowedSeen.list(); len(seen) != 1 {
		t.Errorf("the allowed server saw %v, want one connection", seen)
	}
	if !strings.Contains(lines["resolv"], "nameserver") {
		t.Errorf("the guest has no resolv.conf nameserver: %q", lines["resolv"])
	}
	e.assertNoNetLeftovers(t, l)
	t.Logf("hyphae run --network, boot to exit including a 4 s blocked dial: %v wall (TCG)", wall.Round(time.Millisecond))
}

// TestNetworkDetachedAndPoolExhausted runs a networked VM (on the
// Firecracker-style kernel, under QEMU) detached in a
// one-lease pool ($HYPHAE_NET_POOL): inspect shows its lease and NIC, and
// the guest reaches the remote. A second networked run then fails with
// E801 before anything is spawned and leaves nothing behind; stopping the
// first removes its TAP, rules and lease.
func TestNetworkDetachedAndPoolExhausted(t *testing.T) {
	e := setup(t)
	l := newNetLab(t)
	e.buildNetGuest(t)
	pool := []string{"HYPHAE_NET_POOL=10.213.7.0/30"}
	remote := net.JoinHostPort(remoteIP, remotePort)

	// On the Firecracker-style kernel (TestNetwork uses Debian's): its
	// virtio-net and IP autoconfiguration are built in, so no modules
	// drive is attached and the kernel applies ip= before hyphae-init
	// (which applies it again, idempotently).
	r := e.hyphaeIn(t, l.host, pool, "run", "netguest", "--network", "--detach", "--json", "--kernel", kerneltest.FirecrackerPath(t),
		"--env", "NETGUEST_DIAL="+remote, "--env", "NETGUEST_HOLD=1")
	var d struct {
		ID string `json:"id"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &d); r.code != 0 || err != nil || d.ID == "" {
		t.Fatalf("run --network --detach: exit %d, %s%s", r.code, r.stdout, r.stderr)
	}
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			e.hyphaeIn(t, l.host, pool, "stop", d.ID)
		}
	})

	var in struct {
		Network struct {
			TapName string `json:"tap_name"`
			GuestIP string `json:"guest_ip"`
			HostIP  string `json:"host_ip"`
			NAT     bool   `json:"nat"`
		} `json:"network"`
		Spec struct {
			BootArgs string `json:"boot_args"`
			Network  []struct {
				TapName string `json:"tap_name"`
				MAC     string `json:"mac"`
			} `json:"network"`
		} `json:"spec"`
	}
	r = e.hyphaeIn(t, l.host, pool, "inspect", d.ID, "--json")
	if err := json.Unmarshal([]byte(r.stdout), &in); r.code != 0 || err != nil {
		t.Fatalf("inspect: exit %d, %s%s", r.code, r.stdout, r.stderr)
	}
	if in.Network.TapName != "hyphae-tap0" || in.Network.GuestIP != "10.213.7.2" || in.Network.HostIP != "10.213.7.1" || !in.Network.NAT ||
		len(in.Spec.Network) != 1 || in.Spec.Network[0].TapName != "hyphae-tap0" || in.Spec.Network[0].MAC != "06:00:0a:d5:07:02" ||
		!strings.Contains(in.Spec.BootArgs, "ip=10.213.7.2::10.213.7.1:255.255.255.252::eth0:off") {
		t.Errorf("inspect = %+v", in)
	}
	if strings.Contains(in.Spec.BootArgs, guest.CmdlineModules+"=") {
		t.Errorf("a modules drive for a kernel with its NIC drivers built in: boot args %q", in.Spec.BootArgs)
	}
	if taps := l.taps(t); len(taps) != 1 || taps[0] != "hyphae-tap0" || !l.hasTable(t) {
		t.Errorf("while the VM runs: TAPs %v, table %v", taps, l.hasTable(t))
	}
	// The detached guest got through too.
	deadline := time.Now().Add(commandTimeout)
	var logs string
	for time.Now().Before(deadline) {
		logs = e.hyphaeIn(t, l.host, pool, "logs", d.ID).stdout
		if strings.Contains(logs, "netguest: holding") {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	if got := probeLines(logs)[remote]; !strings.HasPrefix(got, "ok "+hostUplinkIP+":") {
		t.Errorf("detached guest → remote: %q; logs:\n%s", got, logs)
	}

	// The pool's only lease is taken.
	before := qemuProcesses(e.rt)
	r = e.hyphaeIn(t, l.host, pool, "run", "netguest", "--network", "--json")
	var fail struct {
		Error struct {
			Code string `json:"code"`
		} `json:"error"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &fail); err != nil || r.code != 1 || fail.Error.Code != "E801" {
		t.Errorf("run in an exhausted pool: exit %d, %s%s; want E801", r.code, r.stdout, r.stderr)
	}
	var vms []vmJSON
	r = e.hyphaeIn(t, l.host, pool, "list", "vms", "--json")
	if err := json.Unmarshal([]byte(r.stdout), &vms); err != nil || len(vms) != 1 || vms[0].ID != d.ID {
		t.Errorf("after the refused run: list vms = %s (want only %s)", r.stdout, d.ID)
	}
	if dirs := runtimeDirs(e.rt); len(dirs) != 1 || dirs[0] != d.ID {
		t.Errorf("after the refused run: runtime dirs %v, want only the detached VM's", dirs)
	}
	if after := qemuProcesses(e.rt); len(after) != len(before) {
		t.Errorf("the refused run spawned QEMU: %v, before %v", after, before)
	}
	if leases := e.leases(t); len(leases) != 1 || leases[0].VMID != d.ID {
		t.Errorf("after the refused run: leases %+v", leases)
	}
	if taps := l.taps(t); len(taps) != 1 {
		t.Errorf("after the refused run: TAPs %v", taps)
	}

	r = e.hyphaeIn(t, l.host, pool, "stop", d.ID, "--timeout", "30s")
	stopped = true
	if r.code != 0 {
		t.Fatalf("stop: exit %d, %s%s", r.code, r.stdout, r.stderr)
	}
	e.assertNoNetLeftovers(t, l)
}

// TestNetworkRefusals: network and jail flags that cannot work are refused
// with a code before anything is set up.
func TestNetworkRefusals(t *testing.T) {
	e := setup(t)
	e.build(t, "hello-go", "hello-go")
	for _, tt := range []struct {
		args []string
		exit int
		code string
	}{
		{[]string{"--network", "--allow", "10.0.0.1/8"}, 2, "E201"},
		{[]string{"--network", "--allow", "10.0.0.0/8:http"}, 2, "E201"},
		{[]string{"--no-nat"}, 1, "E201"},
		{[]string{"--allow", "10.0.0.0/8"}, 1, "E201"},
		{[]string{"--jail", "--vmm", "qemu"}, 1, "E201"},
	} {
		r := e.hyphae(t, append([]string{"run", "hello-go", "--json"}, tt.args...)...)
		var doc struct {
			Error struct {
				Code string `json:"code"`
			} `json:"error"`
		}
		if err := json.Unmarshal([]byte(r.stdout), &doc); err != nil || r.code != tt.exit || doc.Error.Code != tt.code {
			t.Errorf("run %v: exit %d, %s%s; want exit %d with %s", tt.args, r.code, r.stdout, r.stderr, tt.exit, tt.code)
		}
	}
	e.assertNoLeftovers(t)
	if leases := e.leases(t); len(leases) != 0 {
		t.Errorf("leases after refusals: %+v", leases)
	}
}
