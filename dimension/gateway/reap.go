package gateway

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"time"

	"github.com/hyphae-run/hyphae/dimension/events"
	"github.com/hyphae-run/hyphae/dimension/runner"
	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/errcode"
)

// reasonOrphaned is the completed reason of a run a previous gateway
// process left unfinished.
const reasonOrphaned = "orphaned"

// ReapOrphans cleans up after a previous process of this gateway that
// ended without a shutdown (a crash, a kill): its runs still pending or
// running are marked failed with a completed{status: failed} event (unless
// the log already has one), its unfinished upload jobs are failed, and
// spooled uploads are removed. Runs and upload jobs recorded by other
// workers (other gateways on a shared database) are left alone; those with
// no worker id (upload jobs from before jobs recorded one) are taken as
// this gateway's. The spool is in this gateway's own data dir. Call it
// before serving.
func (s *Server) ReapOrphans(ctx context.Context) error {
	invs, err := s.store.ListRunningInvocations(ctx)
	if err != nil {
		return err
	}
	reaped := 0
	for _, inv := range invs {
		if !s.ownWorker(inv.WorkerID) {
			continue
		}
		if err := s.failOrphan(ctx, inv); err != nil {
			return err
		}
		reaped++
	}
	jobs, err := s.store.ListUnfinishedBundleJobs(ctx)
	if err != nil {
		return err
	}
	failedJobs := 0
	for _, j := range jobs {
		if !s.ownWorker(j.WorkerID) {
			continue
		}
		_, err := s.store.UpdateBundleJob(ctx, j.ID, store.BundleJobUpdate{
			Status: store.JobFailed, Stage: "failed", Error: "the gateway restarted during the import; upload again",
		})
		switch {
		case errcode.HasCode(err, errcode.Conflict):
			// It finished meanwhile.
		case err != nil:
			return err
		default:
			failedJobs++
		}
	}
	entries, err := os.ReadDir(s.opts.UploadDir)
	if err != nil {
		return errcode.Wrap(errcode.StagingFailed, err, "reading the upload directory %s", s.opts.UploadDir)
	}
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(s.opts.UploadDir, e.Name())); err != nil {
			s.log.Warn("removing a stale upload", "path", e.Name(), "err", err)
		}
	}
	if reaped > 0 || failedJobs > 0 {
		s.log.Warn("reaped what a previous gateway process left", "runs", reaped, "upload_jobs", failedJobs)
	}
	return nil
}

// ownWorker reports whether a record with workerID is this gateway's to reap:
// its own, or one that names no worker.
func (s *Server) ownWorker(workerID string) bool {
	return workerID == "" || workerID == s.opts.WorkerID
}

// failOrphan ends one orphaned run: its completed event first (so SSE
// readers stop waiting), then its row.
func (s *Server) failOrphan(ctx context.Context, inv store.Invocation) error {
	var dur int64
	if inv.StartedAt != nil {
		dur = time.Since(*inv.StartedAt).Milliseconds()
	}
	body, err := json.Marshal(map[string]any{
		"phase": runner.PhaseCompleted, "status": runner.StatusFailed, "exit_code": -1,
		"duration_ms": dur, "reason": reasonOrphaned,
	})
	if err != nil {
		return errcode.Wrap(errcode.InvalidArgument, err, "encoding a completed event")
	}
	_, err = s.opts.Events.Append(ctx, events.Event{
		RunID: inv.ID, Kind: events.KindState, ContentType: "application/json", Body: body,
		WorkerID: s.opts.WorkerID, BundleID: inv.BundleID, UserID: inv.Owner,
	})
	if err != nil && !errcode.HasCode(err, errcode.RunFinished) {
		return err
	}
	now := time.Now()
	_, err = s.store.UpdateInvocation(ctx, inv.ID, store.InvocationUpdate{
		Status: store.StatusFailed, Error: reasonOrphaned, CompletedAt: &now, DurationMS: &dur,
	})
	if err != nil && !errcode.HasCode(err, errcode.Conflict) {
		return err
	}
	s.log.Warn("orphaned run marked failed", "run", inv.ID, "bundle", inv.BundleRef, "owner", inv.Owner, "was", inv.Status)
	return nil
}
