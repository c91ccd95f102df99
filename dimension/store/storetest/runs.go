package storetest

import (
	"context"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/errcode"
)

func ptr[T any](v T) *T { return &v }

func testInvocations(t *testing.T, s store.Store) {
	ctx := t.Context()
	u := newUser(t, s, "runner", store.RoleUser)
	b := newBundle(t, s, u.ID, "echo", "latest", "e1")

	inv := newInvocation(t, s, u.ID, b)
	if !strings.HasPrefix(inv.ID, store.InvocationIDPrefix) || inv.Status != store.StatusPending ||
		inv.Mode != store.ModeAsync || inv.BundleID != b.ID || inv.BundleRef != "echo:latest" ||
		inv.ExitCode != nil || inv.StartedAt != nil || inv.CompletedAt != nil || inv.DurationMS != nil || inv.CreatedAt.IsZero() {
		t.Fatalf("created invocation = %+v", inv)
	}
	chosen := must(s.CreateInvocation(ctx, store.Invocation{ID: "run-42", Owner: u.ID, BundleID: b.ID,
		BundleRef: b.Ref(), Mode: store.ModeSync, WorkerID: "w1"}))(t)
	if chosen.ID != "run-42" || chosen.Mode != store.ModeSync || chosen.WorkerID != "w1" {
		t.Fatalf("invocation with a chosen id = %+v", chosen)
	}
	_, err := s.CreateInvocation(ctx, store.Invocation{ID: "run-42", Owner: u.ID, BundleID: b.ID, BundleRef: b.Ref(), Mode: store.ModeSync})
	wantCode(t, err, errcode.AlreadyExists, "duplicate invocation id")

	running := must(s.UpdateInvocation(ctx, inv.ID, store.InvocationUpdate{Status: store.StatusRunning, WorkerID: "w7"}))(t)
	if running.Status != store.StatusRunning || running.StartedAt == nil || running.WorkerID != "w7" || running.CompletedAt != nil {
		t.Fatalf("running invocation = %+v", running)
	}
	// Staying running keeps the first start time.
	still := must(s.UpdateInvocation(ctx, inv.ID, store.InvocationUpdate{Status: store.StatusRunning,
		StartedAt: ptr(running.StartedAt.Add(time.Hour))}))(t)
	if !still.StartedAt.Equal(*running.StartedAt) || still.WorkerID != "w7" {
		t.Fatalf("second running update moved the start or lost the worker: %+v", still)
	}
	if got := must(s.ListRunningInvocations(ctx))(t); !sameIDs(got, inv.ID, chosen.ID) {
		t.Fatalf("ListRunningInvocations = %+v, want %s and %s", got, inv.ID, chosen.ID)
	}

	done := must(s.UpdateInvocation(ctx, inv.ID, store.InvocationUpdate{Status: store.StatusFailed, ExitCode: ptr(3),
		DurationMS: ptr(int64(1234)), Error: "exit status 3"}))(t)
	if done.Status != store.StatusFailed || done.ExitCode == nil || *done.ExitCode != 3 || done.DurationMS == nil ||
		*done.DurationMS != 1234 || done.CompletedAt == nil || done.Error != "exit status 3" ||
		!done.StartedAt.Equal(*running.StartedAt) || done.CompletedAt.Before(*done.StartedAt) {
		t.Fatalf("failed invocation = %+v", done)
	}
	if got := must(s.GetInvocation(ctx, u.ID, inv.ID))(t); !reflect.DeepEqual(got, done) {
		t.Fatalf("GetInvocation = %+v, want %+v", got, done)
	}
	if got := must(s.ListRunningInvocations(ctx))(t); !sameIDs(got, chosen.ID) {
		t.Fatalf("ListRunningInvocations after completion = %+v", got)
	}

	// A pending run may end directly, with an explicit completion time
	// and exit code 0 (not confused with "no exit code").
	at := time.Date(2030, 1, 2, 3, 4, 5, 678000, time.UTC)
	direct := must(s.UpdateInvocation(ctx, chosen.ID, store.InvocationUpdate{Status: store.StatusCompleted, ExitCode: ptr(0), CompletedAt: &at}))(t)
	if direct.ExitCode == nil || *direct.ExitCode != 0 || !direct.CompletedAt.Equal(at) || direct.StartedAt != nil {
		t.Fatalf("pending → completed = %+v", direct)
	}

	// The invocation outlives its bundle.
	must(s.DeleteBundle(ctx, u.ID, b.ID))(t)
	if got := must(s.GetInvocation(ctx, u.ID, inv.ID))(t); got.BundleRef != "echo:latest" {
		t.Fatalf("invocation after bundle delete = %+v", got)
	}
	_, err = s.GetInvocation(ctx, u.ID, "inv_missing")
	wantCode(t, err, errcode.NotFound, "GetInvocation of an unknown id")
}

