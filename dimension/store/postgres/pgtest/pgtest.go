// Package pgtest gives tests a fresh PostgreSQL database of their own.
//
// The server is named by HYPHAE_TEST_DATABASE_URL (or DATABASE_URL);
// scripts/postgres.sh starts one and prints its URL. Without either, tests
// that need PostgreSQL are skipped (failed under HYPHAE_E2E=require).
package pgtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/hyphae-run/hyphae/internal/testenv"
)

// EnvURL names the variable that points tests at a PostgreSQL server.
const EnvURL = "HYPHAE_TEST_DATABASE_URL"

// adminTimeout bounds creating and dropping a test database.
const adminTimeout = 30 * time.Second

// ServerURL returns the configured server's URL, or marks t unavailable.
func ServerURL(t testing.TB) string {
	t.Helper()
	for _, env := range []string{EnvURL, "DATABASE_URL"} {
		if u := os.Getenv(env); u != "" {
			return u
		}
	}
	testenv.Unavailable(t, "no PostgreSQL: set "+EnvURL+"=$(scripts/postgres.sh)")
	return ""
}

// NewDatabase creates an empty database test_<random> on the configured
// server, drops it when t ends, and returns its URL.
func NewDatabase(t testing.TB) string {
	t.Helper()
	server := ServerURL(t)
	var b [8]byte
	_, _ = rand.Read(b[:])
	name := "test_" + hex.EncodeToString(b[:])

	ctx, cancel := context.WithTimeout(context.Background(), adminTimeout)
	defer cancel()
	admin, err := pgx.Connect(ctx, server)
	if err != nil {
		testenv.Unavailable(t, "cannot connect to PostgreSQL at "+EnvURL+": "+err.Error())
	}
	defer admin.Close(ctx)
	// The name is ours (hex), so quoting it is enough.
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		t.Fatalf("create test database: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), adminTimeout)
		defer cancel()
		c, err := pgx.Connect(ctx, server)
		if err != nil {
			t.Errorf("drop test database %s: %v", name, err)
			return
		}
		defer c.Close(ctx)
		if _, err := c.Exec(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)"); err != nil {
			t.Errorf("drop test database %s: %v", name, err)
		}
	})
	return withDatabase(t, server, name)
}

// withDatabase returns server's connection string pointed at database.
func withDatabase(t testing.TB, server, database string) string {
	t.Helper()
	if !strings.Contains(server, "://") {
		// key=value form: a later key overrides an earlier one.
		return server + " dbname=" + database
	}
	u, err := url.Parse(server)
	if err != nil {
		t.Fatalf("%s is not a URL: %v", EnvURL, err)
	}
	u.Path = "/" + database
	q := u.Query()
	q.Del("dbname")
	u.RawQuery = q.Encode()
	return u.String()
}
