package registry

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/network"
)

func TestNetAllocations(t *testing.T) {
	ctx := context.Background()
	home := t.TempDir()
	a := openTest(t, home).NetAllocations()
	steps := []struct {
		op   string // "alloc" or "release"
		vm   string
		max  int
		want int
		code errcode.Code
	}{
		{op: "alloc", vm: "a", max: 3, want: 0},
		{op: "alloc", vm: "b", max: 3, want: 1},
		{op: "alloc", vm: "a", max: 3, want: 0}, // again: the same index
		{op: "alloc", vm: "c", max: 3, want: 2},
		{op: "alloc", vm: "d", max: 3, code: errcode.PoolExhausted},
		{op: "release", vm: "b"},
		{op: "release", vm: "b"},                // releasing twice is fine
		{op: "alloc", vm: "d", max: 3, want: 1}, // the lowest free index
		{op: "release", vm: "a"},
		{op: "alloc", vm: "e", max: 3, want: 0},
		{op: "alloc", vm: "", max: 3, code: errcode.InvalidArgument},
		{op: "alloc", vm: "f", max: 0, code: errcode.PoolExhausted},
	}
	for i, s := range steps {
		if s.op == "release" {
			if err := a.Release(ctx, s.vm); err != nil {
				t.Fatalf("step %d: Release(%s): %v", i, s.vm, err)
			}
			continue
		}
		got, err := a.Allocate(ctx, s.vm, s.max)
		switch {
		case s.code != "":
			if !errcode.HasCode(err, s.code) {
				t.Fatalf("step %d: Allocate(%s) = %d, %v; want %s", i, s.vm, got, err, s.code)
			}
		case err != nil || got != s.want:
			t.Fatalf("step %d: Allocate(%s) = %d, %v; want %d", i, s.vm, got, err, s.want)
		}
	}
	want := []network.Allocation{{VMID: "e", Index: 0}, {VMID: "d", Index: 1}, {VMID: "c", Index: 2}}
	list, err := a.List(ctx)
	if err != nil || !slices.Equal(list, want) {
		t.Fatalf("List = %v, %v; want %v", list, err, want)
	}
	// Allocations survive reopening.
	list, err = openTest(t, home).NetAllocations().List(ctx)
	if err != nil || !slices.Equal(list, want) {
		t.Fatalf("List after reopen = %v, %v", list, err)
	}
}

// netAllocWorkerEnv makes TestNetAllocWorker act as one of the processes
// of TestNetAllocConcurrentProcesses: "home,id".
const netAllocWorkerEnv = "HYPHAE_NETALLOC_TEST_WORKER"

const netAllocOps = 200

// TestNetAllocWorker is the body of a worker process: it allocates
// netAllocOps leases, releasing every third right away, and prints the
// indexes it holds at the end as "vm=index" lines.
func TestNetAllocWorker(t *testing.T) {
	spec := os.Getenv(netAllocWorkerEnv)
	if spec == "" {
		t.Skip("worker process of TestNetAllocConcurrentProcesses")
	}
	home, id, _ := strings.Cut(spec, ",")
	ctx := context.Background()
	r, err := Open(ctx, home, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	a := r.NetAllocations()
	held := map[string]int{}
	for i := range netAllocOps {
		vm := fmt.Sprintf("w%s-vm%d", id, i)
		idx, err := a.Allocate(ctx, vm, 1000)
		if err != nil {
			t.Fatalf("allocate %s: %v", vm, err)
		}
		held[vm] = idx
		if i%3 == 2 {
			if err := a.Release(ctx, vm); err != nil {
				t.Fatalf("release %s: %v", vm, err)
			}
			delete(held, vm)
		}
	}
	for vm, idx := range held {
		fmt.Printf("held %s=%d\n", vm, idx)
	}
}

// TestNetAllocConcurrentProcesses runs two processes allocating from one
// registry at once: no index is ever handed to two VMs, and the table
// ends holding exactly what each process kept.
func TestNetAllocConcurrentProcesses(t *testing.T) {
	home := t.TempDir()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	var cmds []*exec.Cmd
	outs := make([]*strings.Builder, 2)
	for i := range 2 {
		cmd := exec.Command(exe, "-test.run=^TestNetAllocWorker$", "-test.v")
		cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s,%d", netAllocWorkerEnv, home, i))
		outs[i] = &strings.Builder{}
		cmd.Stdout, cmd.Stderr = outs[i], outs[i]
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		cmds = append(cmds, cmd)
	}
	held := map[string]int{}
	for i, cmd := range cmds {
		if err := cmd.Wait(); err != nil {
			t.Fatalf("worker %d: %v\n%s", i, err, outs[i])
		}
		for _, line := range strings.Split(outs[i].String(), "\n") {
			rest, ok := strings.CutPrefix(line, "held ")
			if !ok {
				continue
			}
			vm, idx, _ := strings.Cut(rest, "=")
			n, err := strconv.Atoi(idx)
			if err != nil {
				t.Fatalf("worker %d printed %q", i, line)
			}
			held[vm] = n
		}
	}
	perWorker := netAllocOps - netAllocOps/3
	if len(held) != 2*perWorker {
		t.Fatalf("workers report %d leases, want %d", len(held), 2*perWorker)
	}
	list, err := openTest(t, home).NetAllocations().List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	seen := map[int]string{}
	for _, al := range list {
		if other, dup := seen[al.Index]; dup {
			t.Errorf("index %d held by %s and %s", al.Index, other, al.VMID)
		}
		seen[al.Index] = al.VMID
		if held[al.VMID] != al.Index {
			t.Errorf("%s holds %d in the registry, its process saw %d", al.VMID, al.Index, held[al.VMID])
		}
	}
	if len(list) != len(held) {
		t.Errorf("registry holds %d leases, workers %d", len(list), len(held))
	}
}
