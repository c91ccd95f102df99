// Package registry is hyphae's local store: an embedded SQLite database
// (registry.db) describing content-addressed image files (images/), kernels
// (kernels/) and the VMs started from them.
//
// Image files are immutable and named after their digest; tags are movable
// names pointing at digests. Several hyphae processes may use one home at
// once: the database runs in WAL mode with a busy timeout, and every write
// transaction takes SQLite's write lock up front (BEGIN IMMEDIATE) so that
// two writers queue instead of failing on a lock upgrade.
//
// On open the database is migrated to the current schema and checked with
// PRAGMA quick_check. A damaged database is moved aside and rebuilt; the
// image and kernel files found on disk are registered again (without their
// tags), so that no image file is ever lost to a corrupt index.
package registry

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"

	"github.com/hyphae-run/hyphae/errcode"
)

// Layout of a hyphae home directory.
const (
	DBFile     = "registry.db"
	ImagesDir  = "images"
	KernelsDir = "kernels"
	lockFile   = ".registry.lock"
)

// TempPrefix starts the name of every file written into images/ or
// kernels/ before it is registered (create them with
// os.CreateTemp(dir, TempPrefix+"*")). GC leaves such files alone for
// TempMaxAge, so that it never deletes a build in progress.
const TempPrefix = ".tmp-"

// TempMaxAge is how old an unregistered temp file must be before GC
// removes it.
const TempMaxAge = time.Hour

// busyTimeout bounds how long a statement waits for another process's lock.
const busyTimeout = 10 * time.Second

// timeLayout is fixed-width so that timestamps stored as TEXT sort in time
// order.
const timeLayout = "2006-01-02T15:04:05.000000000Z"

// Registry is an open hyphae home. It is safe for concurrent use.
type Registry struct {
	home   string
	db     *sql.DB
	logger *slog.Logger
}

// Open opens (creating when needed) the registry in home: it creates
// home/images and home/kernels, opens home/registry.db, applies pending
// migrations and checks the database's integrity, recovering from
// corruption as described in the package documentation. A nil logger
// discards logs.
func Open(ctx context.Context, home string, logger *slog.Logger) (*Registry, error) {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	if home == "" {
		return nil, errcode.New(errcode.InvalidArgument, "registry home is empty")
	}
	abs, err := filepath.Abs(home)
	if err != nil {
		return nil, errcode.Wrap(errcode.RegistryError, err, "resolve registry home %s", home)
	}
	for _, d := range []string{abs, filepath.Join(abs, ImagesDir), filepath.Join(abs, KernelsDir)} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, wrapHint(errcode.RegistryError, err, "set HYPHAE_HOME (or --home) to a writable directory",
				"create %s", d)
		}
	}
	r := &Registry{home: abs, logger: logger}

	// Opening, migrating and recovering run under an exclusive file lock:
	// two processes must not both decide the database is damaged and move
	// each other's fresh copy aside.
	unlock, err := lockHome(ctx, filepath.Join(abs, lockFile))
	if err != nil {
		return nil, err
	}
	defer unlock()

	db, err := r.openChecked(ctx)
	if isCorruption(err) {
		db, err = r.recover(ctx, err)
	}
	if err != nil {
		return nil, err
	}
	r.db = db
	return r, nil
}

// Close closes the database.
func (r *Registry) Close() error {
	if err := r.db.Close(); err != nil {
		return errcode.Wrap(errcode.RegistryError, err, "close registry")
	}
	return nil
}

// Home returns the absolute home directory.
func (r *Registry) Home() string { return r.home }

// ImagesDir returns the directory holding image files.
func (r *Registry) ImagesDir() string { return filepath.Join(r.home, ImagesDir) }

// KernelsDir returns the directory holding kernel files.
func (r *Registry) KernelsDir() string { return filepath.Join(r.home, KernelsDir) }

// ImagePath returns where the image file of digest ("sha256:<hex>") lives:
// images/sha256-<hex>.ext4.
func (r *Registry) ImagePath(digest string) string {
	return filepath.Join(r.ImagesDir(), strings.Replace(digest, ":", "-", 1)+".ext4")
}

func (r *Registry) dbPath() string { return filepath.Join(r.home, DBFile) }

// dsn returns the modernc.org/sqlite connection string: busy timeout first
// so that the WAL switch itself waits for other processes, foreign keys on,
// and BEGIN IMMEDIATE for every transaction.
func dsn(path string) string {
	return "file:" + path + fmt.Sprintf("?_pragma=busy_timeout(%d)", busyTimeout.Milliseconds()) +
		"&_pragma=journal_mode(WAL)&_pragma=foreign_keys(1)&_pragma=synchronous(NORMAL)&_txlock=immediate"
}

// openChecked opens the database, migrates it and runs quick_check.
func (r *Registry) openChecked(ctx context.Context) (*sql.DB, error) {
	db, err := sql.Open("sqlite", dsn(r.dbPath()))
	if err != nil {
		return nil, errcode.Wrap(errcode.RegistryError, err, "open %s", r.dbPath())
	}
	if err := r.checkAndMigrate(ctx, db); err != nil {
		db.Close()
		return nil, err
	}
	return db, nil
}

