package runner

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hyphae-run/hyphae/internal/testenv"
	"github.com/hyphae-run/hyphae/kernel/kerneltest"
	"github.com/hyphae-run/hyphae/vmm"
	"github.com/hyphae-run/hyphae/vmm/vmmproc"
)

// orphanProcess starts `sleep` the way a dead gateway leaves its VMM: not
// a child of this process (its shell parent exits at once), so nothing
// here reaps or signals it unless the sweep does. It returns the real
// identity; cleanup kills it if it is still that process.
func orphanProcess(t *testing.T) vmmproc.Identity {
	t.Helper()
	return orphanCommand(t, "sleep 300")
}

// orphanCommand is orphanProcess for the shell command cmd.
func orphanCommand(t *testing.T, cmd string) vmmproc.Identity {
	t.Helper()
	out, err := exec.Command("sh", "-c", cmd+" </dev/null >/dev/null 2>&1 & echo $!").Output()
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(out)))
	if err != nil {
		t.Fatal(err)
	}
	ticks, err := vmmproc.StartTicks(pid)
	if err != nil {
		t.Fatal(err)
	}
	exe, err := os.Readlink("/proc/" + strconv.Itoa(pid) + "/exe")
	if err != nil {
		t.Fatal(err)
	}
	id := vmmproc.Identity{PID: pid, StartTicks: ticks, Binary: filepath.Base(exe)}
	if !id.Alive() {
		t.Fatalf("orphan %+v is not alive", id)
	}
	t.Cleanup(func() { _, _ = vmmproc.KillVerified(id, 5*time.Second, nil) })
	return id
}

