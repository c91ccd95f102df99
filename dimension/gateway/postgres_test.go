package gateway

import (
	"net/http"
	"testing"

	"github.com/hyphae-run/hyphae/dimension/runner"
	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/dimension/store/postgres/pgtest"
)

// The gateway on PostgreSQL (HYPHAE_TEST_DATABASE_URL; scripts/postgres.sh
// starts one): auth, the admin guard, ownership, a sync and an async run
// with its stream, on the same code paths as with SQLite.
func TestPostgres(t *testing.T) {
	e := newEnv(t, envOptions{databaseURL: pgtest.NewDatabase(t)})
	u, key := e.newUser("pguser")
	_, other := e.newUser("pgother")
	e.seedBundle(u.ID, "echo", fx.echoDigest, store.Manifest{})

	e.do("GET", "/bundles", "dim_sk_bogus", nil).apiError(t, http.StatusUnauthorized, CodeUnauthorized)
	admin, err := e.st.GetUserByName(t.Context(), store.BootstrapAdminName)
	if err != nil {
		t.Fatal(err)
	}
	e.do("POST", "/admin/users/"+admin.ID+"/demote", e.adminKey, nil).apiError(t, http.StatusConflict, CodeConflict)

	var res runResult
	e.do("POST", "/run", key, map[string]any{"bundle_id": "echo", "payload": []int{1, 2}}).ok(t, http.StatusOK, &res)
	if res.Stdout != "[1,2]" || res.Status != runner.StatusCompleted {
		t.Fatalf("sync run %+v", res)
	}
	id := e.startRun(key, "echo", "pg")
	evs := e.openStream(key, id, "").rest(t)
	if c := completedOf(t, evs); c.Status != runner.StatusCompleted || len(evs) != 10 {
		t.Fatalf("async run: %v %+v", kindsOf(evs), c)
	}
	inv := e.finalInvocation(key, id)
	if inv.Status != store.StatusCompleted {
		t.Fatalf("invocation %+v", inv)
	}
	e.do("GET", "/invocations/"+id, other, nil).apiError(t, http.StatusNotFound, CodeNotFound)
	e.do("GET", "/runs/"+id+"/events", other, nil).apiError(t, http.StatusNotFound, CodeNotFound)
	e.do("GET", "/bundles/echo", other, nil).apiError(t, http.StatusNotFound, CodeNotFound)
}
