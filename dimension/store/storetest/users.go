package storetest

import (
	"context"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/errcode"
)

func testUsers(t *testing.T, s store.Store) {
	ctx := t.Context()
	alice := newUser(t, s, "alice", store.RoleAdmin)
	bob := newUser(t, s, "bob", store.RoleUser)
	if !strings.HasPrefix(alice.ID, store.UserIDPrefix) || alice.ID == bob.ID {
		t.Fatalf("ids %q, %q: want distinct %s ids", alice.ID, bob.ID, store.UserIDPrefix)
	}
	if alice.Name != "alice" || alice.Role != store.RoleAdmin || alice.Disabled || alice.CreatedAt.IsZero() {
		t.Fatalf("created user = %+v", alice)
	}
	if got := must(s.GetUser(ctx, alice.ID))(t); !reflect.DeepEqual(got, alice) {
		t.Fatalf("GetUser = %+v, want %+v", got, alice)
	}
	if got := must(s.GetUserByName(ctx, "bob"))(t); !reflect.DeepEqual(got, bob) {
		t.Fatalf("GetUserByName = %+v, want %+v", got, bob)
	}
	// Creation order is only as fine as the clock, so compare as a set.
	users := must(s.ListUsers(ctx))(t)
	slices.SortFunc(users, func(x, y store.User) int { return strings.Compare(x.Name, y.Name) })
	if !reflect.DeepEqual(users, []store.User{alice, bob}) {
		t.Fatalf("ListUsers = %+v, want alice and bob", users)
	}

	_, err := s.CreateUser(ctx, "alice", store.RoleUser)
	wantCode(t, err, errcode.AlreadyExists, "duplicate name")

	_, err = s.GetUser(ctx, "usr_missing")
	wantCode(t, err, errcode.NotFound, "GetUser of an unknown id")
	_, err = s.GetUserByName(ctx, "carol")
	wantCode(t, err, errcode.NotFound, "GetUserByName of an unknown name")

	promoted := must(s.SetUserRole(ctx, bob.ID, store.RoleAdmin))(t)
	if promoted.Role != store.RoleAdmin || must(s.CountAdmins(ctx))(t) != 2 {
		t.Fatalf("after promote: %+v, %d admins", promoted, must(s.CountAdmins(ctx))(t))
	}
	disabled := must(s.SetUserDisabled(ctx, bob.ID, true))(t)
	if !disabled.Disabled || must(s.CountAdmins(ctx))(t) != 1 {
		t.Fatalf("disabled admin still counts: %+v, %d admins", disabled, must(s.CountAdmins(ctx))(t))
	}
	if got := must(s.GetUser(ctx, bob.ID))(t); !got.Disabled || got.Role != store.RoleAdmin {
		t.Fatalf("stored user = %+v, want disabled admin", got)
	}
	enabled := must(s.SetUserDisabled(ctx, bob.ID, false))(t)
	demoted := must(s.SetUserRole(ctx, bob.ID, store.RoleUser))(t)
	if enabled.Disabled || demoted.Role != store.RoleUser {
		t.Fatalf("enable/demote: %+v, %+v", enabled, demoted)
	}

	_, err = s.SetUserRole(ctx, "usr_missing", store.RoleAdmin)
	wantCode(t, err, errcode.NotFound, "SetUserRole of an unknown id")
	_, err = s.SetUserDisabled(ctx, "usr_missing", true)
	wantCode(t, err, errcode.NotFound, "SetUserDisabled of an unknown id")
	wantCode(t, s.DeleteUser(ctx, "usr_missing"), errcode.NotFound, "DeleteUser of an unknown id")
	_, err = s.SetUserRole(ctx, bob.ID, "root")
	wantCode(t, err, errcode.InvalidArgument, "SetUserRole to an unknown role")

	if err := s.DeleteUser(ctx, bob.ID); err != nil {
		t.Fatal(err)
	}
	_, err = s.GetUser(ctx, bob.ID)
	wantCode(t, err, errcode.NotFound, "GetUser after delete")
	if got := must(s.ListUsers(ctx))(t); len(got) != 1 || got[0].ID != alice.ID {
		t.Fatalf("ListUsers after delete = %+v", got)
	}
}

func testUserValidation(t *testing.T, s store.Store) {
	ctx := t.Context()
	tests := []struct {
		name string
		role store.Role
	}{
		{"", store.RoleUser},
		{"Alice", store.RoleUser},
		{"-alice", store.RoleUser},
		{"al ice", store.RoleUser},
		{"al/ice", store.RoleUser},
		{"ålice", store.RoleUser},
		{strings.Repeat("a", 65), store.RoleUser},
		{"alice", ""},
		{"alice", "superuser"},
	}
	for _, tc := range tests {
		_, err := s.CreateUser(ctx, tc.name, tc.role)
		wantCode(t, err, errcode.InvalidArgument, "CreateUser("+tc.name+", "+string(tc.role)+")")
	}
	if got := must(s.ListUsers(ctx))(t); len(got) != 0 {
		t.Fatalf("refused users were stored: %+v", got)
	}
	// The longest valid name and the allowed punctuation pass.
	newUser(t, s, strings.Repeat("a", 64), store.RoleUser)
	newUser(t, s, "a.b_c-d9", store.RoleUser)
}

