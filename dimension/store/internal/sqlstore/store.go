package sqlstore

import (
	"context"
	"io/fs"
	"log/slog"

	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/errcode"
)

// Store implements store.Store on a Backend.
type Store struct {
	b      Backend
	logger *slog.Logger
}

var _ store.Store = (*Store)(nil)

// Open migrates b with migrations (a directory of NNNN_name.sql files) and
// returns a Store on it. Open owns b: it closes b when it fails. A nil
// logger discards logs.
func Open(ctx context.Context, b Backend, migrations fs.FS, logger *slog.Logger) (*Store, error) {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	if err := migrate(ctx, b, migrations, logger); err != nil {
		_ = b.Close()
		return nil, err
	}
	return &Store{b: b, logger: logger}, nil
}

// Close closes the backend.
func (s *Store) Close() error {
	if err := s.b.Close(); err != nil {
		return errcode.Wrap(errcode.StoreError, err, "close store")
	}
	return nil
}

// tx runs fn in a transaction, wrapping database failures.
func (s *Store) tx(ctx context.Context, what string, fn func(Conn) error) error {
	return dbErr(s.b.Tx(ctx, fn), "%s", what)
}

// usersTx runs fn in a transaction that holds the users lock.
func (s *Store) usersTx(ctx context.Context, what string, fn func(Conn) error) error {
	return s.tx(ctx, what, func(tx Conn) error {
		if err := s.b.LockUsers(ctx, tx); err != nil {
			return dbErr(err, "lock users")
		}
		return fn(tx)
	})
}

// collect reads every row of a query with scan.
func collect[T any](rows Rows, err error, scan func(Row) (T, error)) ([]T, error) {
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []T
	for rows.Next() {
		v, err := scan(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, rows.Err()
}
