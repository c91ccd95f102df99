package registry

import (
	"context"
	"database/sql"
	"embed"
	"fmt"
	"io/fs"
	"log/slog"
	"sort"
	"strconv"
	"strings"

	"github.com/hyphae-run/hyphae/errcode"
)

// migrationFiles holds the schema as numbered SQL files, NNNN_name.sql.
// The database's PRAGMA user_version records the last one applied. A
// released migration is never edited; changes come as a new file.
//
//go:embed migrations/*.sql
var migrationFiles embed.FS

type migration struct {
	version int
	name    string
	sql     string
}

// migrations returns the embedded migrations in version order, checking that
// versions run 1, 2, 3, … without gaps.
func migrations() ([]migration, error) {
	entries, err := fs.ReadDir(migrationFiles, "migrations")
	if err != nil {
		return nil, errcode.Wrap(errcode.RegistryError, err, "read embedded migrations")
	}
	var ms []migration
	for _, e := range entries {
		num, _, ok := strings.Cut(e.Name(), "_")
		v, err := strconv.Atoi(num)
		if !ok || err != nil {
			return nil, errcode.New(errcode.RegistryError, "migration file %s is not named NNNN_name.sql", e.Name())
		}
		b, err := fs.ReadFile(migrationFiles, "migrations/"+e.Name())
		if err != nil {
			return nil, errcode.Wrap(errcode.RegistryError, err, "read migration %s", e.Name())
		}
		ms = append(ms, migration{version: v, name: e.Name(), sql: string(b)})
	}
	sort.Slice(ms, func(i, j int) bool { return ms[i].version < ms[j].version })
	for i, m := range ms {
		if m.version != i+1 {
			return nil, errcode.New(errcode.RegistryError, "migration %s out of sequence (want version %d)", m.name, i+1)
		}
	}
	return ms, nil
}

// migrate applies every pending migration, each in its own write
// transaction together with the user_version bump, so a crash leaves the
// schema at a whole version. The version is re-read inside the transaction:
// another process may have migrated in the meantime.
func migrate(ctx context.Context, db *sql.DB, logger *slog.Logger) error {
	ms, err := migrations()
	if err != nil {
		return err
	}
	for _, m := range ms {
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			return dbErr(err, "begin migration %s", m.name)
		}
		var current int
		if err := tx.QueryRowContext(ctx, "PRAGMA user_version").Scan(&current); err != nil {
			_ = tx.Rollback()
			return dbErr(err, "read schema version")
		}
		if current > len(ms) {
			_ = tx.Rollback()
			return errcode.New(errcode.RegistryError, "registry schema version %d is newer than this hyphae knows (%d)", current, len(ms)).
				WithHint("upgrade hyphae, or point --home at another directory")
		}
		if current >= m.version {
			_ = tx.Rollback()
			continue
		}
		if _, err := tx.ExecContext(ctx, m.sql); err != nil {
			_ = tx.Rollback()
			return dbErr(err, "apply migration %s", m.name)
		}
		// PRAGMA takes no bound parameters; the version is an int we made.
		if _, err := tx.ExecContext(ctx, fmt.Sprintf("PRAGMA user_version = %d", m.version)); err != nil {
			_ = tx.Rollback()
			return dbErr(err, "record migration %s", m.name)
		}
		if err := tx.Commit(); err != nil {
			return dbErr(err, "commit migration %s", m.name)
		}
		logger.Debug("registry migrated", "version", m.version, "migration", m.name)
	}
	return nil
}