// ownedDir makes a runtime dir under root marked by owner file name with
// record v, as a previous process would have.
func ownedDir(t *testing.T, root, id, name string, v any) string {
	t.Helper()
	dir := filepath.Join(root, id)
	if err := vmmproc.PrepareDir(dir); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "console.log"), []byte("boot\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if v != nil {
		if err := vmmproc.WriteOwnerFile(dir, name, v); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// The sweep kills the VMMs of this gateway's dead runs (identity checked)
// and removes their dirs; it leaves other gateways', hyphae's, other
// users', unmarked and live dirs, never signals a PID that is now another
// program, and a second sweep finds nothing.
func TestReapOrphanVMs(t *testing.T) {
	root := t.TempDir()
	t.Setenv(vmmproc.EnvRuntimeDir, root)
	const me, other = "/srv/dimension-a", "/srv/dimension-b"
	b := &VMBackend{log: testLogger(t), owner: me, live: map[string]bool{}}

	type dirCase struct {
		name   string
		dir    string
		proc   vmmproc.Identity // a real process to check afterwards
		swept  bool             // the dir must be gone
		killed bool             // the process must be gone
	}
	var cases []dirCase
	add := func(name, id, file string, v any, proc vmmproc.Identity, swept, killed bool) string {
		dir := ownedDir(t, root, id, file, v)
		cases = append(cases, dirCase{name, dir, proc, swept, killed})
		return dir
	}

	orphan := orphanProcess(t)
	add("own orphan, vmm running", "run-own", ownerFile, vmOwner{Gateway: me, ID: "run-own", Run: "r1", VMM: orphan}, orphan, true, true)
	add("own, died before its vmm was spawned", "run-nospawn", ownerFile, vmOwner{Gateway: me, ID: "run-nospawn"}, vmmproc.Identity{}, true, false)

	gone := orphanProcess(t)
	if killed, err := vmmproc.KillVerified(gone, 5*time.Second, nil); err != nil || !killed {
		t.Fatalf("killing the stand-in for a vmm that exited: %v %v", killed, err)
	}
	add("own, vmm already exited", "run-exited", ownerFile, vmOwner{Gateway: me, ID: "run-exited", VMM: gone}, vmmproc.Identity{}, true, false)

	// A PID now used by another program: recorded with another binary, or
	// another start time. The dir goes, the process lives.
	reusedBin := orphanProcess(t)
	wrongBin := reusedBin
	wrongBin.Binary = "qemu-system-x86_64"
	add("own, pid now another binary", "run-reused-bin", ownerFile, vmOwner{Gateway: me, ID: "run-reused-bin", VMM: wrongBin}, reusedBin, true, false)
	reusedTicks := orphanProcess(t)
	wrongTicks := reusedTicks
	wrongTicks.StartTicks--
	add("own, pid now a later process", "run-reused-ticks", ownerFile, vmOwner{Gateway: me, ID: "run-reused-ticks", VMM: wrongTicks}, reusedTicks, true, false)

	// Died between spawning its VMM and recording its identity: only the
	// binary is on record, and the VMM is found by its command line naming
	// the dir (tail stands in: its argument is a file in the dir). A tail
	// of a file elsewhere is not touched.
	spawnDir := filepath.Join(root, "run-spawning")
	add("own, vmm spawned but not recorded", "run-spawning", ownerFile, vmOwner{Gateway: me, ID: "run-spawning", VMM: vmmproc.Identity{Binary: "tail"}}, vmmproc.Identity{}, true, false)
	spawned := orphanCommand(t, "tail -f "+filepath.Join(spawnDir, "console.log"))
	cases[len(cases)-1].proc, cases[len(cases)-1].killed = spawned, true
	elsewhere := filepath.Join(t.TempDir(), "console.log")
	if err := os.WriteFile(elsewhere, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	bystander := orphanCommand(t, "tail -f "+elsewhere)

	others := orphanProcess(t)
	add("another gateway's", "run-other", ownerFile, vmOwner{Gateway: other, ID: "run-other", VMM: others}, others, false, false)
	hyphaes := orphanProcess(t)
	add("hyphae's own vm", "0123456789ab", "hyphae-vm.json",
		map[string]any{"home": me, "id": "0123456789ab", "vmm": hyphaes, "gateway": me}, hyphaes, false, false)
	add("no owner file", "run-unmarked", "", nil, vmmproc.Identity{}, false, false)
	misnamed := orphanProcess(t)
	add("owner file naming another dir", "run-copied", ownerFile, vmOwner{Gateway: me, ID: "run-elsewhere", VMM: misnamed}, misnamed, false, false)
	live := orphanProcess(t)
	add("a vm this process runs now", "run-live", ownerFile, vmOwner{Gateway: me, ID: "run-live", VMM: live}, live, false, false)
	release := b.track("run-live")
	defer release()
	if os.Geteuid() == 0 {
		foreign := orphanProcess(t)
		dir := add("another user's dir", "run-foreign", ownerFile, vmOwner{Gateway: me, ID: "run-foreign", VMM: foreign}, foreign, false, false)
		if err := os.Chown(dir, 65534, 65534); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(root, "run-file"), []byte("{}"), 0o600); err != nil {
		t.Fatal(err)
	}

	removed, err := b.ReapOrphanVMs(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, c := range cases {
		if c.swept {
			want = append(want, c.dir)
		}
	}
	slices.Sort(removed)
	slices.Sort(want)
	if !slices.Equal(removed, want) {
		t.Errorf("removed %v, want %v", removed, want)
	}
	for _, c := range cases {
		if got := exists(c.dir); got == c.swept {
			t.Errorf("%s: dir exists = %v, want %v", c.name, got, !c.swept)
		} else if got && !exists(filepath.Join(c.dir, "console.log")) {
			t.Errorf("%s: the dir was kept but emptied", c.name)
		}
		if c.proc.PID != 0 {
			if got := c.proc.Alive(); got == c.killed {
				t.Errorf("%s: process %d alive = %v, want %v", c.name, c.proc.PID, got, !c.killed)
			}
		}
	}
	if !exists(filepath.Join(root, "run-file")) {
		t.Error("a plain file in the runtime root was removed")
	}
	if !bystander.Alive() {
		t.Error("a process whose command line names no swept dir was killed")
	}

	again, err := b.ReapOrphanVMs(t.Context())
	if err != nil || len(again) != 0 {
		t.Fatalf("second sweep = %v, %v; want nothing", again, err)
	}

	// Without an owner the backend marks nothing and sweeps nothing.
	anon := &VMBackend{log: testLogger(t), live: map[string]bool{}}
	ownedDir(t, root, "run-anon", ownerFile, vmOwner{ID: "run-anon"})
	if got, err := anon.ReapOrphanVMs(t.Context()); err != nil || len(got) != 0 || !exists(filepath.Join(root, "run-anon")) {
		t.Fatalf("ownerless sweep = %v, %v", got, err)
	}
}

// A missing runtime root is nothing to sweep, not an error.
func TestReapOrphanVMsNoRoot(t *testing.T) {
	t.Setenv(vmmproc.EnvRuntimeDir, filepath.Join(t.TempDir(), "absent"))
	b := &VMBackend{log: testLogger(t), owner: "/srv/d", live: map[string]bool{}}
	if got, err := b.ReapOrphanVMs(t.Context()); err != nil || len(got) != 0 {
		t.Fatalf("sweep = %v, %v", got, err)
	}
}

// A real QEMU boot whose gateway "dies" (the session is abandoned, never
// closed): the same backend leaves it alone as a run in flight; a new
// backend with the same owner, as at the next start, kills that QEMU and
// removes its runtime dir with the overlay. One boot.
func TestReapOrphanVMsQEMU(t *testing.T) {
	testenv.RequiresTool(t, "qemu-system-x86_64")
	testenv.RequiresTool(t, "qemu-img")
	kern := kerneltest.Path(t)
	imgs := buildImages(t)
	rtDir, err := os.MkdirTemp("", "rvo")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(rtDir)
	t.Setenv(vmmproc.EnvRuntimeDir, rtDir)
	owner := t.TempDir()
	opts := VMOptions{VMM: vmm.QEMU, Kernel: kern, Owner: owner, Logger: testLogger(t)}

	first, err := NewVMBackend(t.Context(), opts)
	if err != nil {
		t.Fatal(err)
	}
	s, err := first.Start(t.Context(), BootRequest{RunID: "abandoned", ImagePath: imgs.sleeper})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	dirs, _ := filepath.Glob(filepath.Join(rtDir, "run-*"))
	if len(dirs) != 1 {
		t.Fatalf("runtime dirs %v, want one", dirs)
	}
	var o vmOwner
	if err := vmmproc.ReadOwnerFile(dirs[0], ownerFile, &o); err != nil {
		t.Fatal(err)
	}
	if o.Gateway != owner || o.ID != filepath.Base(dirs[0]) || o.Run != "abandoned" || !o.VMM.Alive() {
		t.Fatalf("owner file %+v", o)
	}

	if got, err := first.ReapOrphanVMs(t.Context()); err != nil || len(got) != 0 || !o.VMM.Alive() {
		t.Fatalf("sweep of the running backend = %v, %v; it must keep its own run", got, err)
	}

	next, err := NewVMBackend(t.Context(), opts)
	if err != nil {
		t.Fatal(err)
	}
	got, err := next.ReapOrphanVMs(t.Context())
	if err != nil || !slices.Equal(got, dirs) {
		t.Fatalf("sweep after restart = %v, %v; want %v", got, err, dirs)
	}
	if o.VMM.Alive() || exists(dirs[0]) {
		t.Fatalf("qemu alive %v, dir exists %v after the sweep", o.VMM.Alive(), exists(dirs[0]))
	}
	if pids := qemuUnder(rtDir); len(pids) != 0 {
		t.Fatalf("qemu processes left: %v", pids)
	}
}
