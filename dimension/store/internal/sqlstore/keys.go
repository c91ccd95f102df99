package sqlstore

import (
	"context"
	"crypto/subtle"

	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/errcode"
)

const keyCols = "id, user_id, prefix, created_at, revoked_at, last_used_at"

func scanKey(r Row) (store.APIKey, error) {
	var k store.APIKey
	err := r.Scan(&k.ID, &k.UserID, &k.Prefix, timeCol{&k.CreatedAt}, nullTimeCol{&k.RevokedAt}, nullTimeCol{&k.LastUsedAt})
	return k, err
}

// insertKey makes a key for userID and stores its hash.
func insertKey(ctx context.Context, tx Conn, userID string) (store.APIKey, string, error) {
	plain := store.NewAPIKey()
	k, err := scanKey(tx.QueryRow(ctx,
		"INSERT INTO api_keys (id, user_id, prefix, hash, created_at) VALUES ($1, $2, $3, $4, $5) RETURNING "+keyCols,
		store.NewID(store.KeyIDPrefix), userID, store.DisplayPrefix(plain), store.HashKey(plain), now()))
	if err != nil {
		return store.APIKey{}, "", dbErr(err, "create API key for user %s", userID)
	}
	return k, plain, nil
}

// CreateAPIKey implements store.APIKeys.
func (s *Store) CreateAPIKey(ctx context.Context, userID string) (store.APIKey, string, error) {
	var (
		k     store.APIKey
		plain string
	)
	err := s.tx(ctx, "create API key", func(tx Conn) error {
		if _, err := getUser(ctx, tx, userID); err != nil {
			return err
		}
		var err error
		k, plain, err = insertKey(ctx, tx, userID)
		return err
	})
	return k, plain, err
}

// ListAPIKeys implements store.APIKeys.
func (s *Store) ListAPIKeys(ctx context.Context, userID string) ([]store.APIKey, error) {
	if _, err := getUser(ctx, s.b, userID); err != nil {
		return nil, err
	}
	rows, err := s.b.Query(ctx, "SELECT "+keyCols+" FROM api_keys WHERE user_id = $1 ORDER BY created_at, id", userID)
	ks, err := collect(rows, err, scanKey)
	return ks, dbErr(err, "list API keys of user %s", userID)
}

// RevokeAPIKey implements store.APIKeys.
func (s *Store) RevokeAPIKey(ctx context.Context, userID, keyID string) (store.APIKey, error) {
	k, err := scanKey(s.b.QueryRow(ctx,
		"UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $3) WHERE id = $1 AND user_id = $2 RETURNING "+keyCols,
		keyID, userID, now()))
	if notFound(err) {
		return store.APIKey{}, errcode.New(errcode.NotFound, "user %q has no API key %q", userID, keyID)
	}
	return k, dbErr(err, "revoke API key %s", keyID)
}

// Authenticate implements store.APIKeys. The key is looked up by its hash;
// the stored hash is then compared in constant time as well, so that no
// collation or index quirk can make a near match pass.
func (s *Store) Authenticate(ctx context.Context, plaintext string) (store.Principal, error) {
	refused := func(why string) (store.Principal, error) {
		return store.Principal{}, errcode.New(errcode.Unauthenticated, "API key refused: %s", why)
	}
	if !store.WellFormedKey(plaintext) {
		return refused("not a dim_sk_ key")
	}
	hash := store.HashKey(plaintext)
	var (
		p      store.Principal
		stored string
	)
	err := s.b.QueryRow(ctx, `SELECT k.id, k.user_id, k.prefix, k.created_at, k.revoked_at, k.last_used_at, k.hash,
		u.id, u.name, u.role, u.disabled, u.created_at
		FROM api_keys k JOIN users u ON u.id = k.user_id WHERE k.hash = $1`, hash).Scan(
		&p.Key.ID, &p.Key.UserID, &p.Key.Prefix, timeCol{&p.Key.CreatedAt}, nullTimeCol{&p.Key.RevokedAt},
		nullTimeCol{&p.Key.LastUsedAt}, &stored,
		&p.User.ID, &p.User.Name, (*string)(&p.User.Role), &p.User.Disabled, timeCol{&p.User.CreatedAt})
	switch {
	case notFound(err):
		return refused("unknown key")
	case err != nil:
		return store.Principal{}, dbErr(err, "authenticate")
	case subtle.ConstantTimeCompare([]byte(stored), []byte(hash)) != 1:
		return refused("unknown key")
	case p.Key.RevokedAt != nil:
		return refused("the key is revoked")
	case p.User.Disabled:
		return refused("the user is disabled")
	}
	t := now()
	if p.Key.LastUsedAt == nil || t.Sub(*p.Key.LastUsedAt) >= store.LastUsedGranularity {
		if _, err := s.b.Exec(ctx, "UPDATE api_keys SET last_used_at = $2 WHERE id = $1", p.Key.ID, t); err != nil {
			// The key is valid; failing the request over bookkeeping
			// would turn a busy database into an outage.
			s.logger.Warn("could not record API key use", "key", p.Key.ID, "err", err)
		} else {
			p.Key.LastUsedAt = &t
		}
	}
	return p, nil
}
