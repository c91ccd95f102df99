package sqlstore

import (
	"context"
	"io/fs"
	"log/slog"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
)

type migration struct {
	version int
	name    string
	sql     string
}

// loadMigrations reads files, a directory of NNNN_name.sql files, in
// version order, checking that versions run 1, 2, 3, … without gaps. A
// released migration is never edited; changes come as a new file.
func loadMigrations(files fs.FS) ([]migration, error) {
	entries, err := fs.ReadDir(files, ".")
	if err != nil {
		return nil, errcode.Wrap(errcode.StoreError, err, "read embedded migrations")
	}
	var ms []migration
	for _, e := range entries {
		num, _, ok := strings.Cut(e.Name(), "_")
		v, err := strconv.Atoi(num)
		if !ok || err != nil || !strings.HasSuffix(e.Name(), ".sql") {
			return nil, errcode.New(errcode.StoreError, "migration file %s is not named NNNN_name.sql", e.Name())
		}
		b, err := fs.ReadFile(files, e.Name())
		if err != nil {
			return nil, errcode.Wrap(errcode.StoreError, err, "read migration %s", e.Name())
		}
		ms = append(ms, migration{version: v, name: e.Name(), sql: string(b)})
	}
	sort.Slice(ms, func(i, j int) bool { return ms[i].version < ms[j].version })
	for i, m := range ms {
		if m.version != i+1 {
			return nil, errcode.New(errcode.StoreError, "migration %s out of sequence (want version %d)", m.name, i+1)
		}
	}
	return ms, nil
}

// The bookkeeping table uses only types both databases share.
const createMigrationsTable = `CREATE TABLE IF NOT EXISTS schema_migrations (
	version INTEGER PRIMARY KEY,
	name TEXT NOT NULL,
	applied_at TEXT NOT NULL
)`

// migrate applies every pending migration under the backend's migration
// lock, each in its own transaction together with its schema_migrations
// row, so that a crash leaves the schema at a whole version and two
// processes starting at once apply each migration once.
func migrate(ctx context.Context, b Backend, files fs.FS, logger *slog.Logger) error {
	ms, err := loadMigrations(files)
	if err != nil {
		return err
	}
	return b.Migrating(ctx, func(mb Backend) error {
		for _, m := range ms {
			applied := false
			err := mb.Tx(ctx, func(tx Conn) error {
				if _, err := tx.Exec(ctx, createMigrationsTable); err != nil {
					return dbErr(err, "create schema_migrations")
				}
				var latest, have int
				if err := tx.QueryRow(ctx, "SELECT COALESCE(MAX(version), 0) FROM schema_migrations").Scan(&latest); err != nil {
					return dbErr(err, "read schema version")
				}
				if latest > len(ms) {
					return errcode.New(errcode.StoreError, "store schema version %d is newer than this dimension knows (%d)", latest, len(ms)).
						WithHint("upgrade dimension-server, or point it at another database")
				}
				if err := tx.QueryRow(ctx, "SELECT COUNT(*) FROM schema_migrations WHERE version = $1", m.version).Scan(&have); err != nil {
					return dbErr(err, "read schema version")
				}
				if have > 0 {
					return nil
				}
				if _, err := tx.Exec(ctx, m.sql); err != nil {
					return dbErr(err, "apply migration %s", m.name)
				}
				if _, err := tx.Exec(ctx, "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
					m.version, m.name, time.Now().UTC().Format(time.RFC3339Nano)); err != nil {
					return dbErr(err, "record migration %s", m.name)
				}
				applied = true
				return nil
			})
			if err != nil {
				return err
			}
			if applied {
				logger.Info("store migrated", "version", m.version, "migration", m.name)
			}
		}
		return nil
	})
}
