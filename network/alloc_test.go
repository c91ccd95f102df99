package network

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/hyphae-run/hyphae/errcode"
)

func TestFileAllocations(t *testing.T) {
	ctx := context.Background()
	a := FileAllocations(filepath.Join(t.TempDir(), "sub", "alloc.json"))
	steps := []struct {
		op, vm string
		want   int
		code   errcode.Code
	}{
		{"alloc", "a", 0, ""},
		{"alloc", "b", 1, ""},
		{"alloc", "a", 0, ""}, // idempotent
		{"alloc", "c", 2, ""},
		{"alloc", "d", 0, errcode.PoolExhausted},
		{"release", "b", 0, ""},
		{"release", "b", 0, ""}, // idempotent
		{"alloc", "d", 1, ""},   // lowest free index is reused
		{"release", "nobody", 0, ""},
	}
	for i, s := range steps {
		switch s.op {
		case "alloc":
			got, err := a.Allocate(ctx, s.vm, 3)
			if s.code != "" {
				if !errcode.HasCode(err, s.code) {
					t.Fatalf("step %d: Allocate(%s) = %d, %v; want %s", i, s.vm, got, err, s.code)
				}
				continue
			}
			if err != nil || got != s.want {
				t.Fatalf("step %d: Allocate(%s) = %d, %v; want %d", i, s.vm, got, err, s.want)
			}
		case "release":
			if err := a.Release(ctx, s.vm); err != nil {
				t.Fatalf("step %d: Release(%s): %v", i, s.vm, err)
			}
		}
	}
	list, err := a.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := []Allocation{{"a", 0}, {"d", 1}, {"c", 2}}
	if fmt.Sprint(list) != fmt.Sprint(want) {
		t.Errorf("List = %v, want %v", list, want)
	}
}

func TestFileAllocationsCorruptAndCancelled(t *testing.T) {
	path := filepath.Join(t.TempDir(), "alloc.json")
	if err := os.WriteFile(path, []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := FileAllocations(path).Allocate(context.Background(), "a", 4); !errcode.HasCode(err, errcode.Corrupt) {
		t.Errorf("corrupt file: %v, want E505", err)
	}
	// With the lock held elsewhere (flock locks belong to the open file, so
	// a second open in this process conflicts), a call whose context ends
	// returns a coded error instead of waiting forever.
	os.Remove(path)
	lock, err := os.OpenFile(path+".lock", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := FileAllocations(path).Allocate(ctx, "a", 4); !errcode.HasCode(err, errcode.Timeout) {
		t.Errorf("cancelled wait: %v, want E302", err)
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_UN); err != nil {
		t.Fatal(err)
	}
	if _, err := FileAllocations(path).Allocate(context.Background(), "a", 4); err != nil {
		t.Errorf("after unlock: %v", err)
	}
}

// TestFileAllocationsAcrossProcesses runs several processes that allocate
// concurrently from one file: every VM must get an index, no index twice,
// and exactly the pool's size must succeed when there are more VMs than
// addresses.
func TestFileAllocationsAcrossProcesses(t *testing.T) {
	if testing.Short() {
		t.Skip("spawns processes")
	}
	tests := []struct {
		name         string
		procs, perVM int
		max          int
		wantOK       int
	}{
		{"room for all", 3, 40, 1000, 120},
		{"more VMs than addresses", 3, 40, 50, 50},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "alloc.json")
			cmds := make([]*exec.Cmd, tt.procs)
			outs := make([]*strings.Builder, tt.procs)
			for p := range cmds {
				cmd := exec.Command(os.Args[0], "-test.run=^TestAllocHelperProcess$")
				cmd.Env = append(os.Environ(), "HYPHAE_ALLOC_HELPER="+path,
					"HYPHAE_ALLOC_PREFIX=p"+strconv.Itoa(p), "HYPHAE_ALLOC_N="+strconv.Itoa(tt.perVM),
					"HYPHAE_ALLOC_MAX="+strconv.Itoa(tt.max))
				outs[p] = &strings.Builder{}
				cmd.Stdout, cmd.Stderr = outs[p], outs[p]
				if err := cmd.Start(); err != nil {
					t.Fatal(err)
				}
				cmds[p] = cmd
			}
			ok, exhausted := 0, 0
			for p, cmd := range cmds {
				if err := cmd.Wait(); err != nil {
					t.Fatalf("helper %d: %v\n%s", p, err, outs[p])
				}
				for _, line := range strings.Split(outs[p].String(), "\n") {
					switch {
					case strings.HasPrefix(line, "ok "):
						ok++
					case strings.HasPrefix(line, "exhausted "):
						exhausted++
					}
				}
			}
			if ok != tt.wantOK || ok+exhausted != tt.procs*tt.perVM {
				t.Errorf("ok=%d exhausted=%d, want ok=%d of %d", ok, exhausted, tt.wantOK, tt.procs*tt.perVM)
			}
			list, err := FileAllocations(path).List(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			seen := map[int]string{}
			for _, a := range list {
				if other, dup := seen[a.Index]; dup {
					t.Errorf("index %d given to %s and %s", a.Index, other, a.VMID)
				}
				seen[a.Index] = a.VMID
				if a.Index < 0 || a.Index >= tt.max {
					t.Errorf("index %d outside [0,%d)", a.Index, tt.max)
				}
			}
			if len(list) != tt.wantOK {
				t.Errorf("%d allocations recorded, want %d (lost updates?)", len(list), tt.wantOK)
			}
		})
	}
}

// TestAllocHelperProcess is the child of TestFileAllocationsAcrossProcesses.
func TestAllocHelperProcess(t *testing.T) {
	path := os.Getenv("HYPHAE_ALLOC_HELPER")
	if path == "" {
		t.Skip("helper process only")
	}
	n, _ := strconv.Atoi(os.Getenv("HYPHAE_ALLOC_N"))
	max, _ := strconv.Atoi(os.Getenv("HYPHAE_ALLOC_MAX"))
	a := FileAllocations(path)
	for i := range n {
		vm := fmt.Sprintf("%s-vm%d", os.Getenv("HYPHAE_ALLOC_PREFIX"), i)
		idx, err := a.Allocate(context.Background(), vm, max)
		switch {
		case errcode.HasCode(err, errcode.PoolExhausted):
			fmt.Printf("exhausted %s\n", vm)
		case err != nil:
			t.Fatalf("Allocate(%s): %v", vm, err)
		default:
			fmt.Printf("ok %s %d\n", vm, idx)
		}
	}
}
