// Package sqlstore implements store.Store once, over SQL that SQLite and
// PostgreSQL both accept ($N placeholders, ON CONFLICT upserts, RETURNING),
// so that the two backends cannot drift apart in semantics. Each backend
// supplies a Backend: how to run statements and transactions on its
// driver, how to serialize changes to users, and how to recognize a unique
// violation; and its own migrations, because column types differ.
package sqlstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
)

// Conn runs statements, inside or outside a transaction.
type Conn interface {
	// Exec runs a statement and returns the number of rows it affected.
	Exec(ctx context.Context, query string, args ...any) (int64, error)
	// Query runs a statement that returns rows.
	Query(ctx context.Context, query string, args ...any) (Rows, error)
	// QueryRow runs a statement that returns at most one row; Scan reports
	// an error matching sql.ErrNoRows when there is none.
	QueryRow(ctx context.Context, query string, args ...any) Row
}

// Row is one result row.
type Row interface {
	Scan(dest ...any) error
}

// Rows is a result set.
type Rows interface {
	Next() bool
	Scan(dest ...any) error
	Err() error
	Close()
}

// Backend is a database the store runs on.
type Backend interface {
	Conn
	// Tx runs fn in one transaction, committing when it returns nil. On
	// SQLite the transaction takes the write lock up front.
	Tx(ctx context.Context, fn func(Conn) error) error
	// LockUsers runs first in every transaction that changes users, so
	// that such transactions (the last-admin guard, the bootstrap) run one
	// after another even across processes. On SQLite the up-front write lock
	// already does that.
	LockUsers(ctx context.Context, tx Conn) error
	// Migrating runs fn while holding the database-wide migration lock, with
	// a Backend on which fn's transactions run under that lock.
	Migrating(ctx context.Context, fn func(Backend) error) error
	// IsUniqueViolation reports whether err is a unique-constraint failure.
	IsUniqueViolation(err error) bool
	// Close releases the database.
	Close() error
}

// dbErr wraps a database failure as errcode.StoreError, leaving errors that
// already carry a code as they are.
func dbErr(err error, format string, args ...any) error {
	if err == nil {
		return nil
	}
	var e *errcode.Error
	if errors.As(err, &e) {
		return err
	}
	return errcode.Wrap(errcode.StoreError, err, format, args...)
}

// notFound reports whether err is the driver's "no rows".
func notFound(err error) bool { return errors.Is(err, sql.ErrNoRows) }

// now returns the current time at the precision both databases keep
// (microseconds), so that a record reads back exactly as it was written.
func now() time.Time { return time.Now().UTC().Truncate(time.Microsecond) }

// timeCol scans a timestamp from either driver: pgx delivers time.Time,
// SQLite (with _time_integer_format=unix_micro) stores and delivers Unix
// microseconds.
type timeCol struct{ t *time.Time }

func (c timeCol) Scan(src any) error {
	switch v := src.(type) {
	case time.Time:
		*c.t = v.UTC()
	case int64:
		*c.t = time.UnixMicro(v).UTC()
	default:
		return fmt.Errorf("cannot read %T as a timestamp", src)
	}
	return nil
}

// nullTimeCol is timeCol for a nullable column.
type nullTimeCol struct{ t **time.Time }

func (c nullTimeCol) Scan(src any) error {
	if src == nil {
		*c.t = nil
		return nil
	}
	var t time.Time
	if err := (timeCol{&t}).Scan(src); err != nil {
		return err
	}
	*c.t = &t
	return nil
}
