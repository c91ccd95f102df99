package registry

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
)

// Image is one registered image as seen through one tag. An untagged image
// (for instance one recovered after corruption) has empty Name and Tag.
type Image struct {
	Digest     string    `json:"digest"`
	Name       string    `json:"name"`
	Tag        string    `json:"tag"`
	Owner      string    `json:"owner,omitempty"`
	SizeBytes  int64     `json:"size_bytes"`
	Source     string    `json:"source"`
	Entrypoint []string  `json:"entrypoint"`
	VCPUs      int       `json:"vcpus"`
	MemoryMiB  int       `json:"memory_mib"`
	CreatedAt  time.Time `json:"created_at"`
	// Path is where the image file lives. When passed to PutImage it may
	// instead name a finished temp file in ImagesDir, which PutImage moves
	// into place.
	Path string `json:"path"`
}

// Ref returns "name:tag", or the digest for an untagged image.
func (i Image) Ref() string {
	if i.Name == "" {
		return i.Digest
	}
	return i.Name + ":" + i.Tag
}

// PutImage registers img in one transaction: it inserts the digest's row
// when it is new and, when img.Name is set, points (owner, name, tag) at it
// (Tag defaults to latest). The tag moves only here, so it never names a
// digest whose build failed.
//
// The image file must exist when PutImage commits. If img.Path names a
// different file (a temp file in ImagesDir, named with TempPrefix), it is
// renamed to ImagePath(digest) inside the transaction, so GC, which runs
// under the same write lock, never sees the file unregistered; if the
// digest's file is already there the temp file is removed instead.
func (r *Registry) PutImage(ctx context.Context, img Image) error {
	if err := ValidateDigest(img.Digest); err != nil {
		return err
	}
	if img.Name != "" {
		if img.Tag == "" {
			img.Tag = DefaultTag
		}
		if err := ValidateName(img.Name); err != nil {
			return err
		}
		if err := ValidateTag(img.Tag); err != nil {
			return err
		}
	}
	if img.SizeBytes < 0 || img.VCPUs < 0 || img.MemoryMiB < 0 {
		return errcode.New(errcode.InvalidArgument, "image %s has a negative size, vcpus or memory", img.Digest)
	}
	if img.CreatedAt.IsZero() {
		img.CreatedAt = time.Now()
	}
	ep, err := json.Marshal(nonNil(img.Entrypoint))
	if err != nil {
		return errcode.Wrap(errcode.InvalidArgument, err, "encode entrypoint")
	}
	final := r.ImagePath(img.Digest)
	var moved bool
	err = r.writeTx(ctx, func(tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, `INSERT INTO images (digest, size_bytes, source, entrypoint, vcpus, memory_mib, created_at)
			VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (digest) DO NOTHING`,
			img.Digest, img.SizeBytes, img.Source, string(ep), img.VCPUs, img.MemoryMiB, formatTime(img.CreatedAt)); err != nil {
			return dbErr(err, "insert image %s", img.Digest)
		}
		if img.Name != "" {
			if _, err := tx.ExecContext(ctx, `DELETE FROM tags WHERE coalesce(owner, '') = ? AND name = ? AND tag = ?`,
				img.Owner, img.Name, img.Tag); err != nil {
				return dbErr(err, "move tag %s:%s", img.Name, img.Tag)
			}
			if _, err := tx.ExecContext(ctx, `INSERT INTO tags (owner, name, tag, digest, updated_at) VALUES (?, ?, ?, ?, ?)`,
				nullString(img.Owner), img.Name, img.Tag, img.Digest, formatTime(time.Now())); err != nil {
				return dbErr(err, "tag %s:%s", img.Name, img.Tag)
			}
		}
		// The file moves last, so that only the commit can fail after it.
		moved, err = placeFile(img.Path, final)
		return err
	})
	if err != nil && moved {
		// Give the caller its temp file back to clean up: a failed
		// PutImage leaves nothing registered and nothing new in images/.
		_ = os.Rename(final, img.Path)
	}
	return err
}