func testDeleteUserCascades(t *testing.T, s store.Store) {
	ctx := t.Context()
	newUser(t, s, "admin", store.RoleAdmin)
	u := newUser(t, s, "leaver", store.RoleUser)
	_, plain := newKey(t, s, u.ID)
	b := newBundle(t, s, u.ID, "echo", "latest", "1")
	inv := newInvocation(t, s, u.ID, b)
	job := must(s.CreateBundleJob(ctx, u.ID, "w1"))(t)

	if err := s.DeleteUser(ctx, u.ID); err != nil {
		t.Fatal(err)
	}
	_, err := s.Authenticate(ctx, plain)
	wantCode(t, err, errcode.Unauthenticated, "key of a deleted user")
	_, err = s.GetBundle(ctx, u.ID, b.ID)
	wantCode(t, err, errcode.NotFound, "bundle of a deleted user")
	_, err = s.GetInvocation(ctx, u.ID, inv.ID)
	wantCode(t, err, errcode.NotFound, "invocation of a deleted user")
	_, err = s.GetBundleJob(ctx, u.ID, job.ID)
	wantCode(t, err, errcode.NotFound, "job of a deleted user")
	if got := must(s.ListRunningInvocations(ctx))(t); len(got) != 0 {
		t.Fatalf("running invocations of a deleted user remain: %+v", got)
	}
}

func testLastAdminGuard(t *testing.T, s store.Store) {
	ctx := t.Context()
	root := newUser(t, s, "root", store.RoleAdmin)
	plain := newUser(t, s, "plain", store.RoleUser)
	if n := must(s.CountAdmins(ctx))(t); n != 1 {
		t.Fatalf("CountAdmins = %d, want 1", n)
	}

	refusals := []struct {
		what string
		do   func() error
	}{
		{"demote", func() error { _, err := s.SetUserRole(ctx, root.ID, store.RoleUser); return err }},
		{"disable", func() error { _, err := s.SetUserDisabled(ctx, root.ID, true); return err }},
		{"delete", func() error { return s.DeleteUser(ctx, root.ID) }},
	}
	check := func(stage string) {
		t.Helper()
		for _, r := range refusals {
			wantCode(t, r.do(), errcode.LastAdmin, stage+": "+r.what+" of the last admin")
		}
		if got := must(s.GetUser(ctx, root.ID))(t); got.Role != store.RoleAdmin || got.Disabled {
			t.Fatalf("%s: a refused change was applied: %+v", stage, got)
		}
	}
	check("one admin")

	// A disabled admin does not count: root is still the last enabled one.
	other := newUser(t, s, "other", store.RoleAdmin)
	must(s.SetUserDisabled(ctx, other.ID, true))(t)
	check("second admin disabled")

	// Changes to non-admins and no-op changes are never refused.
	must(s.SetUserRole(ctx, root.ID, store.RoleAdmin))(t)
	must(s.SetUserDisabled(ctx, root.ID, false))(t)
	must(s.SetUserRole(ctx, plain.ID, store.RoleUser))(t)
	must(s.SetUserDisabled(ctx, plain.ID, true))(t)
	if err := s.DeleteUser(ctx, plain.ID); err != nil {
		t.Fatalf("delete a non-admin: %v", err)
	}

	// With a second enabled admin, root may go; then the other is last.
	must(s.SetUserDisabled(ctx, other.ID, false))(t)
	must(s.SetUserRole(ctx, root.ID, store.RoleUser))(t)
	if n := must(s.CountAdmins(ctx))(t); n != 1 {
		t.Fatalf("CountAdmins = %d, want 1", n)
	}
	_, err := s.SetUserRole(ctx, other.ID, store.RoleUser)
	wantCode(t, err, errcode.LastAdmin, "demote of the new last admin")
	must(s.SetUserRole(ctx, root.ID, store.RoleAdmin))(t)
	if err := s.DeleteUser(ctx, other.ID); err != nil {
		t.Fatalf("delete one of two admins: %v", err)
	}
}

// testConcurrentDemote races the demotion of two admins, the only two,
// many times: each time exactly one may win.
func testConcurrentDemote(t *testing.T, s store.Store) {
	ctx := t.Context()
	a := newUser(t, s, "a", store.RoleAdmin)
	b := newUser(t, s, "b", store.RoleAdmin)
	ids := []string{a.ID, b.ID}
	changes := []func(ctx context.Context, id string) error{
		func(ctx context.Context, id string) error {
			_, err := s.SetUserRole(ctx, id, store.RoleUser)
			return err
		},
		func(ctx context.Context, id string) error { _, err := s.SetUserDisabled(ctx, id, true); return err },
	}
	for round := range 10 {
		change := changes[round%len(changes)]
		errs := race(2, func(ctx context.Context, i int) error { return change(ctx, ids[i]) })
		if ok := outcome(t, errs, errcode.LastAdmin); ok != 1 {
			t.Fatalf("round %d: %d of 2 demotions succeeded (%v), want exactly 1", round, ok, errs)
		}
		if n := must(s.CountAdmins(ctx))(t); n != 1 {
			t.Fatalf("round %d: %d admins left, want 1", round, n)
		}
		for _, id := range ids {
			must(s.SetUserRole(ctx, id, store.RoleAdmin))(t)
			must(s.SetUserDisabled(ctx, id, false))(t)
		}
	}
}
