package storetest

import (
	"context"
	"io/fs"
	"testing"
	"testing/fstest"
	"time"

	"github.com/hyphae-run/hyphae/dimension/store"
)

// Upgrade is a fresh, empty database that RunUpgrade migrates step by
// step, as successive releases of dimension-server would.
type Upgrade struct {
	// Open opens a handle that applies migrations (a prefix of Migrations).
	Open func(ctx context.Context, migrations fs.FS) (store.Store, error)
	// Migrations are the backend's embedded migrations, all of them.
	Migrations fs.FS
	// Exec runs one statement on the database outside the store, with
	// timestamps bound as the backend's store binds them: for rows only an
	// older release's store could write.
	Exec func(ctx context.Context, query string, args ...any) error
}

// RunUpgrade runs the tests that upgrade a database an older release left.
// newDatabase makes a fresh database (removed by its t.Cleanup).
func RunUpgrade(t *testing.T, newDatabase func(t *testing.T) Upgrade) {
	t.Run("BundleJobWorkerID", func(t *testing.T) { testUpgradeBundleJobWorker(t, newDatabase(t)) })
}

// migrationsUpTo returns the first n files of migrations (NNNN_name.sql
// sorts by version).
func migrationsUpTo(t *testing.T, migrations fs.FS, n int) fs.FS {
	t.Helper()
	entries := must(fs.ReadDir(migrations, "."))(t)
	if len(entries) < n {
		t.Fatalf("%d migrations, want at least %d", len(entries), n)
	}
	prefix := fstest.MapFS{}
	for _, e := range entries[:n] {
		prefix[e.Name()] = &fstest.MapFile{Data: must(fs.ReadFile(migrations, e.Name()))(t)}
	}
	return prefix
}

// An upload job recorded before jobs had worker ids (schema version 1)
// keeps its row through migration 2 with no worker id, which a restarting
// gateway treats as its own; new jobs record theirs.
func testUpgradeBundleJobWorker(t *testing.T, db Upgrade) {
	ctx := t.Context()
	v1 := must(db.Open(ctx, migrationsUpTo(t, db.Migrations, 1)))(t)
	u := newUser(t, v1, "uploader", store.RoleUser)
	if err := v1.Close(); err != nil {
		t.Fatal(err)
	}
	created := time.Now().UTC().Add(-time.Hour).Truncate(time.Second)
	if err := db.Exec(ctx, `INSERT INTO bundle_jobs (id, owner, status, stage, error, bundle_id, created_at, updated_at)
		VALUES ('job_legacy', $1, 'running', 'mkfs', '', '', $2, $2)`, u.ID, created); err != nil {
		t.Fatal(err)
	}

	s := must(db.Open(ctx, db.Migrations))(t)
	t.Cleanup(func() { _ = s.Close() })
	want := store.BundleJob{ID: "job_legacy", Owner: u.ID, Status: store.JobRunning, Stage: "mkfs",
		CreatedAt: created, UpdatedAt: created}
	got := must(s.GetBundleJob(ctx, u.ID, "job_legacy"))(t)
	if !got.CreatedAt.Equal(created) || !got.UpdatedAt.Equal(created) {
		t.Fatalf("legacy job's times = %v, %v; want %v", got.CreatedAt, got.UpdatedAt, created)
	}
	got.CreatedAt, got.UpdatedAt = created, created
	if got != want {
		t.Fatalf("legacy job after the upgrade = %+v, want %+v", got, want)
	}
	fresh := must(s.CreateBundleJob(ctx, u.ID, "w2"))(t)
	if fresh.WorkerID != "w2" {
		t.Fatalf("job created after the upgrade = %+v", fresh)
	}
	if jobs := must(s.ListUnfinishedBundleJobs(ctx))(t); len(jobs) != 2 || jobs[0].ID != "job_legacy" || jobs[0].WorkerID != "" || jobs[1].WorkerID != "w2" {
		t.Fatalf("unfinished jobs after the upgrade = %+v", jobs)
	}
	if failed := must(s.UpdateBundleJob(ctx, "job_legacy", store.BundleJobUpdate{Status: store.JobFailed, Error: "restarted"}))(t); failed.Status != store.JobFailed {
		t.Fatalf("failing the legacy job = %+v", failed)
	}
}
