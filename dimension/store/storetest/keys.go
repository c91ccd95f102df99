package storetest

import (
	"context"
	"reflect"
	"strings"
	"testing"

	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/errcode"
)

func testAPIKeys(t *testing.T, s store.Store) {
	ctx := t.Context()
	u := newUser(t, s, "keyholder", store.RoleUser)
	k1, plain1 := newKey(t, s, u.ID)
	k2, plain2 := newKey(t, s, u.ID)

	for _, p := range []string{plain1, plain2} {
		if !store.WellFormedKey(p) || !strings.HasPrefix(p, "dim_sk_") || len(p) != len("dim_sk_")+64 {
			t.Fatalf("key %q is not dim_sk_ + 64 hex", p)
		}
	}
	if plain1 == plain2 || k1.ID == k2.ID {
		t.Fatal("two keys are the same")
	}
	if k1.Prefix != plain1[:15] || k1.UserID != u.ID || k1.RevokedAt != nil || k1.LastUsedAt != nil {
		t.Fatalf("key record = %+v (plaintext %q)", k1, plain1)
	}

	keys := must(s.ListAPIKeys(ctx, u.ID))(t)
	if len(keys) != 2 {
		t.Fatalf("ListAPIKeys = %+v, want 2 keys", keys)
	}
	for _, k := range keys {
		if strings.Contains(k.Prefix, plain1[15:]) || len(k.Prefix) != 15 {
			t.Fatalf("listing shows more than the prefix: %+v", k)
		}
	}

	p := must(s.Authenticate(ctx, plain1))(t)
	if p.User.ID != u.ID || p.User.Name != "keyholder" || p.Key.ID != k1.ID || p.Key.LastUsedAt == nil {
		t.Fatalf("Authenticate = %+v", p)
	}
	var listed store.APIKey
	for _, k := range must(s.ListAPIKeys(ctx, u.ID))(t) {
		if k.ID == k1.ID {
			listed = k
		}
	}
	if listed.LastUsedAt == nil || !listed.LastUsedAt.Equal(*p.Key.LastUsedAt) {
		t.Fatalf("last use not recorded: listed %+v, authenticated %+v", listed, p.Key)
	}
	// A second use within the granularity keeps the recorded time.
	again := must(s.Authenticate(ctx, plain1))(t)
	if !again.Key.LastUsedAt.Equal(*p.Key.LastUsedAt) {
		t.Fatalf("last use moved within %s: %v then %v", store.LastUsedGranularity, p.Key.LastUsedAt, again.Key.LastUsedAt)
	}

	revoked := must(s.RevokeAPIKey(ctx, u.ID, k1.ID))(t)
	if revoked.RevokedAt == nil {
		t.Fatalf("revoked key = %+v", revoked)
	}
	_, err := s.Authenticate(ctx, plain1)
	wantCode(t, err, errcode.Unauthenticated, "revoked key")
	twice := must(s.RevokeAPIKey(ctx, u.ID, k1.ID))(t)
	if !twice.RevokedAt.Equal(*revoked.RevokedAt) {
		t.Fatalf("second revoke moved revoked_at: %v → %v", revoked.RevokedAt, twice.RevokedAt)
	}
	// The other key is unaffected and the revoked one is still listed.
	must(s.Authenticate(ctx, plain2))(t)
	keys = must(s.ListAPIKeys(ctx, u.ID))(t)
	revokedListed := 0
	for _, k := range keys {
		if k.RevokedAt != nil {
			revokedListed++
		}
	}
	if len(keys) != 2 || revokedListed != 1 {
		t.Fatalf("after revoke ListAPIKeys = %+v", keys)
	}

	other := newUser(t, s, "other", store.RoleUser)
	_, err = s.RevokeAPIKey(ctx, other.ID, k2.ID)
	wantCode(t, err, errcode.NotFound, "revoke through another user")
	must(s.Authenticate(ctx, plain2))(t)
	_, err = s.RevokeAPIKey(ctx, u.ID, "key_missing")
	wantCode(t, err, errcode.NotFound, "revoke of an unknown key")
	_, _, err = s.CreateAPIKey(ctx, "usr_missing")
	wantCode(t, err, errcode.NotFound, "key for an unknown user")
	_, err = s.ListAPIKeys(ctx, "usr_missing")
	wantCode(t, err, errcode.NotFound, "keys of an unknown user")
	if got := must(s.ListAPIKeys(ctx, other.ID))(t); len(got) != 0 {
		t.Fatalf("a user without keys lists %+v", got)
	}

	// Disabling the user refuses every key; enabling restores them.
	must(s.SetUserDisabled(ctx, u.ID, true))(t)
	_, err = s.Authenticate(ctx, plain2)
	wantCode(t, err, errcode.Unauthenticated, "key of a disabled user")
	must(s.SetUserDisabled(ctx, u.ID, false))(t)
	if got := must(s.Authenticate(ctx, plain2))(t); !reflect.DeepEqual(got.User, must(s.GetUser(ctx, u.ID))(t)) {
		t.Fatalf("Authenticate user = %+v", got.User)
	}
}

