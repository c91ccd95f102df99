// Package postgres is the store.Store on PostgreSQL (pgx with a connection
// pool), for production and for several gateways sharing one database.
//
// Migrations run under a session advisory lock, so that gateways starting
// together apply each migration once. Transactions run at READ COMMITTED;
// the ones that change users first take a table lock that only they
// contend for (SHARE ROW EXCLUSIVE, which readers never wait on), so that
// the last-admin guard's count and the bootstrap's "no users yet" hold
// until their write commits.
package postgres

import (
	"context"
	"embed"
	"errors"
	"io/fs"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/dimension/store/internal/sqlstore"
	"github.com/hyphae-run/hyphae/errcode"
)

//go:embed migrations/*.sql
var migrationFiles embed.FS

// migrationLockKey is the advisory lock migrations hold: an arbitrary
// constant ("dimensio" in ASCII) that other applications are unlikely to
// use.
const migrationLockKey int64 = 0x64696d656e73696f

// unlockTimeout bounds releasing the migration lock.
const unlockTimeout = 10 * time.Second

// uniqueViolation is PostgreSQL's SQLSTATE for a unique-constraint failure.
const uniqueViolation = "23505"

// Open connects to databaseURL (a postgres:// URL or a key=value
// connection string, as libpq takes), applies pending migrations and
// returns the store. A nil logger discards logs.
func Open(ctx context.Context, databaseURL string, logger *slog.Logger) (store.Store, error) {
	migrations, err := fs.Sub(migrationFiles, "migrations")
	if err != nil {
		return nil, errcode.Wrap(errcode.StoreError, err, "read embedded migrations")
	}
	return openWith(ctx, databaseURL, migrations, logger)
}

// openWith is Open applying the given migrations, so that tests can make
// the database an older release left and upgrade it.
func openWith(ctx context.Context, databaseURL string, migrations fs.FS, logger *slog.Logger) (store.Store, error) {
	cfg, err := pgxpool.ParseConfig(databaseURL)
	if err != nil {
		// The parse error may quote the URL, password included.
		return nil, errcode.New(errcode.InvalidArgument, "DATABASE_URL is not a valid PostgreSQL connection string").
			WithHint("use postgres://user:password@host:port/dbname or postgres:///dbname?host=/var/run/postgresql")
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, errcode.Wrap(errcode.StoreError, err, "connect to PostgreSQL")
	}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, errcode.Wrap(errcode.StoreError, err, "connect to PostgreSQL at %s/%s", cfg.ConnConfig.Host, cfg.ConnConfig.Database)
	}
	return sqlstore.Open(ctx, &backend{conn: conn{pool}, pool: pool}, migrations, logger)
}

// querier is what a pool, a pooled connection and a transaction share.
type querier interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
	Begin(ctx context.Context) (pgx.Tx, error)
}

// conn runs statements on a querier.
type conn struct{ q querier }

func (c conn) Exec(ctx context.Context, query string, args ...any) (int64, error) {
	tag, err := c.q.Exec(ctx, query, args...)
	return tag.RowsAffected(), err
}

func (c conn) Query(ctx context.Context, query string, args ...any) (sqlstore.Rows, error) {
	return c.q.Query(ctx, query, args...)
}

func (c conn) QueryRow(ctx context.Context, query string, args ...any) sqlstore.Row {
	return c.q.QueryRow(ctx, query, args...)
}

// backend adapts pgx to sqlstore.Backend. pool is nil for the backend
// Migrating hands out, which runs on one locked connection and is only
// used for transactions.
type backend struct {
	conn
	pool *pgxpool.Pool
}

func (b *backend) Tx(ctx context.Context, fn func(sqlstore.Conn) error) error {
	tx, err := b.q.Begin(ctx)
	if err != nil {
		return err
	}
	if err := fn(conn{tx}); err != nil {
		_ = tx.Rollback(ctx)
		return err
	}
	return tx.Commit(ctx)
}

func (b *backend) LockUsers(ctx context.Context, tx sqlstore.Conn) error {
	_, err := tx.Exec(ctx, "LOCK TABLE users IN SHARE ROW EXCLUSIVE MODE")
	return err
}

// Migrating holds a session advisory lock on one connection of the pool
// while fn runs, and gives fn a backend on that connection.
func (b *backend) Migrating(ctx context.Context, fn func(sqlstore.Backend) error) error {
	c, err := b.pool.Acquire(ctx)
	if err != nil {
		return errcode.Wrap(errcode.StoreError, err, "acquire a connection for migrations")
	}
	defer c.Release()
	if _, err := c.Exec(ctx, "SELECT pg_advisory_lock($1)", migrationLockKey); err != nil {
		return errcode.Wrap(errcode.StoreError, err, "take the migration lock")
	}
	ferr := fn(&backend{conn: conn{c}})
	// Unlock on a fresh context: ctx may be what ended fn.
	uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), unlockTimeout)
	defer cancel()
	if _, err := c.Exec(uctx, "SELECT pg_advisory_unlock($1)", migrationLockKey); err != nil {
		// A connection that may still hold the lock must not go back to
		// the pool; closing it ends the session, which releases the lock.
		_ = c.Conn().Close(uctx)
		if ferr == nil {
			ferr = errcode.Wrap(errcode.StoreError, err, "release the migration lock")
		}
	}
	return ferr
}

func (*backend) IsUniqueViolation(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && pe.Code == uniqueViolation
}

func (b *backend) Close() error {
	b.pool.Close()
	return nil
}
