package kernel

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
)

// Defaults of a zero Fetcher.
const (
	DefaultAttempts = 4
	DefaultBackoff  = 500 * time.Millisecond
	// MaxKernelBytes bounds a download: no guest kernel comes near it, and
	// a server streaming without end must not fill the disk.
	MaxKernelBytes = 512 << 20
)

// Fetcher downloads kernels over HTTP(S). The zero value is ready to use.
type Fetcher struct {
	// Client is the HTTP client; nil means http.DefaultClient.
	Client *http.Client
	// Attempts is how many times a transient failure is tried in all.
	Attempts int
	// Backoff is the wait after the first failure; it doubles after each.
	Backoff time.Duration
	// Logger gets retries; nil discards them.
	Logger *slog.Logger
	// StallTimeout abandons (and retries) an attempt that receives nothing
	// for this long, so that a server that stops sending cannot hang a
	// fetch whose context has no deadline; zero means DefaultStallTimeout.
	StallTimeout time.Duration
}

// DefaultStallTimeout is Fetcher.StallTimeout's default.
const DefaultStallTimeout = 30 * time.Second

// errStalled is the cause of an attempt abandoned by the stall watchdog.
var errStalled = errors.New("no data received")

// Fetch downloads url into destDir with a zero Fetcher.
func Fetch(ctx context.Context, url, sha256hex, destDir string) (string, error) {
	return Fetcher{}.Fetch(ctx, url, sha256hex, destDir)
}

// Fetch downloads url into destDir as sha256-<hex>, streaming it to a
// temporary file while hashing. Transient failures (network errors, 5xx and
// 429 answers, a body cut short) are retried with exponential backoff; a
// 4xx answer or a digest other than sha256hex (errcode.ChecksumMismatch) is
// final. Nothing but the finished file is left in destDir. A file already
// present under its digest is not downloaded again.
func (f Fetcher) Fetch(ctx context.Context, url, sha256hex, destDir string) (string, error) {
	want := strings.ToLower(sha256hex)
	if b, err := hex.DecodeString(want); err != nil || len(b) != sha256.Size {
		return "", errcode.New(errcode.InvalidArgument, "--sha256 %q is not 64 hex digits", sha256hex)
	}
	dest := filepath.Join(destDir, ContentName(want))
	if got, err := hashFile(dest); err == nil && got == want {
		return dest, nil
	}
	if err := os.MkdirAll(destDir, 0o755); err != nil {
		return "", errcode.Wrap(errcode.FetchFailed, err, "create %s", destDir)
	}
	log := f.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	attempts := f.Attempts
	if attempts <= 0 {
		attempts = DefaultAttempts
	}
	wait := f.Backoff
	if wait <= 0 {
		wait = DefaultBackoff
	}

	tmp, err := os.CreateTemp(destDir, ".fetch-*")
	if err != nil {
		return "", errcode.Wrap(errcode.FetchFailed, err, "create temporary file in %s", destDir)
	}
	defer func() {
		tmp.Close()
		os.Remove(tmp.Name())
	}()

	var lastErr error
	for attempt := 1; attempt <= attempts; attempt++ {
		if attempt > 1 {
			log.Info("retrying kernel download", "url", url, "attempt", attempt, "after", wait, "err", lastErr)
			select {
			case <-ctx.Done():
				return "", errcode.Wrap(errcode.FetchFailed, ctx.Err(), "download %s (last error: %v)", url, lastErr)
			case <-time.After(wait):
			}
			wait *= 2
		}
		h := sha256.New()
		err := f.download(ctx, url, tmp, h)
		if err == nil {
			got := hex.EncodeToString(h.Sum(nil))
			if got != want {
				return "", errcode.New(errcode.ChecksumMismatch, "%s has sha256 %s, want %s", url, got, want).
					WithHint("check the --sha256 value against the kernel's published checksum")
			}
			if err := tmp.Chmod(0o644); err != nil {
				return "", errcode.Wrap(errcode.FetchFailed, err, "chmod download")
			}
			if err := tmp.Close(); err != nil {
				return "", errcode.Wrap(errcode.FetchFailed, err, "write download")
			}
			if err := os.Rename(tmp.Name(), dest); err != nil {
				return "", errcode.Wrap(errcode.FetchFailed, err, "move download into place")
			}
			return dest, nil
		}
		var perm permanentError
		if errors.As(err, &perm) || ctx.Err() != nil {
			return "", errcode.Wrap(errcode.FetchFailed, err, "download %s", url)
		}
		lastErr = err
	}
	return "", errcode.Wrap(errcode.FetchFailed, lastErr, "download %s failed %d times", url, attempts)
}

// permanentError marks a failure that retrying cannot fix.
type permanentError struct{ error }

