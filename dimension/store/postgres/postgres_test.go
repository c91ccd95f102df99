package postgres_test

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/dimension/store/postgres"
	"github.com/hyphae-run/hyphae/dimension/store/postgres/pgtest"
	"github.com/hyphae-run/hyphae/dimension/store/storetest"
	"github.com/hyphae-run/hyphae/errcode"
)

func open(t *testing.T, url string) store.Store {
	t.Helper()
	s, err := postgres.Open(t.Context(), url, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func TestConformance(t *testing.T) {
	pgtest.ServerURL(t)
	storetest.Run(t, func(t *testing.T) store.Store { return open(t, pgtest.NewDatabase(t)) })
}

func TestShared(t *testing.T) {
	pgtest.ServerURL(t)
	storetest.RunShared(t, func(t *testing.T) storetest.Opener {
		url := pgtest.NewDatabase(t)
		return func(ctx context.Context) (store.Store, error) { return postgres.Open(ctx, url, nil) }
	})
}

func TestOpenRefusesBadURLs(t *testing.T) {
	for _, url := range []string{"postgres://host:notaport/db", "host=/nonexistent/socket-dir dbname=x connect_timeout=2"} {
		_, err := postgres.Open(t.Context(), url, nil)
		if !errcode.HasCode(err, errcode.InvalidArgument) && !errcode.HasCode(err, errcode.StoreError) {
			t.Errorf("Open(%q) = %v, want %s or %s", url, err, errcode.InvalidArgument, errcode.StoreError)
		}
	}
}

// TestNewerSchemaRefused: a database migrated by a newer dimension is not
// touched by an older one.
func TestNewerSchemaRefused(t *testing.T) {
	url := pgtest.NewDatabase(t)
	s := open(t, url)
	_ = s.Close()
	c, err := pgx.Connect(t.Context(), url)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(t.Context())
	if _, err := c.Exec(t.Context(), "INSERT INTO schema_migrations (version, name, applied_at) VALUES (999, '0999_future.sql', 'x')"); err != nil {
		t.Fatal(err)
	}
	_, err = postgres.Open(t.Context(), url, nil)
	if !errcode.HasCode(err, errcode.StoreError) {
		t.Fatalf("Open of a newer schema = %v, want %s", err, errcode.StoreError)
	}
}

// TestOnlyHashesStored looks for plaintext keys in every text column of
// api_keys.
func TestOnlyHashesStored(t *testing.T) {
	url := pgtest.NewDatabase(t)
	s := open(t, url)
	ctx := t.Context()
	boot, _, err := s.EnsureBootstrapAdmin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	var leaks, hashes int
	if err := c.QueryRow(ctx, `SELECT
		COUNT(*) FILTER (WHERE strpos(k::text, $1) > 0 OR strpos(k::text, $2) > 0),
		COUNT(*) FILTER (WHERE k.hash = $3)
		FROM api_keys k`, boot, boot[15:], store.HashKey(boot)).Scan(&leaks, &hashes); err != nil {
		t.Fatal(err)
	}
	if leaks != 0 || hashes != 1 {
		t.Fatalf("api_keys rows with the plaintext: %d (want 0); with its hash: %d (want 1)", leaks, hashes)
	}
}