func testAuthenticateRefuses(t *testing.T, s store.Store) {
	ctx := t.Context()
	u := newUser(t, s, "holder", store.RoleUser)
	_, plain := newKey(t, s, u.ID)
	flipped := []byte(plain)
	if flipped[len(flipped)-1] == '0' {
		flipped[len(flipped)-1] = '1'
	} else {
		flipped[len(flipped)-1] = '0'
	}
	tests := []struct{ name, key string }{
		{"empty", ""},
		{"prefix only", "dim_sk_"},
		{"short", plain[:len(plain)-1]},
		{"long", plain + "0"},
		{"uppercase hex", strings.ToUpper(plain[:7]) + strings.ToUpper(plain[7:])},
		{"other prefix", "dim_pk_" + plain[7:]},
		{"surrounding space", " " + plain + " "},
		{"wrong key", string(flipped)},
		{"unknown well-formed key", store.NewAPIKey()},
		{"the hash itself", store.HashKey(plain)},
		{"sql", "dim_sk_' OR '1'='1"},
	}
	for _, tc := range tests {
		_, err := s.Authenticate(ctx, tc.key)
		wantCode(t, err, errcode.Unauthenticated, tc.name)
	}
	must(s.Authenticate(ctx, plain))(t)
}

func testBootstrapAdmin(t *testing.T, s store.Store) {
	ctx := t.Context()
	key, created, err := s.EnsureBootstrapAdmin(ctx)
	if err != nil || !created || !store.WellFormedKey(key) {
		t.Fatalf("EnsureBootstrapAdmin on an empty store = %q, %v, %v", key, created, err)
	}
	p := must(s.Authenticate(ctx, key))(t)
	if p.User.Name != store.BootstrapAdminName || p.User.Role != store.RoleAdmin {
		t.Fatalf("bootstrap key authenticates %+v", p.User)
	}
	key2, created2, err := s.EnsureBootstrapAdmin(ctx)
	if err != nil || created2 || key2 != "" {
		t.Fatalf("second EnsureBootstrapAdmin = %q, %v, %v; want nothing done", key2, created2, err)
	}
	if us := must(s.ListUsers(ctx))(t); len(us) != 1 {
		t.Fatalf("users after two bootstraps: %+v", us)
	}
	if ks := must(s.ListAPIKeys(ctx, p.User.ID))(t); len(ks) != 1 {
		t.Fatalf("bootstrap admin keys: %+v", ks)
	}
}

func testBootstrapConcurrent(t *testing.T, s store.Store) {
	keys := make([]string, 8)
	errs := race(len(keys), func(ctx context.Context, i int) error {
		key, created, err := s.EnsureBootstrapAdmin(ctx)
		if created != (key != "") {
			t.Errorf("racer %d: created=%v with key %q", i, created, key)
		}
		keys[i] = key
		return err
	})
	created := 0
	for i, err := range errs {
		if err != nil {
			t.Fatalf("racer %d: %v", i, err)
		}
		if keys[i] != "" {
			created++
			must(s.Authenticate(t.Context(), keys[i]))(t)
		}
	}
	if created != 1 {
		t.Fatalf("%d of %d concurrent bootstraps created an admin, want 1", created, len(keys))
	}
	if us := must(s.ListUsers(t.Context()))(t); len(us) != 1 {
		t.Fatalf("users after concurrent bootstrap: %+v", us)
	}
}

func testBootstrapSkipped(t *testing.T, s store.Store) {
	// Any user at all, even a non-admin, means the store is set up.
	newUser(t, s, "someone", store.RoleUser)
	key, created, err := s.EnsureBootstrapAdmin(t.Context())
	if err != nil || created || key != "" {
		t.Fatalf("EnsureBootstrapAdmin with a user present = %q, %v, %v", key, created, err)
	}
	_, err = s.GetUserByName(t.Context(), store.BootstrapAdminName)
	wantCode(t, err, errcode.NotFound, "bootstrap admin created anyway")
}
