package qemu

import (
	"context"
	"path/filepath"
)

// RequestShutdown asks the guest of the QEMU VM whose runtime directory is
// dir to shut down, with the same Ctrl-Alt-Del through QMP that Stop sends.
// It is for a hyphae process that did not start the VM (hyphae stop of a
// detached VM): that process finds the VMM again with vmmproc.Attach and
// passes RequestShutdown as the graceful step of vmmproc.Process.Stop.
func RequestShutdown(ctx context.Context, dir string) error {
	return qmpExecute(ctx, filepath.Join(dir, QMPSocket), "send-key", ctrlAltDel())
}