func sameIDs(invs []store.Invocation, ids ...string) bool {
	if len(invs) != len(ids) {
		return false
	}
	want := map[string]bool{}
	for _, id := range ids {
		want[id] = true
	}
	for _, v := range invs {
		if !want[v.ID] {
			return false
		}
	}
	return true
}

func testInvocationValidation(t *testing.T, s store.Store) {
	ctx := t.Context()
	u := newUser(t, s, "validator", store.RoleUser)
	good := store.Invocation{Owner: u.ID, BundleID: "bnd_x", BundleRef: "x:latest", Mode: store.ModeSync}
	tests := []struct {
		name string
		edit func(*store.Invocation)
		code errcode.Code
	}{
		{"bad id", func(v *store.Invocation) { v.ID = "a b" }, errcode.InvalidArgument},
		{"id with a dot", func(v *store.Invocation) { v.ID = "runs.x" }, errcode.InvalidArgument},
		{"long id", func(v *store.Invocation) { v.ID = strings.Repeat("a", 129) }, errcode.InvalidArgument},
		{"no owner", func(v *store.Invocation) { v.Owner = "" }, errcode.InvalidArgument},
		{"no bundle", func(v *store.Invocation) { v.BundleID = "" }, errcode.InvalidArgument},
		{"no bundle ref", func(v *store.Invocation) { v.BundleRef = "" }, errcode.InvalidArgument},
		{"bad mode", func(v *store.Invocation) { v.Mode = "later" }, errcode.InvalidArgument},
		{"unknown owner", func(v *store.Invocation) { v.Owner = "usr_missing" }, errcode.NotFound},
	}
	for _, tc := range tests {
		v := good
		tc.edit(&v)
		_, err := s.CreateInvocation(ctx, v)
		wantCode(t, err, tc.code, tc.name)
	}
	if got := must(s.ListRunningInvocations(ctx))(t); len(got) != 0 {
		t.Fatalf("refused invocations were stored: %+v", got)
	}
	inv := must(s.CreateInvocation(ctx, good))(t)
	_, err := s.UpdateInvocation(ctx, inv.ID, store.InvocationUpdate{Status: "done"})
	wantCode(t, err, errcode.InvalidArgument, "unknown status")
	_, err = s.UpdateInvocation(ctx, inv.ID, store.InvocationUpdate{Status: store.StatusRunning, DurationMS: ptr(int64(-1))})
	wantCode(t, err, errcode.InvalidArgument, "negative duration")
	_, err = s.UpdateInvocation(ctx, "inv_missing", store.InvocationUpdate{Status: store.StatusRunning})
	wantCode(t, err, errcode.NotFound, "update of an unknown invocation")
	if got := must(s.GetInvocation(ctx, u.ID, inv.ID))(t); !reflect.DeepEqual(got, inv) {
		t.Fatalf("refused updates changed the invocation: %+v", got)
	}
}

var finalStatuses = []store.Status{store.StatusCompleted, store.StatusFailed, store.StatusStopped, store.StatusTimedOut}

// testFinalStatusIsFinal tries every status after every final status, and
// pending after running.
func testFinalStatusIsFinal(t *testing.T, s store.Store) {
	ctx := t.Context()
	u := newUser(t, s, "finisher", store.RoleUser)
	b := newBundle(t, s, u.ID, "echo", "latest", "f1")
	all := append([]store.Status{store.StatusPending, store.StatusRunning}, finalStatuses...)
	for _, final := range finalStatuses {
		for _, next := range all {
			t.Run(fmt.Sprintf("%s_then_%s", final, next), func(t *testing.T) {
				inv := newInvocation(t, s, u.ID, b)
				must(s.UpdateInvocation(ctx, inv.ID, store.InvocationUpdate{Status: store.StatusRunning}))(t)
				ended := must(s.UpdateInvocation(ctx, inv.ID, store.InvocationUpdate{Status: final, ExitCode: ptr(1)}))(t)
				_, err := s.UpdateInvocation(ctx, inv.ID, store.InvocationUpdate{Status: next, ExitCode: ptr(9),
					Error: "late", DurationMS: ptr(int64(5))})
				wantCode(t, err, errcode.Conflict, "update after "+string(final))
				if got := must(s.GetInvocation(ctx, u.ID, inv.ID))(t); !reflect.DeepEqual(got, ended) {
					t.Fatalf("final invocation changed: %+v, want %+v", got, ended)
				}
			})
		}
	}
	t.Run("running_then_pending", func(t *testing.T) {
		inv := newInvocation(t, s, u.ID, b)
		running := must(s.UpdateInvocation(ctx, inv.ID, store.InvocationUpdate{Status: store.StatusRunning}))(t)
		_, err := s.UpdateInvocation(ctx, inv.ID, store.InvocationUpdate{Status: store.StatusPending})
		wantCode(t, err, errcode.Conflict, "running → pending")
		if got := must(s.GetInvocation(ctx, u.ID, inv.ID))(t); !reflect.DeepEqual(got, running) {
			t.Fatalf("refused update changed the invocation: %+v", got)
		}
	})
}

