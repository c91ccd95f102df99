package sqlstore

import (
	"context"

	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/errcode"
)

const invocationCols = "id, owner, bundle_id, bundle_ref, mode, status, exit_code, worker_id, error, " +
	"created_at, started_at, completed_at, duration_ms"

func scanInvocation(r Row) (store.Invocation, error) {
	var v store.Invocation
	err := r.Scan(&v.ID, &v.Owner, &v.BundleID, &v.BundleRef, (*string)(&v.Mode), (*string)(&v.Status), &v.ExitCode,
		&v.WorkerID, &v.Error, timeCol{&v.CreatedAt}, nullTimeCol{&v.StartedAt}, nullTimeCol{&v.CompletedAt}, &v.DurationMS)
	return v, err
}

// CreateInvocation implements store.Invocations.
func (s *Store) CreateInvocation(ctx context.Context, inv store.Invocation) (store.Invocation, error) {
	if inv.ID == "" {
		inv.ID = store.NewID(store.InvocationIDPrefix)
	} else if err := store.ValidateID(inv.ID); err != nil {
		return store.Invocation{}, err
	}
	switch {
	case inv.Owner == "":
		return store.Invocation{}, errcode.New(errcode.InvalidArgument, "invocation has no owner")
	case inv.BundleID == "" || inv.BundleRef == "":
		return store.Invocation{}, errcode.New(errcode.InvalidArgument, "invocation has no bundle")
	case !inv.Mode.Valid():
		return store.Invocation{}, errcode.New(errcode.InvalidArgument, "invalid run mode %q (want sync or async)", inv.Mode)
	}
	var out store.Invocation
	err := s.tx(ctx, "create invocation", func(tx Conn) error {
		if _, err := getUser(ctx, tx, inv.Owner); err != nil {
			return err
		}
		var err error
		out, err = scanInvocation(tx.QueryRow(ctx,
			`INSERT INTO invocations (id, owner, bundle_id, bundle_ref, mode, status, worker_id, error, created_at)
			VALUES ($1, $2, $3, $4, $5, 'pending', $6, '', $7) RETURNING `+invocationCols,
			inv.ID, inv.Owner, inv.BundleID, inv.BundleRef, string(inv.Mode), inv.WorkerID, now()))
		if s.b.IsUniqueViolation(err) {
			return errcode.New(errcode.AlreadyExists, "an invocation with id %q exists", inv.ID)
		}
		return dbErr(err, "create invocation %s", inv.ID)
	})
	return out, err
}

// UpdateInvocation implements store.Invocations. The final-status rule is
// in the UPDATE's WHERE clause, so that of two racing updates (a run
// completing while it is being stopped) the first final status wins and
// the second is refused, whatever the isolation level. StartedAt and
// CompletedAt keep the first value they were given.
func (s *Store) UpdateInvocation(ctx context.Context, id string, u store.InvocationUpdate) (store.Invocation, error) {
	if !u.Status.Valid() {
		return store.Invocation{}, errcode.New(errcode.InvalidArgument, "invalid invocation status %q", u.Status)
	}
	if u.DurationMS != nil && *u.DurationMS < 0 {
		return store.Invocation{}, errcode.New(errcode.InvalidArgument, "negative duration %d ms", *u.DurationMS)
	}
	t := now()
	if u.Status == store.StatusRunning && u.StartedAt == nil {
		u.StartedAt = &t
	}
	if u.Status.Final() && u.CompletedAt == nil {
		u.CompletedAt = &t
	}
	v, err := scanInvocation(s.b.QueryRow(ctx, `UPDATE invocations SET status = $2,
			exit_code = COALESCE($3, exit_code),
			worker_id = COALESCE(NULLIF($4, ''), worker_id),
			error = COALESCE(NULLIF($5, ''), error),
			started_at = COALESCE(started_at, $6),
			completed_at = COALESCE(completed_at, $7),
			duration_ms = COALESCE($8, duration_ms)
		WHERE id = $1 AND status NOT IN ('completed', 'failed', 'stopped', 'timed_out')
			AND ($2 <> 'pending' OR status = 'pending')
		RETURNING `+invocationCols,
		id, string(u.Status), u.ExitCode, u.WorkerID, u.Error, u.StartedAt, u.CompletedAt, u.DurationMS))
	if notFound(err) {
		return store.Invocation{}, s.refusedUpdate(ctx, "invocations", "invocation", id, string(u.Status))
	}
	return v, dbErr(err, "update invocation %s", id)
}

