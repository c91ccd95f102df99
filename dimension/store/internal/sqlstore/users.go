package sqlstore

import (
	"context"

	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/errcode"
)

const userCols = "id, name, role, disabled, created_at"

func scanUser(r Row) (store.User, error) {
	var u store.User
	err := r.Scan(&u.ID, &u.Name, (*string)(&u.Role), &u.Disabled, timeCol{&u.CreatedAt})
	return u, err
}

// activeAdmin reports whether u counts for the last-admin guard.
func activeAdmin(u store.User) bool { return u.Role == store.RoleAdmin && !u.Disabled }

// CreateUser implements store.Users.
func (s *Store) CreateUser(ctx context.Context, name string, role store.Role) (store.User, error) {
	if err := store.ValidateUserName(name); err != nil {
		return store.User{}, err
	}
	if !role.Valid() {
		return store.User{}, errcode.New(errcode.InvalidArgument, "invalid role %q (want admin or user)", role)
	}
	var u store.User
	err := s.usersTx(ctx, "create user "+name, func(tx Conn) error {
		var err error
		u, err = s.insertUser(ctx, tx, name, role)
		return err
	})
	return u, err
}

func (s *Store) insertUser(ctx context.Context, tx Conn, name string, role store.Role) (store.User, error) {
	u, err := scanUser(tx.QueryRow(ctx,
		"INSERT INTO users (id, name, role, disabled, created_at) VALUES ($1, $2, $3, FALSE, $4) RETURNING "+userCols,
		store.NewID(store.UserIDPrefix), name, string(role), now()))
	if s.b.IsUniqueViolation(err) {
		return store.User{}, errcode.New(errcode.AlreadyExists, "a user named %q exists", name)
	}
	return u, dbErr(err, "create user %s", name)
}

// getUser reads one user by id.
func getUser(ctx context.Context, c Conn, id string) (store.User, error) {
	u, err := scanUser(c.QueryRow(ctx, "SELECT "+userCols+" FROM users WHERE id = $1", id))
	if notFound(err) {
		return store.User{}, errcode.New(errcode.NotFound, "no user with id %q", id)
	}
	return u, dbErr(err, "read user %s", id)
}

// GetUser implements store.Users.
func (s *Store) GetUser(ctx context.Context, id string) (store.User, error) {
	return getUser(ctx, s.b, id)
}

// GetUserByName implements store.Users.
func (s *Store) GetUserByName(ctx context.Context, name string) (store.User, error) {
	u, err := scanUser(s.b.QueryRow(ctx, "SELECT "+userCols+" FROM users WHERE name = $1", name))
	if notFound(err) {
		return store.User{}, errcode.New(errcode.NotFound, "no user named %q", name)
	}
	return u, dbErr(err, "read user %s", name)
}

// ListUsers implements store.Users.
func (s *Store) ListUsers(ctx context.Context) ([]store.User, error) {
	rows, err := s.b.Query(ctx, "SELECT "+userCols+" FROM users ORDER BY created_at, id")
	us, err := collect(rows, err, scanUser)
	return us, dbErr(err, "list users")
}

// CountAdmins implements store.Users.
func (s *Store) CountAdmins(ctx context.Context) (int, error) {
	return countAdmins(ctx, s.b)
}

func countAdmins(ctx context.Context, c Conn) (int, error) {
	var n int
	err := c.QueryRow(ctx, "SELECT COUNT(*) FROM users WHERE role = 'admin' AND NOT disabled").Scan(&n)
	return n, dbErr(err, "count admins")
}

// guardLastAdmin refuses a change that takes u out of the enabled admins
// when u is the last one. It runs inside the users lock, so the count
// cannot change before the write that follows it.
func guardLastAdmin(ctx context.Context, tx Conn, u store.User, change string) error {
	if !activeAdmin(u) {
		return nil
	}
	n, err := countAdmins(ctx, tx)
	if err != nil {
		return err
	}
	if n <= 1 {
		return errcode.New(errcode.LastAdmin, "cannot %s %s: it is the last enabled admin", change, u.Name).
			WithHint("promote another user to admin first")
	}
	return nil
}

// DeleteUser implements store.Users. The user's keys, bundles, jobs and
// invocations go with it (ON DELETE CASCADE).
func (s *Store) DeleteUser(ctx context.Context, id string) error {
	return s.usersTx(ctx, "delete user "+id, func(tx Conn) error {
		u, err := getUser(ctx, tx, id)
		if err != nil {
			return err
		}
		if err := guardLastAdmin(ctx, tx, u, "delete"); err != nil {
			return err
		}
		_, err = tx.Exec(ctx, "DELETE FROM users WHERE id = $1", id)
		return dbErr(err, "delete user %s", id)
	})
}

// SetUserRole implements store.Users.
func (s *Store) SetUserRole(ctx context.Context, id string, role store.Role) (store.User, error) {
	if !role.Valid() {
		return store.User{}, errcode.New(errcode.InvalidArgument, "invalid role %q (want admin or user)", role)
	}
	change := "demote"
	if role == store.RoleAdmin {
		change = "promote"
	}
	return s.changeUser(ctx, id, change, role != store.RoleAdmin,
		"UPDATE users SET role = $2 WHERE id = $1 RETURNING "+userCols, string(role))
}

// SetUserDisabled implements store.Users.
func (s *Store) SetUserDisabled(ctx context.Context, id string, disabled bool) (store.User, error) {
	change := "enable"
	if disabled {
		change = "disable"
	}
	return s.changeUser(ctx, id, change, disabled,
		"UPDATE users SET disabled = $2 WHERE id = $1 RETURNING "+userCols, disabled)
}

// changeUser runs update (with $1 = id, $2 = value) on a user under the
// users lock, first applying the last-admin guard when the change removes
// admin power.
func (s *Store) changeUser(ctx context.Context, id, change string, removesAdmin bool, update string, value any) (store.User, error) {
	var u store.User
	err := s.usersTx(ctx, change+" user "+id, func(tx Conn) error {
		cur, err := getUser(ctx, tx, id)
		if err != nil {
			return err
		}
		if removesAdmin {
			if err := guardLastAdmin(ctx, tx, cur, change); err != nil {
				return err
			}
		}
		u, err = scanUser(tx.QueryRow(ctx, update, id, value))
		return dbErr(err, "%s user %s", change, id)
	})
	return u, err
}

// EnsureBootstrapAdmin implements store.Users.
func (s *Store) EnsureBootstrapAdmin(ctx context.Context) (string, bool, error) {
	var key string
	err := s.usersTx(ctx, "bootstrap admin", func(tx Conn) error {
		var n int
		if err := tx.QueryRow(ctx, "SELECT COUNT(*) FROM users").Scan(&n); err != nil {
			return dbErr(err, "count users")
		}
		if n > 0 {
			return nil
		}
		u, err := s.insertUser(ctx, tx, store.BootstrapAdminName, store.RoleAdmin)
		if err != nil {
			return err
		}
		_, key, err = insertKey(ctx, tx, u.ID)
		return err
	})
	if err != nil {
		return "", false, err
	}
	if key != "" {
		s.logger.Info("created the bootstrap admin", "user", store.BootstrapAdminName)
	}
	return key, key != "", nil
}
