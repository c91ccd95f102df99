package registry

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
)

// Kernel formats.
const (
	KernelELF     = "elf"
	KernelBzImage = "bzimage"
)

// Kernel is a registered guest kernel.
type Kernel struct {
	Name   string `json:"name"`
	Path   string `json:"path"`
	SHA256 string `json:"sha256"`
	// Format is KernelELF or KernelBzImage; empty when the file has not
	// been validated (a kernel recovered after corruption).
	Format    string    `json:"format"`
	Arch      string    `json:"arch"`
	SizeBytes int64     `json:"size_bytes"`
	VMMs      []string  `json:"vmms"`
	CreatedAt time.Time `json:"created_at"`
}

var kernelNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$`)

// ValidateKernelName checks a kernel name: letters, digits, '.', '_', '+'
// and '-', starting with a letter or digit, at most 128 characters.
func ValidateKernelName(name string) error {
	if !kernelNameRE.MatchString(name) {
		return errcode.New(errcode.InvalidName, "invalid kernel name %q", name).
			WithHint("use letters, digits, '.', '_', '+' and '-', starting with a letter or digit")
	}
	return nil
}

// PutKernel registers k, replacing a kernel of the same name.
func (r *Registry) PutKernel(ctx context.Context, k Kernel) error {
	if err := ValidateKernelName(k.Name); err != nil {
		return err
	}
	if k.Path == "" || !filepath.IsAbs(k.Path) {
		return errcode.New(errcode.InvalidArgument, "kernel %s needs an absolute path, got %q", k.Name, k.Path)
	}
	if k.CreatedAt.IsZero() {
		k.CreatedAt = time.Now()
	}
	vmms, err := json.Marshal(nonNil(k.VMMs))
	if err != nil {
		return errcode.Wrap(errcode.InvalidArgument, err, "encode VMM list")
	}
	return r.writeTx(ctx, func(tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, `INSERT INTO kernels (name, path, sha256, format, arch, size_bytes, vmms, created_at)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?)
			ON CONFLICT (name) DO UPDATE SET path = excluded.path, sha256 = excluded.sha256, format = excluded.format,
				arch = excluded.arch, size_bytes = excluded.size_bytes, vmms = excluded.vmms, created_at = excluded.created_at`,
			k.Name, filepath.Clean(k.Path), k.SHA256, k.Format, k.Arch, k.SizeBytes, string(vmms), formatTime(k.CreatedAt))
		return dbErr(err, "register kernel %s", k.Name)
	})
}

// LookupKernel returns the kernel of that name (E501 when there is none).
func (r *Registry) LookupKernel(ctx context.Context, name string) (Kernel, error) {
	ks, err := r.queryKernels(ctx, r.db, `WHERE name = ?`, name)
	if err != nil {
		return Kernel{}, err
	}
	if len(ks) == 0 {
		return Kernel{}, errcode.New(errcode.NotFound, "no kernel named %q", name).
			WithHint("`hyphae kernel list` shows the registered kernels")
	}
	return ks[0], nil
}

// ListKernels returns every kernel by name.
func (r *Registry) ListKernels(ctx context.Context) ([]Kernel, error) {
	return r.queryKernels(ctx, r.db, "")
}

// RemoveKernel unregisters a kernel and removes its file when the file lies
// in KernelsDir (a kernel registered in place elsewhere keeps its file).
func (r *Registry) RemoveKernel(ctx context.Context, name string) error {
	return r.writeTx(ctx, func(tx *sql.Tx) error {
		ks, err := r.queryKernels(ctx, tx, `WHERE name = ?`, name)
		if err != nil {
			return err
		}
		if len(ks) == 0 {
			return errcode.New(errcode.NotFound, "no kernel named %q", name)
		}
		if _, err := tx.ExecContext(ctx, `DELETE FROM kernels WHERE name = ?`, name); err != nil {
			return dbErr(err, "remove kernel %s", name)
		}
		p := ks[0].Path
		if filepath.Dir(p) != r.KernelsDir() {
			return nil
		}
		var others int
		if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM kernels WHERE path = ?`, p).Scan(&others); err != nil {
			return dbErr(err, "check kernel file %s", p)
		}
		if others == 0 {
			if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
				return errcode.Wrap(errcode.RegistryError, err, "remove kernel file %s", p)
			}
		}
		return nil
	})
}

func (r *Registry) queryKernels(ctx context.Context, q querier, where string, args ...any) ([]Kernel, error) {
	rows, err := q.QueryContext(ctx, `SELECT name, path, sha256, format, arch, size_bytes, vmms, created_at
		FROM kernels `+where+` ORDER BY name`, args...)
	if err != nil {
		return nil, dbErr(err, "query kernels")
	}
	defer rows.Close()
	var out []Kernel
	for rows.Next() {
		var (
			k       Kernel
			vmms    string
			created string
		)
		if err := rows.Scan(&k.Name, &k.Path, &k.SHA256, &k.Format, &k.Arch, &k.SizeBytes, &vmms, &created); err != nil {
			return nil, dbErr(err, "read kernel row")
		}
		if err := json.Unmarshal([]byte(vmms), &k.VMMs); err != nil {
			return nil, errcode.Wrap(errcode.Corrupt, err, "VMM list of kernel %s", k.Name)
		}
		k.VMMs = nonNil(k.VMMs)
		if k.CreatedAt, err = parseTime(created); err != nil {
			return nil, err
		}
		out = append(out, k)
	}
	if err := rows.Err(); err != nil {
		return nil, dbErr(err, "query kernels")
	}
	return out, nil
}