// refusedUpdate explains why a guarded status UPDATE matched no row: the
// record is missing, or its status may not change to next. table and what
// are constants of the caller.
func (s *Store) refusedUpdate(ctx context.Context, table, what, id, next string) error {
	var cur string
	err := s.b.QueryRow(ctx, "SELECT status FROM "+table+" WHERE id = $1", id).Scan(&cur)
	if notFound(err) {
		return errcode.New(errcode.NotFound, "no %s with id %q", what, id)
	}
	if err != nil {
		return dbErr(err, "read %s %s", what, id)
	}
	return errcode.New(errcode.Conflict, "%s %s is %s and cannot become %s", what, id, cur, next)
}

// GetInvocation implements store.Invocations.
func (s *Store) GetInvocation(ctx context.Context, owner, id string) (store.Invocation, error) {
	v, err := scanInvocation(s.b.QueryRow(ctx, "SELECT "+invocationCols+" FROM invocations WHERE id = $1 AND owner = $2", id, owner))
	if notFound(err) {
		return store.Invocation{}, errcode.New(errcode.NotFound, "no invocation with id %q", id)
	}
	return v, dbErr(err, "read invocation %s", id)
}

// ListRunningInvocations implements store.Invocations.
func (s *Store) ListRunningInvocations(ctx context.Context) ([]store.Invocation, error) {
	rows, err := s.b.Query(ctx, "SELECT "+invocationCols+
		" FROM invocations WHERE status IN ('pending', 'running') ORDER BY created_at, id")
	vs, err := collect(rows, err, scanInvocation)
	return vs, dbErr(err, "list running invocations")
}

const jobCols = "id, owner, status, stage, error, bundle_id, worker_id, created_at, updated_at"

func scanJob(r Row) (store.BundleJob, error) {
	var j store.BundleJob
	err := r.Scan(&j.ID, &j.Owner, (*string)(&j.Status), &j.Stage, &j.Error, &j.BundleID, &j.WorkerID,
		timeCol{&j.CreatedAt}, timeCol{&j.UpdatedAt})
	return j, err
}

// CreateBundleJob implements store.BundleJobs.
func (s *Store) CreateBundleJob(ctx context.Context, owner, workerID string) (store.BundleJob, error) {
	var j store.BundleJob
	err := s.tx(ctx, "create bundle job", func(tx Conn) error {
		if _, err := getUser(ctx, tx, owner); err != nil {
			return err
		}
		var err error
		j, err = scanJob(tx.QueryRow(ctx, `INSERT INTO bundle_jobs (`+jobCols+`)
			VALUES ($1, $2, 'queued', '', '', '', $3, $4, $4) RETURNING `+jobCols,
			store.NewID(store.JobIDPrefix), owner, workerID, now()))
		return dbErr(err, "create bundle job")
	})
	return j, err
}

// UpdateBundleJob implements store.BundleJobs, with the same final-status
// rule as UpdateInvocation.
func (s *Store) UpdateBundleJob(ctx context.Context, id string, u store.BundleJobUpdate) (store.BundleJob, error) {
	if !u.Status.Valid() {
		return store.BundleJob{}, errcode.New(errcode.InvalidArgument, "invalid bundle job status %q", u.Status)
	}
	j, err := scanJob(s.b.QueryRow(ctx, `UPDATE bundle_jobs SET status = $2,
			stage = COALESCE(NULLIF($3, ''), stage),
			error = COALESCE(NULLIF($4, ''), error),
			bundle_id = COALESCE(NULLIF($5, ''), bundle_id),
			updated_at = $6
		WHERE id = $1 AND status NOT IN ('succeeded', 'failed')
			AND ($2 <> 'queued' OR status = 'queued')
		RETURNING `+jobCols,
		id, string(u.Status), u.Stage, u.Error, u.BundleID, now()))
	if notFound(err) {
		return store.BundleJob{}, s.refusedUpdate(ctx, "bundle_jobs", "bundle job", id, string(u.Status))
	}
	return j, dbErr(err, "update bundle job %s", id)
}

// GetBundleJob implements store.BundleJobs.
func (s *Store) GetBundleJob(ctx context.Context, owner, id string) (store.BundleJob, error) {
	j, err := scanJob(s.b.QueryRow(ctx, "SELECT "+jobCols+" FROM bundle_jobs WHERE id = $1 AND owner = $2", id, owner))
	if notFound(err) {
		return store.BundleJob{}, errcode.New(errcode.NotFound, "no bundle job with id %q", id)
	}
	return j, dbErr(err, "read bundle job %s", id)
}

// ListUnfinishedBundleJobs implements store.BundleJobs.
func (s *Store) ListUnfinishedBundleJobs(ctx context.Context) ([]store.BundleJob, error) {
	rows, err := s.b.Query(ctx, "SELECT "+jobCols+
		" FROM bundle_jobs WHERE status IN ('queued', 'running') ORDER BY created_at, id")
	js, err := collect(rows, err, scanJob)
	return js, dbErr(err, "list unfinished bundle jobs")
}