// testConcurrentFinalStatus races a completion against stops and timeouts
// of the same run: the first final status wins, the rest are refused.
func testConcurrentFinalStatus(t *testing.T, s store.Store) {
	ctx := t.Context()
	u := newUser(t, s, "racer", store.RoleUser)
	b := newBundle(t, s, u.ID, "echo", "latest", "f2")
	for round := range 5 {
		inv := newInvocation(t, s, u.ID, b)
		must(s.UpdateInvocation(ctx, inv.ID, store.InvocationUpdate{Status: store.StatusRunning}))(t)
		n := 2 * len(finalStatuses)
		results := make([]store.Invocation, n)
		errs := race(n, func(ctx context.Context, i int) error {
			var err error
			results[i], err = s.UpdateInvocation(ctx, inv.ID, store.InvocationUpdate{
				Status: finalStatuses[i%len(finalStatuses)], ExitCode: ptr(i)})
			return err
		})
		if ok := outcome(t, errs, errcode.Conflict); ok != 1 {
			t.Fatalf("round %d: %d final updates succeeded, want 1", round, ok)
		}
		got := must(s.GetInvocation(ctx, u.ID, inv.ID))(t)
		for i, err := range errs {
			if err == nil && !reflect.DeepEqual(got, results[i]) {
				t.Fatalf("round %d: stored %+v, winner wrote %+v", round, got, results[i])
			}
		}
	}
}

