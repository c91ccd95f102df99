package storetest

import (
	"context"
	"testing"

	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/errcode"
)

// Opener opens one more handle on a database.
type Opener func(ctx context.Context) (store.Store, error)

// openOne opens a handle that t's cleanup closes.
func openOne(t *testing.T, open Opener) store.Store {
	t.Helper()
	s := must(open(t.Context()))(t)
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// openMany opens n handles at once, as n gateways starting together do.
func openMany(t *testing.T, open Opener, n int) []store.Store {
	t.Helper()
	handles := make([]store.Store, n)
	errs := race(n, func(ctx context.Context, i int) error {
		var err error
		handles[i], err = open(ctx)
		return err
	})
	for i, h := range handles {
		if h != nil {
			t.Cleanup(func() { _ = h.Close() })
		}
		if errs[i] != nil {
			t.Fatalf("handle %d: %v", i, errs[i])
		}
	}
	return handles
}

func testConcurrentOpen(t *testing.T, open Opener) {
	handles := openMany(t, open, 4)
	u := newUser(t, handles[0], "shared", store.RoleUser)
	for i, h := range handles {
		if got := must(h.GetUser(t.Context(), u.ID))(t); got.Name != "shared" {
			t.Fatalf("handle %d sees %+v", i, got)
		}
	}
}

func testBootstrapAcrossHandles(t *testing.T, open Opener) {
	handles := openMany(t, open, 4)
	keys := make([]string, len(handles))
	errs := race(len(handles), func(ctx context.Context, i int) error {
		var err error
		keys[i], _, err = handles[i].EnsureBootstrapAdmin(ctx)
		return err
	})
	created := 0
	for i, err := range errs {
		if err != nil {
			t.Fatalf("handle %d: %v", i, err)
		}
		if keys[i] != "" {
			created++
		}
	}
	if created != 1 {
		t.Fatalf("%d gateways created a bootstrap admin, want 1", created)
	}
	if us := must(handles[1].ListUsers(t.Context()))(t); len(us) != 1 {
		t.Fatalf("users = %+v", us)
	}
}

func testLastAdminAcrossHandles(t *testing.T, open Opener) {
	handles := openMany(t, open, 2)
	ids := []string{
		newUser(t, handles[0], "a", store.RoleAdmin).ID,
		newUser(t, handles[0], "b", store.RoleAdmin).ID,
	}
	for round := range 5 {
		errs := race(2, func(ctx context.Context, i int) error {
			_, err := handles[i].SetUserRole(ctx, ids[i], store.RoleUser)
			return err
		})
		if ok := outcome(t, errs, errcode.LastAdmin); ok != 1 {
			t.Fatalf("round %d: %d demotions through two handles succeeded, want 1", round, ok)
		}
		for _, id := range ids {
			must(handles[0].SetUserRole(t.Context(), id, store.RoleAdmin))(t)
		}
	}
}

func testReopen(t *testing.T, open Opener) {
	first := must(open(t.Context()))(t)
	u := newUser(t, first, "persistent", store.RoleAdmin)
	_, plain := newKey(t, first, u.ID)
	b := newBundle(t, first, u.ID, "echo", "latest", "99")
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	again := openOne(t, open) // migrations already applied: a no-op
	if p := must(again.Authenticate(t.Context(), plain))(t); p.User.ID != u.ID {
		t.Fatalf("after reopen the key authenticates %+v", p.User)
	}
	if got := must(again.GetBundle(t.Context(), u.ID, "echo"))(t); got.ID != b.ID {
		t.Fatalf("after reopen echo is %+v", got)
	}
}
