package network

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"

	"github.com/hyphae-run/hyphae/errcode"
)

// Allocation records that a VM holds a lease index.
type Allocation struct {
	VMID  string `json:"vm_id"`
	Index int    `json:"index"`
}

// Allocations is the persistent record of which VM holds which lease index.
// Implementations must be safe across processes: two hyphae processes
// sharing a host must never hand out the same index. The registry package
// implements it with a SQLite transaction; FileAllocations is a standalone
// implementation.
type Allocations interface {
	// Allocate returns vmID's index, allocating the lowest free index in
	// [0, max) when vmID holds none. It returns an errcode.PoolExhausted
	// error when every index is taken.
	Allocate(ctx context.Context, vmID string, max int) (int, error)
	// Release frees vmID's index; releasing a VM that holds none is not an
	// error.
	Release(ctx context.Context, vmID string) error
	// List returns every allocation, ordered by index.
	List(ctx context.Context) ([]Allocation, error)
}

// FileAllocations returns Allocations kept as JSON in the file at path,
// guarded by flock(2) on path+".lock" so that any number of processes may
// share it. Updates are written to a temporary file and renamed over path,
// so a crash never leaves a half-written record.
func FileAllocations(path string) Allocations { return fileAllocations{path: path} }

type fileAllocations struct{ path string }

type allocFile struct {
	Allocations []Allocation `json:"allocations"`
}

// locked runs fn with the exclusive lock held, handing it the current
// allocations; when fn returns changed=true the new list is written.
func (f fileAllocations) locked(ctx context.Context, fn func(list []Allocation) ([]Allocation, bool, error)) error {
	if err := os.MkdirAll(filepath.Dir(f.path), 0o755); err != nil {
		return errcode.Wrap(errcode.RegistryError, err, "creating the directory of %s", f.path)
	}
	lock, err := flockFile(ctx, f.path+".lock", os.O_RDWR|os.O_CREATE, errcode.RegistryError)
	if err != nil {
		return err
	}
	defer lock.Close()

	list, err := f.read()
	if err != nil {
		return err
	}
	next, changed, err := fn(list)
	if err != nil || !changed {
		return err
	}
	return f.write(next)
}

func (f fileAllocations) read() ([]Allocation, error) {
	data, err := os.ReadFile(f.path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, errcode.Wrap(errcode.RegistryError, err, "reading allocations")
	}
	var af allocFile
	if err := json.Unmarshal(data, &af); err != nil {
		e := errcode.New(errcode.Corrupt, "allocation file %s is damaged", f.path).
			WithHint("remove it once no networked VM is running")
		e.Err = err
		return nil, e
	}
	return af.Allocations, nil
}

func (f fileAllocations) write(list []Allocation) error {
	data, err := json.MarshalIndent(allocFile{Allocations: list}, "", "  ")
	if err != nil {
		return errcode.Wrap(errcode.RegistryError, err, "encoding allocations")
	}
	tmp, err := os.CreateTemp(filepath.Dir(f.path), filepath.Base(f.path)+".tmp*")
	if err != nil {
		return errcode.Wrap(errcode.RegistryError, err, "writing allocations")
	}
	defer os.Remove(tmp.Name()) // no-op after the rename
	if _, err := tmp.Write(append(data, '\n')); err != nil {
		tmp.Close()
		return errcode.Wrap(errcode.RegistryError, err, "writing allocations")
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return errcode.Wrap(errcode.RegistryError, err, "syncing allocations")
	}
	if err := tmp.Close(); err != nil {
		return errcode.Wrap(errcode.RegistryError, err, "writing allocations")
	}
	if err := os.Rename(tmp.Name(), f.path); err != nil {
		return errcode.Wrap(errcode.RegistryError, err, "replacing %s", f.path)
	}
	return nil
}

func (f fileAllocations) Allocate(ctx context.Context, vmID string, max int) (int, error) {
	index := -1
	err := f.locked(ctx, func(list []Allocation) ([]Allocation, bool, error) {
		used := make(map[int]bool, len(list))
		for _, a := range list {
			if a.VMID == vmID {
				index = a.Index
				return nil, false, nil
			}
			used[a.Index] = true
		}
		for i := 0; i < max; i++ {
			if !used[i] {
				index = i
				list = append(list, Allocation{VMID: vmID, Index: i})
				slices.SortFunc(list, func(a, b Allocation) int { return a.Index - b.Index })
				return list, true, nil
			}
		}
		return nil, false, errcode.New(errcode.PoolExhausted, "all %d addresses of the pool are allocated", max).
			WithHint("stop a networked VM, or configure a wider pool")
	})
	if err != nil {
		return 0, err
	}
	return index, nil
}

func (f fileAllocations) Release(ctx context.Context, vmID string) error {
	return f.locked(ctx, func(list []Allocation) ([]Allocation, bool, error) {
		i := slices.IndexFunc(list, func(a Allocation) bool { return a.VMID == vmID })
		if i < 0 {
			return nil, false, nil
		}
		return slices.Delete(list, i, i+1), true, nil
	})
}

func (f fileAllocations) List(ctx context.Context) ([]Allocation, error) {
	var out []Allocation
	err := f.locked(ctx, func(list []Allocation) ([]Allocation, bool, error) {
		out = list
		return nil, false, nil
	})
	return out, err
}