// placeFile makes sure the image file is at final, moving it from src when
// src is another file; moved reports whether it did.
func placeFile(src, final string) (moved bool, err error) {
	if src != "" && filepath.Clean(src) != final {
		if _, err := os.Stat(final); err == nil {
			// Same digest, same content: keep the registered file.
			if err := os.Remove(src); err != nil && !errors.Is(err, os.ErrNotExist) {
				return false, errcode.Wrap(errcode.RegistryError, err, "remove duplicate image file %s", src)
			}
			return false, nil
		}
		if err := os.Rename(src, final); err != nil {
			return false, wrapHint(errcode.RegistryError, err, "create image files inside the registry's images directory so they can be renamed",
				"move image file %s into place", src)
		}
		return true, nil
	}
	st, err := os.Stat(final)
	if err != nil {
		return false, errcode.Wrap(errcode.NotFound, err, "image file %s is missing", final)
	}
	if !st.Mode().IsRegular() {
		return false, errcode.New(errcode.Corrupt, "image file %s is not a regular file", final)
	}
	return false, nil
}

// ImageByDigest returns the digest's image with its first tag (or untagged).
func (r *Registry) ImageByDigest(ctx context.Context, digest string) (Image, error) {
	return r.imageByDigest(ctx, r.db, digest)
}

func (r *Registry) imageByDigest(ctx context.Context, q querier, digest string) (Image, error) {
	if err := ValidateDigest(digest); err != nil {
		return Image{}, err
	}
	imgs, err := r.queryImages(ctx, q, `WHERE i.digest = ?`, digest)
	if err != nil {
		return Image{}, err
	}
	if len(imgs) == 0 {
		return Image{}, errcode.New(errcode.NotFound, "no image with digest %s", digest)
	}
	return imgs[0], nil
}

// LookupImage resolves a reference (see ParseRef) in the owner-less
// namespace the CLI uses. A tag wins over a digest prefix of the same
// spelling; an ambiguous prefix is an error.
func (r *Registry) LookupImage(ctx context.Context, ref string) (Image, error) {
	img, _, err := r.resolve(ctx, r.db, ref)
	return img, err
}

// resolve is LookupImage that also reports whether ref named a tag (as
// opposed to a digest or digest prefix).
func (r *Registry) resolve(ctx context.Context, q querier, ref string) (img Image, byTag bool, err error) {
	p, err := ParseRef(ref)
	if err != nil {
		return Image{}, false, err
	}
	if p.Digest != "" {
		img, err := r.imageByDigest(ctx, q, p.Digest)
		return img, false, err
	}
	imgs, err := r.queryImages(ctx, q, `WHERE t.owner IS NULL AND t.name = ? AND t.tag = ?`, p.Name, p.Tag)
	if err != nil {
		return Image{}, false, err
	}
	if len(imgs) == 1 {
		return imgs[0], true, nil
	}
	if p.HexPrefix != "" {
		digest, err := digestByPrefix(ctx, q, p.HexPrefix)
		if err != nil {
			return Image{}, false, err
		}
		if digest != "" {
			img, err := r.imageByDigest(ctx, q, digest)
			return img, false, err
		}
	}
	return Image{}, false, errcode.New(errcode.NotFound, "no image %s", p).
		WithHint("`hyphae list images` shows what is registered")
}

// digestByPrefix returns the one digest starting with sha256:<prefix>, ""
// when there is none, and an error when there are several.
func digestByPrefix(ctx context.Context, q querier, prefix string) (string, error) {
	// prefix is validated hex, so it holds no LIKE wildcards.
	rows, err := q.QueryContext(ctx, `SELECT digest FROM images WHERE digest LIKE ? LIMIT 2`, "sha256:"+prefix+"%")
	if err != nil {
		return "", dbErr(err, "look up digest prefix %s", prefix)
	}
	defer rows.Close()
	var found []string
	for rows.Next() {
		var d string
		if err := rows.Scan(&d); err != nil {
			return "", dbErr(err, "look up digest prefix %s", prefix)
		}
		found = append(found, d)
	}
	if err := rows.Err(); err != nil {
		return "", dbErr(err, "look up digest prefix %s", prefix)
	}
	switch len(found) {
	case 0:
		return "", nil
	case 1:
		return found[0], nil
	default:
		return "", errcode.New(errcode.InvalidArgument, "digest prefix %s is ambiguous", prefix).
			WithHint("give more hex digits, or the full sha256:… digest")
	}
}

// ListImages returns one entry per tag plus one per untagged digest,
// ordered by name, tag and digest.
func (r *Registry) ListImages(ctx context.Context) ([]Image, error) {
	return r.queryImages(ctx, r.db, "")
}

