package registry

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
)

// imageFileRE matches the name ImagePath gives an image file.
var imageFileRE = regexp.MustCompile(`^sha256-([0-9a-f]{64})\.ext4$`)

// GC removes the files under images/ and kernels/ that no row points to,
// and temp files (TempPrefix) older than TempMaxAge, returning the paths it
// removed. It holds the write lock while it works, so a PutImage moving a
// finished file into place is never half-seen.
func (r *Registry) GC(ctx context.Context) ([]string, error) {
	var removed []string
	err := r.writeTx(ctx, func(tx *sql.Tx) error {
		removed = removed[:0]
		keep, err := referencedPaths(ctx, r, tx)
		if err != nil {
			return err
		}
		for _, dir := range []string{r.ImagesDir(), r.KernelsDir()} {
			entries, err := os.ReadDir(dir)
			if err != nil {
				return errcode.Wrap(errcode.RegistryError, err, "read %s", dir)
			}
			for _, e := range entries {
				p := filepath.Join(dir, e.Name())
				if keep[p] || e.IsDir() {
					continue
				}
				if strings.HasPrefix(e.Name(), TempPrefix) {
					info, err := e.Info()
					if err != nil || time.Since(info.ModTime()) < TempMaxAge {
						continue
					}
				}
				if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
					return errcode.Wrap(errcode.RegistryError, err, "remove %s", p)
				}
				removed = append(removed, p)
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	r.logger.Info("registry garbage collected", "removed", len(removed))
	return removed, nil
}

// referencedPaths returns the file paths rows point to.
func referencedPaths(ctx context.Context, r *Registry, q querier) (map[string]bool, error) {
	keep := map[string]bool{}
	rows, err := q.QueryContext(ctx, `SELECT digest FROM images UNION ALL SELECT path FROM kernels`)
	if err != nil {
		return nil, dbErr(err, "list referenced files")
	}
	defer rows.Close()
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			return nil, dbErr(err, "list referenced files")
		}
		if strings.HasPrefix(s, "sha256:") {
			s = r.ImagePath(s)
		}
		keep[filepath.Clean(s)] = true
	}
	if err := rows.Err(); err != nil {
		return nil, dbErr(err, "list referenced files")
	}
	return keep, nil
}

// reregister registers the image and kernel files found on disk, for a
// database rebuilt after corruption. Image files become untagged digests
// (source "recovered"); kernel files become kernels named after the file,
// with format and arch left empty until the kernel code validates them
// again. Temp files are left for GC.
func (r *Registry) reregister(ctx context.Context) (images, kernels int, err error) {
	entries, err := os.ReadDir(r.ImagesDir())
	if err != nil {
		return 0, 0, errcode.Wrap(errcode.RegistryError, err, "read %s", r.ImagesDir())
	}
	for _, e := range entries {
		m := imageFileRE.FindStringSubmatch(e.Name())
		if m == nil || !e.Type().IsRegular() {
			continue
		}
		info, err := e.Info()
		if err != nil {
			continue
		}
		img := Image{Digest: "sha256:" + m[1], SizeBytes: info.Size(), Source: "recovered", CreatedAt: info.ModTime()}
		if err := r.PutImage(ctx, img); err != nil {
			return images, kernels, err
		}
		images++
	}
	entries, err = os.ReadDir(r.KernelsDir())
	if err != nil {
		return images, 0, errcode.Wrap(errcode.RegistryError, err, "read %s", r.KernelsDir())
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), TempPrefix) || !e.Type().IsRegular() {
			continue
		}
		p := filepath.Join(r.KernelsDir(), e.Name())
		sum, size, err := hashFile(p)
		if err != nil {
			return images, kernels, err
		}
		info, err := e.Info()
		if err != nil {
			continue
		}
		if err := r.PutKernel(ctx, Kernel{Name: e.Name(), Path: p, SHA256: sum, SizeBytes: size, CreatedAt: info.ModTime()}); err != nil {
			return images, kernels, err
		}
		kernels++
	}
	return images, kernels, nil
}

// hashFile returns the hex SHA-256 and size of a file.
func hashFile(path string) (string, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", 0, errcode.Wrap(errcode.RegistryError, err, "open %s", path)
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return "", 0, errcode.Wrap(errcode.RegistryError, err, "read %s", path)
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}
