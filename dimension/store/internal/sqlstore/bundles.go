package sqlstore

import (
	"cmp"
	"context"
	"encoding/json"
	"regexp"
	"slices"
	"strings"

	"github.com/hyphae-run/hyphae/dimension/store"
	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/registry"
)

const bundleCols = "id, owner, name, tag, image_digest, manifest, size_bytes, created_at, updated_at"

var digestRE = regexp.MustCompile(`^sha256:[0-9a-f]{64}$`)

func scanBundle(r Row) (store.Bundle, error) {
	var (
		b        store.Bundle
		manifest []byte
	)
	if err := r.Scan(&b.ID, &b.Owner, &b.Name, &b.Tag, &b.ImageDigest, &manifest, &b.SizeBytes,
		timeCol{&b.CreatedAt}, timeCol{&b.UpdatedAt}); err != nil {
		return store.Bundle{}, err
	}
	if err := json.Unmarshal(manifest, &b.Manifest); err != nil {
		return store.Bundle{}, errcode.Wrap(errcode.Corrupt, err, "bundle %s has a damaged manifest", b.ID)
	}
	return b, nil
}

// PutBundle implements store.Bundles. Bundle names and tags follow the
// registry's rules, since each bundle is a registry image.
func (s *Store) PutBundle(ctx context.Context, b store.Bundle) (store.Bundle, error) {
	if b.Tag == "" {
		b.Tag = registry.DefaultTag
	}
	if err := registry.ValidateName(b.Name); err != nil {
		return store.Bundle{}, err
	}
	if err := registry.ValidateTag(b.Tag); err != nil {
		return store.Bundle{}, err
	}
	if !digestRE.MatchString(b.ImageDigest) {
		return store.Bundle{}, errcode.New(errcode.InvalidArgument, "bundle image digest %q is not sha256:<64 hex>", b.ImageDigest)
	}
	if b.SizeBytes < 0 {
		return store.Bundle{}, errcode.New(errcode.InvalidArgument, "bundle size %d is negative", b.SizeBytes)
	}
	if err := b.Manifest.Validate(); err != nil {
		return store.Bundle{}, err
	}
	manifest, err := json.Marshal(b.Manifest)
	if err != nil {
		return store.Bundle{}, errcode.Wrap(errcode.InvalidManifest, err, "encode bundle manifest")
	}
	var out store.Bundle
	err = s.tx(ctx, "put bundle "+b.Ref(), func(tx Conn) error {
		if _, err := getUser(ctx, tx, b.Owner); err != nil {
			return err
		}
		t := now()
		var err error
		out, err = scanBundle(tx.QueryRow(ctx, `INSERT INTO bundles (`+bundleCols+`)
			VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)
			ON CONFLICT (owner, name, tag) DO UPDATE SET image_digest = excluded.image_digest,
				manifest = excluded.manifest, size_bytes = excluded.size_bytes, updated_at = excluded.updated_at
			RETURNING `+bundleCols,
			store.NewID(store.BundleIDPrefix), b.Owner, b.Name, b.Tag, b.ImageDigest, string(manifest), b.SizeBytes, t))
		return dbErr(err, "put bundle %s", b.Ref())
	})
	return out, err
}

// getBundle resolves ref among owner's bundles: an id first, then
// "name[:tag]".
func getBundle(ctx context.Context, c Conn, owner, ref string) (store.Bundle, error) {
	b, err := scanBundle(c.QueryRow(ctx, "SELECT "+bundleCols+" FROM bundles WHERE owner = $1 AND id = $2", owner, ref))
	if !notFound(err) {
		return b, dbErr(err, "read bundle %s", ref)
	}
	name, tag, hasTag := strings.Cut(ref, ":")
	if !hasTag {
		tag = registry.DefaultTag
	}
	if registry.ValidateName(name) != nil || registry.ValidateTag(tag) != nil {
		return store.Bundle{}, errcode.New(errcode.InvalidName, "%q is neither a bundle id nor a bundle name[:tag]", ref)
	}
	b, err = scanBundle(c.QueryRow(ctx, "SELECT "+bundleCols+" FROM bundles WHERE owner = $1 AND name = $2 AND tag = $3",
		owner, name, tag))
	if notFound(err) {
		return store.Bundle{}, errcode.New(errcode.NotFound, "no bundle %s:%s", name, tag)
	}
	return b, dbErr(err, "read bundle %s", ref)
}

// GetBundle implements store.Bundles.
func (s *Store) GetBundle(ctx context.Context, owner, ref string) (store.Bundle, error) {
	return getBundle(ctx, s.b, owner, ref)
}

// ListBundles implements store.Bundles.
func (s *Store) ListBundles(ctx context.Context, owner string) ([]store.Bundle, error) {
	rows, err := s.b.Query(ctx, "SELECT "+bundleCols+" FROM bundles WHERE owner = $1", owner)
	bs, err := collect(rows, err, scanBundle)
	// Sorted here rather than by ORDER BY: PostgreSQL would order by the
	// database's collation, SQLite by bytes.
	slices.SortFunc(bs, func(a, b store.Bundle) int {
		return cmp.Or(strings.Compare(a.Name, b.Name), strings.Compare(a.Tag, b.Tag))
	})
	return bs, dbErr(err, "list bundles")
}

// DeleteBundle implements store.Bundles.
func (s *Store) DeleteBundle(ctx context.Context, owner, ref string) (store.Bundle, error) {
	var b store.Bundle
	err := s.tx(ctx, "delete bundle "+ref, func(tx Conn) error {
		var err error
		if b, err = getBundle(ctx, tx, owner, ref); err != nil {
			return err
		}
		_, err = tx.Exec(ctx, "DELETE FROM bundles WHERE id = $1", b.ID)
		return dbErr(err, "delete bundle %s", ref)
	})
	return b, err
}