func testBundleJobs(t *testing.T, s store.Store) {
	ctx := t.Context()
	u := newUser(t, s, "uploader", store.RoleUser)
	j := must(s.CreateBundleJob(ctx, u.ID, "w1"))(t)
	if !strings.HasPrefix(j.ID, store.JobIDPrefix) || j.Status != store.JobQueued || j.Owner != u.ID ||
		j.Stage != "" || j.BundleID != "" || j.WorkerID != "w1" || j.CreatedAt.IsZero() {
		t.Fatalf("created job = %+v", j)
	}
	other := must(s.CreateBundleJob(ctx, u.ID, ""))(t)
	if other.WorkerID != "" {
		t.Fatalf("job created without a worker = %+v", other)
	}
	// Both workers' jobs are listed, each with its own worker id: the
	// gateway picks its own. (Created in one microsecond, they may come in
	// either order.)
	unfinished := must(s.ListUnfinishedBundleJobs(ctx))(t)
	byID := map[string]store.BundleJob{}
	for _, g := range unfinished {
		byID[g.ID] = g
	}
	if len(unfinished) != 2 || !reflect.DeepEqual(byID, map[string]store.BundleJob{j.ID: j, other.ID: other}) {
		t.Fatalf("ListUnfinishedBundleJobs = %+v, want %+v and %+v", unfinished, j, other)
	}
	if got := must(s.GetBundleJob(ctx, u.ID, j.ID))(t); !reflect.DeepEqual(got, j) {
		t.Fatalf("GetBundleJob = %+v, want %+v", got, j)
	}

	r := must(s.UpdateBundleJob(ctx, j.ID, store.BundleJobUpdate{Status: store.JobRunning, Stage: "unpacking"}))(t)
	r = must(s.UpdateBundleJob(ctx, j.ID, store.BundleJobUpdate{Status: store.JobRunning, Stage: "mkfs"}))(t)
	if r.Status != store.JobRunning || r.Stage != "mkfs" || r.WorkerID != "w1" || r.UpdatedAt.Before(j.UpdatedAt) {
		t.Fatalf("running job = %+v", r)
	}
	_, err := s.UpdateBundleJob(ctx, j.ID, store.BundleJobUpdate{Status: store.JobQueued})
	wantCode(t, err, errcode.Conflict, "running → queued")
	done := must(s.UpdateBundleJob(ctx, j.ID, store.BundleJobUpdate{Status: store.JobSucceeded, Stage: "done", BundleID: "bnd_1"}))(t)
	if done.Status != store.JobSucceeded || done.BundleID != "bnd_1" || done.Stage != "done" {
		t.Fatalf("succeeded job = %+v", done)
	}
	for _, next := range []store.JobStatus{store.JobQueued, store.JobRunning, store.JobSucceeded, store.JobFailed} {
		_, err := s.UpdateBundleJob(ctx, j.ID, store.BundleJobUpdate{Status: next, Error: "late"})
		wantCode(t, err, errcode.Conflict, "update of a succeeded job to "+string(next))
	}
	if got := must(s.GetBundleJob(ctx, u.ID, j.ID))(t); !reflect.DeepEqual(got, done) {
		t.Fatalf("GetBundleJob = %+v, want %+v", got, done)
	}

	failed := must(s.UpdateBundleJob(ctx, other.ID, store.BundleJobUpdate{Status: store.JobFailed, Error: "bad archive"}))(t)
	if failed.Error != "bad archive" {
		t.Fatalf("failed job = %+v", failed)
	}
	if got := must(s.ListUnfinishedBundleJobs(ctx))(t); len(got) != 0 {
		t.Fatalf("ListUnfinishedBundleJobs after both ended = %+v", got)
	}

	_, err = s.UpdateBundleJob(ctx, j.ID, store.BundleJobUpdate{Status: "paused"})
	wantCode(t, err, errcode.InvalidArgument, "unknown job status")
	_, err = s.UpdateBundleJob(ctx, "job_missing", store.BundleJobUpdate{Status: store.JobRunning})
	wantCode(t, err, errcode.NotFound, "update of an unknown job")
	_, err = s.GetBundleJob(ctx, u.ID, "job_missing")
	wantCode(t, err, errcode.NotFound, "GetBundleJob of an unknown id")
	_, err = s.CreateBundleJob(ctx, "usr_missing", "w1")
	wantCode(t, err, errcode.NotFound, "job for an unknown owner")
}

// testConcurrencySmoke runs a mix of writes and reads from many goroutines
// at once and checks that every one of them landed.
func testConcurrencySmoke(t *testing.T, s store.Store) {
	const workers, each = 8, 10
	users := make([]store.User, workers)
	keys := make([]string, workers)
	for i := range users {
		users[i] = newUser(t, s, fmt.Sprintf("worker%d", i), store.RoleUser)
		_, keys[i] = newKey(t, s, users[i].ID)
	}
	errs := race(workers, func(ctx context.Context, w int) error {
		u := users[w]
		for i := range each {
			if _, err := s.Authenticate(ctx, keys[w]); err != nil {
				return err
			}
			b, err := s.PutBundle(ctx, store.Bundle{Owner: u.ID, Name: "app", Tag: fmt.Sprintf("v%d", i), ImageDigest: digest(fmt.Sprint(i))})
			if err != nil {
				return err
			}
			inv, err := s.CreateInvocation(ctx, store.Invocation{Owner: u.ID, BundleID: b.ID, BundleRef: b.Ref(), Mode: store.ModeAsync})
			if err != nil {
				return err
			}
			if _, err := s.UpdateInvocation(ctx, inv.ID, store.InvocationUpdate{Status: store.StatusRunning}); err != nil {
				return err
			}
			if i%2 == 0 {
				if _, err := s.UpdateInvocation(ctx, inv.ID, store.InvocationUpdate{Status: store.StatusCompleted, ExitCode: ptr(0)}); err != nil {
					return err
				}
			}
			if _, err := s.ListBundles(ctx, u.ID); err != nil {
				return err
			}
			if _, err := s.GetInvocation(ctx, u.ID, inv.ID); err != nil {
				return err
			}
		}
		return nil
	})
	for w, err := range errs {
		if err != nil {
			t.Fatalf("worker %d: %v", w, err)
		}
	}
	for _, u := range users {
		if got := must(s.ListBundles(t.Context(), u.ID))(t); len(got) != each {
			t.Fatalf("user %s has %d bundles, want %d", u.Name, len(got), each)
		}
	}
	if got := must(s.ListRunningInvocations(t.Context()))(t); len(got) != workers*each/2 {
		t.Fatalf("%d running invocations, want %d", len(got), workers*each/2)
	}
}