// download writes url's body to tmp from its start, hashing it into h.
func (f Fetcher) download(ctx context.Context, url string, tmp *os.File, h hash.Hash) error {
	if _, err := tmp.Seek(0, io.SeekStart); err != nil {
		return permanentError{err}
	}
	if err := tmp.Truncate(0); err != nil {
		return permanentError{err}
	}
	stallAfter := f.StallTimeout
	if stallAfter <= 0 {
		stallAfter = DefaultStallTimeout
	}
	reqCtx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	watchdog := time.AfterFunc(stallAfter, func() { cancel(errStalled) })
	defer watchdog.Stop()
	stalled := func(err error) error {
		if errors.Is(context.Cause(reqCtx), errStalled) && ctx.Err() == nil {
			return fmt.Errorf("%w for %s", errStalled, stallAfter)
		}
		return err
	}
	req, err := http.NewRequestWithContext(reqCtx, http.MethodGet, url, nil)
	if err != nil {
		return permanentError{err}
	}
	client := f.Client
	if client == nil {
		client = http.DefaultClient
	}
	resp, err := client.Do(req)
	if err != nil {
		return stalled(err)
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusOK:
	case resp.StatusCode >= 500 || resp.StatusCode == http.StatusTooManyRequests:
		return fmt.Errorf("server answered %s", resp.Status)
	default:
		return permanentError{fmt.Errorf("server answered %s", resp.Status)}
	}
	if resp.ContentLength > MaxKernelBytes {
		return permanentError{errcode.New(errcode.SizeLimit, "kernel is %d bytes, the limit is %d", resp.ContentLength, MaxKernelBytes)}
	}
	body := &watchedReader{r: resp.Body, onData: func() { watchdog.Reset(stallAfter) }}
	n, err := io.Copy(io.MultiWriter(tmp, h), io.LimitReader(body, MaxKernelBytes+1))
	if err != nil {
		return stalled(err)
	}
	if n > MaxKernelBytes {
		return permanentError{errcode.New(errcode.SizeLimit, "kernel exceeds %d bytes", MaxKernelBytes)}
	}
	// net/http reports a body shorter than Content-Length as
	// io.ErrUnexpectedEOF; this catches a server that sent none.
	if resp.ContentLength >= 0 && n != resp.ContentLength {
		return fmt.Errorf("body cut short: %d of %d bytes", n, resp.ContentLength)
	}
	return nil
}

// watchedReader calls onData whenever a read returns bytes.
type watchedReader struct {
	r      io.Reader
	onData func()
}

func (w *watchedReader) Read(p []byte) (int, error) {
	n, err := w.r.Read(p)
	if n > 0 {
		w.onData()
	}
	return n, err
}

// ContentName is the file name of a kernel stored under its digest.
func ContentName(sha256hex string) string { return "sha256-" + sha256hex }

// Store copies the kernel at src into dir as sha256-<hex>, refusing
// anything Inspect refuses, and returns the stored path and its Info. The
// copy is made under a temporary name and renamed, so dir never holds a
// partial kernel; storing the same kernel twice is a no-op.
func Store(src, dir string) (string, Info, error) {
	if _, err := Inspect(src); err != nil {
		return "", Info{}, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", Info{}, errcode.Wrap(errcode.RegistryError, err, "create %s", dir)
	}
	in, err := os.Open(src)
	if err != nil {
		return "", Info{}, errcode.Wrap(errcode.KernelNotFound, err, "open %s", src)
	}
	defer in.Close()
	tmp, err := os.CreateTemp(dir, ".store-*")
	if err != nil {
		return "", Info{}, errcode.Wrap(errcode.RegistryError, err, "create temporary file in %s", dir)
	}
	defer func() {
		tmp.Close()
		os.Remove(tmp.Name())
	}()
	if _, err := io.Copy(tmp, in); err != nil {
		return "", Info{}, errcode.Wrap(errcode.RegistryError, err, "copy %s", src)
	}
	if err := tmp.Chmod(0o644); err != nil {
		return "", Info{}, errcode.Wrap(errcode.RegistryError, err, "chmod copy")
	}
	if err := tmp.Close(); err != nil {
		return "", Info{}, errcode.Wrap(errcode.RegistryError, err, "write copy")
	}
	// The stored bytes are what get inspected and named, even if src
	// changed while it was copied.
	info, err := Inspect(tmp.Name())
	if err != nil {
		return "", Info{}, err
	}
	dest := filepath.Join(dir, ContentName(info.SHA256))
	if err := os.Rename(tmp.Name(), dest); err != nil {
		return "", Info{}, errcode.Wrap(errcode.RegistryError, err, "move kernel into place")
	}
	return dest, info, nil
}

func hashFile(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
