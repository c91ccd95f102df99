package postgres

import (
	"context"
	"io/fs"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/dimension/store/postgres/pgtest"
	"github.com/hyphae-run/hyphae/dimension/store/storetest"
)

func TestUpgrade(t *testing.T) {
	pgtest.ServerURL(t)
	storetest.RunUpgrade(t, func(t *testing.T) storetest.Upgrade {
		url := pgtest.NewDatabase(t)
		migrations, err := fs.Sub(migrationFiles, "migrations")
		if err != nil {
			t.Fatal(err)
		}
		return storetest.Upgrade{
			Open:       func(ctx context.Context, m fs.FS) (store.Store, error) { return openWith(ctx, url, m, nil) },
			Migrations: migrations,
			Exec: func(ctx context.Context, query string, args ...any) error {
				c, err := pgx.Connect(ctx, url)
				if err != nil {
					return err
				}
				defer c.Close(ctx)
				_, err = c.Exec(ctx, query, args...)
				return err
			},
		}
	})
}
