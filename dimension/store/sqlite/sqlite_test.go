package sqlite_test

import (
	"bytes"
	"context"
	"database/sql"
	"os"
	"path/filepath"
	"testing"

	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/dimension/store/sqlite"
	"github.com/hyphae-run/hyphae/dimension/store/storetest"
	"github.com/hyphae-run/hyphae/errcode"
)

func open(t *testing.T, path string) store.Store {
	t.Helper()
	s, err := sqlite.Open(t.Context(), path, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) store.Store {
		return open(t, filepath.Join(t.TempDir(), sqlite.DefaultFile))
	})
}

func TestShared(t *testing.T) {
	storetest.RunShared(t, func(t *testing.T) storetest.Opener {
		path := filepath.Join(t.TempDir(), sqlite.DefaultFile)
		return func(ctx context.Context) (store.Store, error) { return sqlite.Open(ctx, path, nil) }
	})
}

func TestOpenRefusesBadPaths(t *testing.T) {
	dir := t.TempDir()
	notDir := filepath.Join(dir, "file")
	if err := os.WriteFile(notDir, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{"", filepath.Join(dir, "missing", "d.db"), filepath.Join(notDir, "d.db"),
		filepath.Join(dir, "d.db?mode=ro"), filepath.Join(dir, "d#1.db")} {
		_, err := sqlite.Open(t.Context(), path, nil)
		if !errcode.HasCode(err, errcode.InvalidArgument) {
			t.Errorf("Open(%q) = %v, want %s", path, err, errcode.InvalidArgument)
		}
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("refused opens left files behind: %v", entries)
	}
}

func TestOpenRefusesNonDatabase(t *testing.T) {
	path := filepath.Join(t.TempDir(), "junk.db")
	if err := os.WriteFile(path, bytes.Repeat([]byte("not a database "), 512), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := sqlite.Open(t.Context(), path, nil)
	if !errcode.HasCode(err, errcode.StoreError) {
		t.Fatalf("Open of a non-database = %v, want %s", err, errcode.StoreError)
	}
}

// TestNewerSchemaRefused: a database migrated by a newer dimension is not
// touched by an older one.
func TestNewerSchemaRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), sqlite.DefaultFile)
	s := open(t, path)
	_ = s.Close()
	db, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec("INSERT INTO schema_migrations (version, name, applied_at) VALUES (999, '0999_future.sql', 'x')"); err != nil {
		t.Fatal(err)
	}
	db.Close()
	_, err = sqlite.Open(t.Context(), path, nil)
	if !errcode.HasCode(err, errcode.StoreError) {
		t.Fatalf("Open of a newer schema = %v, want %s", err, errcode.StoreError)
	}
}

// TestOnlyHashesStored looks for plaintext keys in the database files.
func TestOnlyHashesStored(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, sqlite.DefaultFile)
	s := open(t, path)
	ctx := t.Context()
	boot, _, err := s.EnsureBootstrapAdmin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	u, err := s.CreateUser(ctx, "someone", store.RoleUser)
	if err != nil {
		t.Fatal(err)
	}
	_, plain, err := s.CreateAPIKey(ctx, u.ID)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	var all []byte
	files, _ := filepath.Glob(path + "*")
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, b...)
	}
	for _, key := range []string{boot, plain} {
		if bytes.Contains(all, []byte(key)) || bytes.Contains(all, []byte(key[15:])) {
			t.Fatalf("plaintext key found in %v", files)
		}
		if !bytes.Contains(all, []byte(store.HashKey(key))) {
			t.Fatalf("hash of a key not found in %v: the test is not reading the data", files)
		}
	}
}

// FuzzAuthenticate: a bearer token from the network authenticates only when
// it is exactly a stored key, and is otherwise refused with a code.
func FuzzAuthenticate(f *testing.F) {
	s, err := sqlite.Open(context.Background(), filepath.Join(f.TempDir(), sqlite.DefaultFile), nil)
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { _ = s.Close() })
	key, _, err := s.EnsureBootstrapAdmin(context.Background())
	if err != nil {
		f.Fatal(err)
	}
	for _, seed := range []string{key, key[:20], key + "0", "", "dim_sk_", store.NewAPIKey(), store.HashKey(key), "dim_sk_' OR 1=1 --"} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, token string) {
		p, err := s.Authenticate(context.Background(), token)
		if token == key {
			if err != nil || p.User.Name != store.BootstrapAdminName {
				t.Fatalf("the real key: %+v, %v", p, err)
			}
			return
		}
		if !errcode.HasCode(err, errcode.Unauthenticated) {
			t.Fatalf("Authenticate(%q) = %+v, %v; want %s", token, p, err, errcode.Unauthenticated)
		}
	})
}
