package registry

import (
	"context"
	"database/sql"
	"encoding/json"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
)

// VM states as the registry records them. Created and Running VMs hold
// their image: RemoveImage refuses to remove it.
const (
	VMCreated = "created"
	VMRunning = "running"
	VMExited  = "exited"
)

// VM is the record of one microVM.
type VM struct {
	ID          string `json:"id"`
	ImageDigest string `json:"image_digest"`
	ImageRef    string `json:"image_ref"`
	Driver      string `json:"driver"`
	PID         int    `json:"pid"`
	// ProcStartTicks is field 22 of /proc/<pid>/stat when the VMM was
	// spawned: a PID reused by another program has another start time,
	// so orphan recovery never kills a stranger.
	ProcStartTicks uint64          `json:"proc_start_ticks"`
	State          string          `json:"state"`
	RuntimeDir     string          `json:"runtime_dir"`
	ConsolePath    string          `json:"console_path"`
	Spec           json.RawMessage `json:"spec"`
	CreatedAt      time.Time       `json:"created_at"`
	StartedAt      *time.Time      `json:"started_at,omitempty"`
	StoppedAt      *time.Time      `json:"stopped_at,omitempty"`
	ExitCode       *int            `json:"exit_code,omitempty"`
}

func (vm *VM) validate() error {
	if vm.ID == "" || vm.State == "" {
		return errcode.New(errcode.InvalidArgument, "a VM record needs an id and a state")
	}
	if err := ValidateDigest(vm.ImageDigest); err != nil {
		return err
	}
	if len(vm.Spec) == 0 {
		vm.Spec = json.RawMessage("{}")
	}
	if !json.Valid(vm.Spec) {
		return errcode.New(errcode.InvalidArgument, "spec of VM %s is not valid JSON", vm.ID)
	}
	return nil
}

// PutVM inserts a new VM record (E504 when the id exists).
func (r *Registry) PutVM(ctx context.Context, vm VM) error {
	if err := vm.validate(); err != nil {
		return err
	}
	if vm.CreatedAt.IsZero() {
		vm.CreatedAt = time.Now()
	}
	return r.writeTx(ctx, func(tx *sql.Tx) error {
		var n int
		if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM vms WHERE id = ?`, vm.ID).Scan(&n); err != nil {
			return dbErr(err, "check VM %s", vm.ID)
		}
		if n > 0 {
			return errcode.New(errcode.Conflict, "a VM with id %s already exists", vm.ID)
		}
		_, err := tx.ExecContext(ctx, `INSERT INTO vms (id, image_digest, image_ref, driver, pid, proc_start_ticks, state,
				runtime_dir, console_path, spec, created_at, started_at, stopped_at, exit_code)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`, vmArgs(vm)...)
		return dbErr(err, "insert VM %s", vm.ID)
	})
}

// GetVM returns the VM of that id (E501 when there is none).
func (r *Registry) GetVM(ctx context.Context, id string) (VM, error) {
	return getVM(ctx, r.db, id)
}

// ListVMs returns every VM record, oldest first.
func (r *Registry) ListVMs(ctx context.Context) ([]VM, error) {
	return queryVMs(ctx, r.db, "")
}

// UpdateVM reads the VM, lets fn change it and writes it back, all in one
// write transaction, so that two processes updating one VM (a reconciling
// `list vms` and the VM's own supervisor) never lose each other's change.
// fn may not change the id; an error from fn aborts the update.
func (r *Registry) UpdateVM(ctx context.Context, id string, fn func(*VM) error) error {
	return r.writeTx(ctx, func(tx *sql.Tx) error {
		vm, err := getVM(ctx, tx, id)
		if err != nil {
			return err
		}
		if err := fn(&vm); err != nil {
			return err
		}
		if vm.ID != id {
			return errcode.New(errcode.InvalidArgument, "UpdateVM may not change the id of VM %s", id)
		}
		if err := vm.validate(); err != nil {
			return err
		}
		args := vmArgs(vm)
		_, err = tx.ExecContext(ctx, `UPDATE vms SET image_digest = ?, image_ref = ?, driver = ?, pid = ?, proc_start_ticks = ?,
				state = ?, runtime_dir = ?, console_path = ?, spec = ?, created_at = ?, started_at = ?, stopped_at = ?, exit_code = ?
			WHERE id = ?`, append(args[1:], id)...)
		return dbErr(err, "update VM %s", id)
	})
}

// DeleteVM removes a VM record (E501 when there is none).
func (r *Registry) DeleteVM(ctx context.Context, id string) error {
	return r.writeTx(ctx, func(tx *sql.Tx) error {
		res, err := tx.ExecContext(ctx, `DELETE FROM vms WHERE id = ?`, id)
		if err != nil {
			return dbErr(err, "delete VM %s", id)
		}
		if n, _ := res.RowsAffected(); n == 0 {
			return errcode.New(errcode.NotFound, "no VM with id %s", id)
		}
		return nil
	})
}

// vmArgs lists vm's columns in table order, id first.
func vmArgs(vm VM) []any {
	var exit sql.NullInt64
	if vm.ExitCode != nil {
		exit = sql.NullInt64{Int64: int64(*vm.ExitCode), Valid: true}
	}
	return []any{vm.ID, vm.ImageDigest, vm.ImageRef, vm.Driver, vm.PID, int64(vm.ProcStartTicks), vm.State,
		vm.RuntimeDir, vm.ConsolePath, string(vm.Spec), formatTime(vm.CreatedAt), nullTime(vm.StartedAt),
		nullTime(vm.StoppedAt), exit}
}

func getVM(ctx context.Context, q querier, id string) (VM, error) {
	vms, err := queryVMs(ctx, q, `WHERE id = ?`, id)
	if err != nil {
		return VM{}, err
	}
	if len(vms) == 0 {
		return VM{}, errcode.New(errcode.NotFound, "no VM with id %s", id).
			WithHint("`hyphae list vms` shows the known VMs")
	}
	return vms[0], nil
}

func queryVMs(ctx context.Context, q querier, where string, args ...any) ([]VM, error) {
	rows, err := q.QueryContext(ctx, `SELECT id, image_digest, image_ref, driver, pid, proc_start_ticks, state,
			runtime_dir, console_path, spec, created_at, started_at, stopped_at, exit_code
		FROM vms `+where+` ORDER BY created_at, id`, args...)
	if err != nil {
		return nil, dbErr(err, "query VMs")
	}
	defer rows.Close()
	var out []VM
	for rows.Next() {
		var (
			vm               VM
			ticks            int64
			spec, created    string
			started, stopped sql.NullString
			exit             sql.NullInt64
		)
		if err := rows.Scan(&vm.ID, &vm.ImageDigest, &vm.ImageRef, &vm.Driver, &vm.PID, &ticks, &vm.State,
			&vm.RuntimeDir, &vm.ConsolePath, &spec, &created, &started, &stopped, &exit); err != nil {
			return nil, dbErr(err, "read VM row")
		}
		vm.ProcStartTicks = uint64(ticks)
		vm.Spec = json.RawMessage(spec)
		if vm.CreatedAt, err = parseTime(created); err != nil {
			return nil, err
		}
		if vm.StartedAt, err = parseNullTime(started); err != nil {
			return nil, err
		}
		if vm.StoppedAt, err = parseNullTime(stopped); err != nil {
			return nil, err
		}
		if exit.Valid {
			c := int(exit.Int64)
			vm.ExitCode = &c
		}
		out = append(out, vm)
	}
	if err := rows.Err(); err != nil {
		return nil, dbErr(err, "query VMs")
	}
	return out, nil
}
