package firecracker

import (
	"context"
	"path/filepath"
)

// RequestShutdown sends Ctrl+Alt+Del through the API socket of the
// Firecracker VM whose runtime directory is dir, as Stop does. It is for a
// hyphae process that did not start the VM (hyphae stop of a detached VM):
// that process finds the VMM again with vmmproc.Attach and passes
// RequestShutdown as the graceful step of vmmproc.Process.Stop.
func RequestShutdown(ctx context.Context, dir string) error {
	c := NewClient(filepath.Join(dir, apiSocketName), 0)
	defer c.Close()
	return c.SendCtrlAltDel(ctx)
}
