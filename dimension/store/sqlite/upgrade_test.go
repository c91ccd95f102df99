package sqlite

import (
	"context"
	"database/sql"
	"io/fs"
	"path/filepath"
	"testing"

	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/dimension/store/storetest"
)

func TestUpgrade(t *testing.T) {
	storetest.RunUpgrade(t, func(t *testing.T) storetest.Upgrade {
		path := filepath.Join(t.TempDir(), DefaultFile)
		migrations, err := fs.Sub(migrationFiles, "migrations")
		if err != nil {
			t.Fatal(err)
		}
		return storetest.Upgrade{
			Open:       func(ctx context.Context, m fs.FS) (store.Store, error) { return openWith(ctx, path, m, nil) },
			Migrations: migrations,
			Exec: func(ctx context.Context, query string, args ...any) error {
				// The store's own connection string, so that timestamps
				// are bound as it binds them.
				db, err := sql.Open("sqlite", dsn(path))
				if err != nil {
					return err
				}
				defer db.Close()
				_, err = db.ExecContext(ctx, query, args...)
				return err
			},
		}
	})
}
