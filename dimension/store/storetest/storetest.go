// Package storetest is the conformance suite every store.Store
// implementation runs: the same assertions against SQLite and PostgreSQL, so
// that the gateway sees one behaviour whichever backend it is given.
package storetest

import (
	"context"
	"strings"
	"sync"
	"testing"

	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/errcode"
)

// Run runs the conformance suite. newStore must return a fresh, empty,
// migrated store for each subtest and close it in a t.Cleanup.
func Run(t *testing.T, newStore func(t *testing.T) store.Store) {
	tests := []struct {
		name string
		fn   func(*testing.T, store.Store)
	}{
		{"Users", testUsers},
		{"UserValidation", testUserValidation},
		{"DeleteUserCascades", testDeleteUserCascades},
		{"LastAdminGuard", testLastAdminGuard},
		{"ConcurrentDemoteOfLastTwoAdmins", testConcurrentDemote},
		{"APIKeys", testAPIKeys},
		{"AuthenticateRefuses", testAuthenticateRefuses},
		{"BootstrapAdmin", testBootstrapAdmin},
		{"BootstrapAdminConcurrent", testBootstrapConcurrent},
		{"BootstrapSkippedWhenUsersExist", testBootstrapSkipped},
		{"Bundles", testBundles},
		{"BundleTagMove", testBundleTagMove},
		{"BundleValidation", testBundleValidation},
		{"OwnershipIsolation", testOwnershipIsolation},
		{"Invocations", testInvocations},
		{"InvocationValidation", testInvocationValidation},
		{"FinalStatusIsFinal", testFinalStatusIsFinal},
		{"ConcurrentFinalStatus", testConcurrentFinalStatus},
		{"BundleJobs", testBundleJobs},
		{"ConcurrencySmoke", testConcurrencySmoke},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) { tc.fn(t, newStore(t)) })
	}
}

// RunShared runs the tests that need several handles on one database, as
// when several gateways share it. newDatabase makes a fresh, empty database
// (removed by its t.Cleanup) and returns how to open handles on it; the
// suite closes the handles it opens.
func RunShared(t *testing.T, newDatabase func(t *testing.T) Opener) {
	t.Run("ConcurrentOpen", func(t *testing.T) { testConcurrentOpen(t, newDatabase(t)) })
	t.Run("BootstrapAcrossHandles", func(t *testing.T) { testBootstrapAcrossHandles(t, newDatabase(t)) })
	t.Run("LastAdminAcrossHandles", func(t *testing.T) { testLastAdminAcrossHandles(t, newDatabase(t)) })
	t.Run("Reopen", func(t *testing.T) { testReopen(t, newDatabase(t)) })
}

// wantCode fails t unless err carries code.
func wantCode(t *testing.T, err error, code errcode.Code, what string) {
	t.Helper()
	if !errcode.HasCode(err, code) {
		t.Fatalf("%s: got error %v, want code %s", what, err, code)
	}
}

// must returns a check that fails t on err and otherwise returns v, as in
// must(s.GetUser(ctx, id))(t).
func must[T any](v T, err error) func(t *testing.T) T {
	return func(t *testing.T) T {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
}

func newUser(t *testing.T, s store.Store, name string, role store.Role) store.User {
	t.Helper()
	return must(s.CreateUser(t.Context(), name, role))(t)
}

func newKey(t *testing.T, s store.Store, userID string) (store.APIKey, string) {
	t.Helper()
	k, plain, err := s.CreateAPIKey(t.Context(), userID)
	if err != nil {
		t.Fatal(err)
	}
	return k, plain
}

// digest makes a distinct valid image digest from a short seed.
func digest(seed string) string {
	return "sha256:" + strings.Repeat("0", 64-len(seed)) + seed
}

func newBundle(t *testing.T, s store.Store, owner, name, tag, seed string) store.Bundle {
	t.Helper()
	return must(s.PutBundle(t.Context(), store.Bundle{Owner: owner, Name: name, Tag: tag, ImageDigest: digest(seed), SizeBytes: 4096}))(t)
}

func newInvocation(t *testing.T, s store.Store, owner string, b store.Bundle) store.Invocation {
	t.Helper()
	return must(s.CreateInvocation(t.Context(), store.Invocation{Owner: owner, BundleID: b.ID, BundleRef: b.Ref(), Mode: store.ModeAsync}))(t)
}

// race runs n copies of fn at once (released together) and returns their
// errors in order.
func race(n int, fn func(ctx context.Context, i int) error) []error {
	ctx := context.Background()
	errs := make([]error, n)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			<-start
			errs[i] = fn(ctx, i)
		})
	}
	close(start)
	wg.Wait()
	return errs
}

// outcome counts the nil errors among errs and fails t on any error without
// code.
func outcome(t *testing.T, errs []error, code errcode.Code) (ok int) {
	t.Helper()
	for i, err := range errs {
		switch {
		case err == nil:
			ok++
		case !errcode.HasCode(err, code):
			t.Errorf("racer %d: got error %v, want nil or code %s", i, err, code)
		}
	}
	return ok
}
