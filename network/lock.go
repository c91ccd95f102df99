package network

import (
	"context"
	"errors"
	"os"
	"syscall"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
)

// lockPoll is how often a blocked lock attempt retries; flock(2) itself
// cannot be cancelled, so waiting polls LOCK_NB until the context ends.
const lockPoll = 2 * time.Millisecond

// flockFile opens path and takes an exclusive flock(2) on it, waiting until
// ctx ends. Closing the returned file releases the lock. flock locks belong
// to the open file, so two opens conflict even within one process.
func flockFile(ctx context.Context, path string, flag int, code errcode.Code) (*os.File, error) {
	f, err := os.OpenFile(path, flag, 0o600)
	if err != nil {
		return nil, errcode.Wrap(code, err, "opening lock %s", path)
	}
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return f, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
			f.Close()
			return nil, errcode.Wrap(code, err, "locking %s", path)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, errcode.Wrap(errcode.Timeout, ctx.Err(), "waiting for lock %s", path)
		case <-time.After(lockPoll):
		}
	}
}