func (r *Registry) checkAndMigrate(ctx context.Context, db *sql.DB) error {
	if err := db.PingContext(ctx); err != nil {
		return dbErr(err, "open %s", r.dbPath())
	}
	if err := quickCheck(ctx, db); err != nil {
		return err
	}
	return migrate(ctx, db, r.logger)
}

// quickCheck runs PRAGMA quick_check and reports anything but "ok" as
// corruption.
func quickCheck(ctx context.Context, db *sql.DB) error {
	rows, err := db.QueryContext(ctx, "PRAGMA quick_check")
	if err != nil {
		return dbErr(err, "integrity check")
	}
	defer rows.Close()
	var problems []string
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			return dbErr(err, "integrity check")
		}
		if s != "ok" {
			problems = append(problems, s)
		}
	}
	if err := rows.Err(); err != nil {
		return dbErr(err, "integrity check")
	}
	if len(problems) > 0 {
		return errcode.New(errcode.Corrupt, "registry database failed its integrity check: %s", strings.Join(problems, "; "))
	}
	return nil
}

// isCorruption reports whether err says the database file is damaged (as
// opposed to busy or unreadable for other reasons, which must never trigger
// a rebuild).
func isCorruption(err error) bool {
	if err == nil {
		return false
	}
	if errcode.HasCode(err, errcode.Corrupt) {
		return true
	}
	var se *sqlite.Error
	if errors.As(err, &se) {
		switch se.Code() & 0xff {
		case sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB:
			return true
		}
	}
	return false
}

// recover moves the damaged database (and its WAL and shared-memory files)
// aside, creates a fresh one, and registers the files found under images/
// and kernels/ again.
func (r *Registry) recover(ctx context.Context, cause error) (*sql.DB, error) {
	aside := fmt.Sprintf("%s.corrupt-%s", r.dbPath(), time.Now().UTC().Format("20060102T150405.000000000"))
	r.logger.Warn("registry database is damaged; moving it aside and rebuilding from the files on disk",
		"db", r.dbPath(), "moved_to", aside, "cause", cause)
	for _, suffix := range []string{"", "-wal", "-shm"} {
		err := os.Rename(r.dbPath()+suffix, aside+suffix)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, errcode.Wrap(errcode.Corrupt, err, "move damaged registry database aside")
		}
	}
	db, err := r.openChecked(ctx)
	if err != nil {
		return nil, err
	}
	fresh := &Registry{home: r.home, db: db, logger: r.logger}
	images, kernels, err := fresh.reregister(ctx)
	if err != nil {
		db.Close()
		return nil, err
	}
	r.logger.Warn("registry rebuilt; image files are registered again without their tags",
		"images", images, "kernels", kernels, "old_db", aside)
	return db, nil
}

// lockHome takes an exclusive flock on path, polling until ctx ends or
// busyTimeout passes.
func lockHome(ctx context.Context, path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, errcode.Wrap(errcode.RegistryError, err, "open lock file %s", path)
	}
	ctx, cancel := context.WithTimeout(ctx, busyTimeout)
	defer cancel()
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() {
				_ = unix.Flock(int(f.Fd()), unix.LOCK_UN)
				f.Close()
			}, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, errcode.Wrap(errcode.RegistryError, err, "lock %s", path)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, wrapHint(errcode.Timeout, ctx.Err(), "another hyphae process is opening this registry; retry",
				"waiting for the registry lock %s", path)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// dbErr wraps a database error with a code: E505 for corruption, E503
// otherwise.
func dbErr(err error, format string, args ...any) error {
	if err == nil {
		return nil
	}
	var e *errcode.Error
	if errors.As(err, &e) {
		return fmt.Errorf("%s: %w", fmt.Sprintf(format, args...), err)
	}
	code := errcode.RegistryError
	if isCorruption(err) {
		code = errcode.Corrupt
	}
	return errcode.Wrap(code, err, format, args...)
}

// writeTx runs fn in one write transaction (BEGIN IMMEDIATE through the
// DSN), committing when fn returns nil.
func (r *Registry) writeTx(ctx context.Context, fn func(*sql.Tx) error) error {
	tx, err := r.db.BeginTx(ctx, nil)
	if err != nil {
		return dbErr(err, "begin transaction")
	}
	if err := fn(tx); err != nil {
		_ = tx.Rollback()
		return err
	}
	if err := tx.Commit(); err != nil {
		return dbErr(err, "commit")
	}
	return nil
}

func formatTime(t time.Time) string { return t.UTC().Format(timeLayout) }

func nullTime(t *time.Time) sql.NullString {
	if t == nil {
		return sql.NullString{}
	}
	return sql.NullString{String: formatTime(*t), Valid: true}
}

func parseTime(s string) (time.Time, error) {
	t, err := time.Parse(timeLayout, s)
	if err != nil {
		return time.Time{}, errcode.Wrap(errcode.Corrupt, err, "bad timestamp %q in registry", s)
	}
	return t, nil
}

func parseNullTime(s sql.NullString) (*time.Time, error) {
	if !s.Valid {
		return nil, nil
	}
	t, err := parseTime(s.String)
	if err != nil {
		return nil, err
	}
	return &t, nil
}

// wrapHint is errcode.Wrap with a hint for the user.
func wrapHint(code errcode.Code, err error, hint, format string, args ...any) error {
	e := errcode.New(code, format, args...)
	e.Err = err
	return e.WithHint(hint)
}
