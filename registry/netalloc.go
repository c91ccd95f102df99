package registry

import (
	"context"
	"database/sql"
	"errors"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/network"
)

// NetAllocations is the registry's record of network lease indexes. It
// implements network.Allocations: each change is one write transaction
// that takes SQLite's write lock up front (BEGIN IMMEDIATE), so two hyphae
// processes sharing a home never hand out the same index.
type NetAllocations struct{ r *Registry }

var _ network.Allocations = NetAllocations{}

// NetAllocations returns the registry's network lease record.
func (r *Registry) NetAllocations() NetAllocations { return NetAllocations{r: r} }

// Allocate returns vmID's index, or allocates the lowest free index in
// [0, max) for it; errcode.PoolExhausted when all are taken.
func (a NetAllocations) Allocate(ctx context.Context, vmID string, max int) (int, error) {
	if vmID == "" {
		return 0, errcode.New(errcode.InvalidArgument, "network allocation needs a VM id")
	}
	index := -1
	err := a.r.writeTx(ctx, func(tx *sql.Tx) error {
		err := tx.QueryRowContext(ctx, `SELECT idx FROM net_allocations WHERE vm_id = ?`, vmID).Scan(&index)
		if err == nil {
			return nil
		}
		if !errors.Is(err, sql.ErrNoRows) {
			return dbErr(err, "look up the network allocation of VM %s", vmID)
		}
		// The lowest free index: 0 when free, else the first used index
		// whose successor is free.
		err = tx.QueryRowContext(ctx, `
			SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM net_allocations WHERE idx = 0) THEN 0
			ELSE (SELECT min(a.idx) + 1 FROM net_allocations a
			      WHERE NOT EXISTS (SELECT 1 FROM net_allocations b WHERE b.idx = a.idx + 1)) END`).Scan(&index)
		if err != nil {
			return dbErr(err, "find a free network index")
		}
		if index >= max {
			return errcode.New(errcode.PoolExhausted, "all %d addresses of the pool are allocated", max).
				WithHint("stop a networked VM, or configure a wider pool")
		}
		_, err = tx.ExecContext(ctx, `INSERT INTO net_allocations (vm_id, idx, created_at) VALUES (?, ?, ?)`,
			vmID, index, formatTime(time.Now()))
		return dbErr(err, "record the network allocation of VM %s", vmID)
	})
	if err != nil {
		return 0, err
	}
	return index, nil
}

// Release frees vmID's index; a VM holding none is not an error.
func (a NetAllocations) Release(ctx context.Context, vmID string) error {
	return a.r.writeTx(ctx, func(tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, `DELETE FROM net_allocations WHERE vm_id = ?`, vmID)
		return dbErr(err, "release the network allocation of VM %s", vmID)
	})
}

// List returns every allocation, ordered by index.
func (a NetAllocations) List(ctx context.Context) ([]network.Allocation, error) {
	rows, err := a.r.db.QueryContext(ctx, `SELECT vm_id, idx FROM net_allocations ORDER BY idx`)
	if err != nil {
		return nil, dbErr(err, "list network allocations")
	}
	defer rows.Close()
	var out []network.Allocation
	for rows.Next() {
		var al network.Allocation
		if err := rows.Scan(&al.VMID, &al.Index); err != nil {
			return nil, dbErr(err, "list network allocations")
		}
		out = append(out, al)
	}
	return out, dbErr(rows.Err(), "list network allocations")
}