// queryImages selects images joined with their tags; where filters it.
func (r *Registry) queryImages(ctx context.Context, db querier, where string, args ...any) ([]Image, error) {
	query := `SELECT i.digest, coalesce(t.name, ''), coalesce(t.tag, ''), coalesce(t.owner, ''),
			i.size_bytes, i.source, i.entrypoint, i.vcpus, i.memory_mib, i.created_at
		FROM images i LEFT JOIN tags t ON t.digest = i.digest ` + where + `
		ORDER BY t.name IS NULL, t.name, t.tag, coalesce(t.owner, ''), i.digest`
	rows, err := db.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, dbErr(err, "query images")
	}
	defer rows.Close()
	var out []Image
	for rows.Next() {
		var (
			img     Image
			ep      string
			created string
		)
		if err := rows.Scan(&img.Digest, &img.Name, &img.Tag, &img.Owner, &img.SizeBytes, &img.Source,
			&ep, &img.VCPUs, &img.MemoryMiB, &created); err != nil {
			return nil, dbErr(err, "read image row")
		}
		if err := json.Unmarshal([]byte(ep), &img.Entrypoint); err != nil {
			return nil, errcode.Wrap(errcode.Corrupt, err, "entrypoint of image %s", img.Digest)
		}
		img.Entrypoint = nonNil(img.Entrypoint)
		if img.CreatedAt, err = parseTime(created); err != nil {
			return nil, err
		}
		img.Path = r.ImagePath(img.Digest)
		out = append(out, img)
	}
	if err := rows.Err(); err != nil {
		return nil, dbErr(err, "query images")
	}
	return out, nil
}

// RemoveImage removes a reference. For "name[:tag]" it removes that tag;
// for a digest (or digest prefix) it removes every tag of that digest. The
// digest's row and its file go once no tag points at it. It is refused
// with E502 while a created or running VM uses the digest.
func (r *Registry) RemoveImage(ctx context.Context, ref string) error {
	var (
		img      Image
		fileGone bool
	)
	err := r.writeTx(ctx, func(tx *sql.Tx) error {
		// Resolved under the write lock, so the tag cannot move between
		// the lookup and the delete.
		var byTag bool
		var err error
		if img, byTag, err = r.resolve(ctx, tx, ref); err != nil {
			return err
		}
		var active []string
		rows, err := tx.QueryContext(ctx, `SELECT id FROM vms WHERE image_digest = ? AND state IN (?, ?) ORDER BY id`,
			img.Digest, VMCreated, VMRunning)
		if err != nil {
			return dbErr(err, "look up VMs of %s", img.Digest)
		}
		for rows.Next() {
			var id string
			if err := rows.Scan(&id); err != nil {
				rows.Close()
				return dbErr(err, "look up VMs of %s", img.Digest)
			}
			active = append(active, id)
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return dbErr(err, "look up VMs of %s", img.Digest)
		}
		if len(active) > 0 {
			return errcode.New(errcode.InUse, "image %s is in use by VM %s", ref, strings.Join(active, ", ")).
				WithHint("stop the VM first (`hyphae stop <vm-id>`)")
		}
		if byTag {
			_, err = tx.ExecContext(ctx, `DELETE FROM tags WHERE owner IS NULL AND name = ? AND tag = ? AND digest = ?`, img.Name, img.Tag, img.Digest)
		} else {
			_, err = tx.ExecContext(ctx, `DELETE FROM tags WHERE digest = ?`, img.Digest)
		}
		if err != nil {
			return dbErr(err, "remove tag %s", ref)
		}
		res, err := tx.ExecContext(ctx, `DELETE FROM images WHERE digest = ? AND NOT EXISTS (SELECT 1 FROM tags WHERE digest = ?)`, img.Digest, img.Digest)
		if err != nil {
			return dbErr(err, "remove image %s", img.Digest)
		}
		n, _ := res.RowsAffected()
		fileGone = n == 1
		if fileGone {
			// Inside the transaction: a concurrent PutImage of the same
			// digest waits for our commit and then finds the file gone
			// and its temp file to move in, instead of racing us.
			if err := os.Remove(img.Path); err != nil && !errors.Is(err, os.ErrNotExist) {
				return errcode.Wrap(errcode.RegistryError, err, "remove image file %s", img.Path)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	r.logger.Info("image removed", "ref", ref, "digest", img.Digest, "file_removed", fileGone)
	return nil
}

// querier is what *sql.DB and *sql.Tx share for reads.
type querier interface {
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

func nullString(s string) sql.NullString {
	return sql.NullString{String: s, Valid: s != ""}
}
