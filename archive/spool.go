package archive

import (
	"context"
	"io"
	"os"

	"github.com/hyphae-run/hyphae/errcode"
)

// Spool copies r (for example stdin, for `hyphae import -`) to a new temp
// file in dir, streaming, and returns its path; the caller removes it. More
// than maxSize bytes (zero → DefaultMaxTotalSize) is refused with
// errcode.SizeLimit and leaves no file behind. ctx is checked between reads.
func Spool(ctx context.Context, r io.Reader, dir string, maxSize int64) (string, error) {
	if maxSize <= 0 {
		maxSize = DefaultMaxTotalSize
	}
	f, err := os.CreateTemp(dir, "hyphae-spool-*.tar")
	if err != nil {
		return "", errcode.Wrap(errcode.StagingFailed, err, "cannot create spool file")
	}
	n, err := io.Copy(f, &ctxReader{ctx: ctx, r: io.LimitReader(r, maxSize+1)})
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	switch {
	case err != nil:
		err = errcode.Wrap(errcode.StagingFailed, err, "spooling the archive")
	case n > maxSize:
		err = errcode.New(errcode.SizeLimit, "archive is larger than %d bytes", maxSize)
	}
	if err != nil {
		os.Remove(f.Name())
		return "", err
	}
	return f.Name(), nil
}

// ctxReader fails reads once ctx is done.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c *ctxReader) Read(b []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(b)
}
