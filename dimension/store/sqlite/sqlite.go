// Package sqlite is the embedded store.Store: one SQLite file (pure Go,
// modernc.org/sqlite), the default when no DATABASE_URL is set.
//
// The database runs in WAL mode with a busy timeout and foreign keys on,
// and every transaction takes SQLite's write lock up front (BEGIN
// IMMEDIATE), so that writers, also in other processes, queue instead of
// failing on a lock upgrade, and a transaction's checks (the last-admin
// guard, the bootstrap) cannot be overtaken before its write.
package sqlite

import (
	"context"
	"database/sql"
	"embed"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"

	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/dimension/store/internal/sqlstore"
	"github.com/hyphae-run/hyphae/errcode"
)

//go:embed migrations/*.sql
var migrationFiles embed.FS

// DefaultFile is the database's file name under DIMENSION_DATA_DIR.
const DefaultFile = "dimension.db"

// maxConns caps the pool: SQLite runs one writer at a time anyway, and
// waiters queue in order in database/sql instead of polling in SQLite's
// sleeping busy handler.
const maxConns = 8

// busyTimeout bounds how long a statement waits for another writer.
const busyTimeout = 10 * time.Second

// Open opens (creating when needed) the store in the SQLite file at path
// and applies pending migrations. Its directory must exist. A nil logger
// discards logs.
func Open(ctx context.Context, path string, logger *slog.Logger) (store.Store, error) {
	migrations, err := fs.Sub(migrationFiles, "migrations")
	if err != nil {
		return nil, errcode.Wrap(errcode.StoreError, err, "read embedded migrations")
	}
	return openWith(ctx, path, migrations, logger)
}

// openWith is Open applying the given migrations, so that tests can make
// the database an older release left and upgrade it.
func openWith(ctx context.Context, path string, migrations fs.FS, logger *slog.Logger) (store.Store, error) {
	if path == "" {
		return nil, errcode.New(errcode.InvalidArgument, "store database path is empty")
	}
	if strings.ContainsAny(path, "?#") {
		// The driver takes a file: URI, where these start the query.
		return nil, errcode.New(errcode.InvalidArgument, "store database path %q contains '?' or '#'", path)
	}
	dir := filepath.Dir(path)
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		return nil, errcode.New(errcode.InvalidArgument, "store directory %s does not exist", dir).
			WithHint("set DIMENSION_DATA_DIR to an existing writable directory")
	}
	db, err := sql.Open("sqlite", dsn(path))
	if err != nil {
		return nil, errcode.Wrap(errcode.StoreError, err, "open %s", path)
	}
	db.SetMaxOpenConns(maxConns)
	if err := db.PingContext(ctx); err != nil {
		db.Close()
		return nil, errcode.Wrap(errcode.StoreError, err, "open %s", path)
	}
	return sqlstore.Open(ctx, newBackend(db), migrations, logger)
}

// dsn returns the modernc.org/sqlite connection string: busy timeout first
// so that the WAL switch itself waits for other processes, timestamps bound
// as Unix microseconds, and BEGIN IMMEDIATE for every transaction.
func dsn(path string) string {
	return "file:" + path + "?_pragma=busy_timeout(" + strconv.FormatInt(busyTimeout.Milliseconds(), 10) + ")" +
		"&_pragma=journal_mode(WAL)&_pragma=foreign_keys(1)&_pragma=synchronous(NORMAL)" +
		"&_time_integer_format=unix_micro&_txlock=immediate"
}

// conn runs statements on a *sql.DB or in a *sql.Tx.
type conn struct{ q querier }

// querier is what *sql.DB and *sql.Tx share.
type querier interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

func (c conn) Exec(ctx context.Context, query string, args ...any) (int64, error) {
	res, err := c.q.ExecContext(ctx, query, args...)
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

func (c conn) Query(ctx context.Context, query string, args ...any) (sqlstore.Rows, error) {
	rows, err := c.q.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, err
	}
	return sqlRows{rows}, nil
}

func (c conn) QueryRow(ctx context.Context, query string, args ...any) sqlstore.Row {
	return c.q.QueryRowContext(ctx, query, args...)
}

// sqlRows drops the error of Close, which database/sql also reports
// through Err.
type sqlRows struct{ *sql.Rows }

func (r sqlRows) Close() { _ = r.Rows.Close() }

// backend adapts database/sql on SQLite to sqlstore.Backend.
type backend struct {
	conn
	db *sql.DB
}

func newBackend(db *sql.DB) backend { return backend{conn: conn{db}, db: db} }

func (b backend) Tx(ctx context.Context, fn func(sqlstore.Conn) error) error {
	tx, err := b.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if err := fn(conn{tx}); err != nil {
		_ = tx.Rollback()
		return err
	}
	return tx.Commit()
}

// LockUsers does nothing: BEGIN IMMEDIATE has already serialized the
// transaction against every other writer.
func (backend) LockUsers(context.Context, sqlstore.Conn) error { return nil }

// Migrating needs no lock of its own, for the same reason.
func (b backend) Migrating(_ context.Context, fn func(sqlstore.Backend) error) error { return fn(b) }

func (backend) IsUniqueViolation(err error) bool {
	var se *sqlite.Error
	if !errors.As(err, &se) {
		return false
	}
	return se.Code() == sqlite3.SQLITE_CONSTRAINT_UNIQUE || se.Code() == sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY
}

func (b backend) Close() error { return b.db.Close() }
