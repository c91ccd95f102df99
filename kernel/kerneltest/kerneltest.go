// Package kerneltest finds the guest kernel that real-boot tests use:
// $HYPHAE_TEST_KERNEL, else the one scripts/fetch-kernel.sh cached in
// kernel.DefaultCacheDir. Without one the test is skipped, or failed under
// HYPHAE_E2E=require.
package kerneltest

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/hyphae-run/hyphae/internal/testenv"
	"github.com/hyphae-run/hyphae/kernel"
)

// EnvKernel names the kernel file tests boot.
const EnvKernel = "HYPHAE_TEST_KERNEL"

// Path returns the test kernel's path, after checking it is a kernel.
func Path(t testing.TB) string {
	t.Helper()
	p := os.Getenv(EnvKernel)
	if p == "" {
		p = filepath.Join(kernel.DefaultCacheDir, kernel.CurrentLink)
	}
	if _, err := os.Stat(p); err != nil {
		testenv.Unavailable(t, "no test kernel at "+p+" (run scripts/fetch-kernel.sh or set "+EnvKernel+")")
	}
	if _, err := kernel.Inspect(p); err != nil {
		t.Fatalf("test kernel: %v", err)
	}
	return p
}
