// Package kerneltest finds the guest kernels that real-boot tests use:
// Debian's cloud kernel ($HYPHAE_TEST_KERNEL, else the one
// scripts/fetch-kernel.sh cached in kernel.DefaultCacheDir) and a
// Firecracker-style one ($HYPHAE_TEST_FC_KERNEL, else the one
// scripts/build-fc-kernel.sh cached there). Without one the test is
// skipped, or failed under HYPHAE_E2E=require.
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

// EnvFirecrackerKernel names the Firecracker-style kernel (an ELF vmlinux
// built from Firecracker's CI guest config: virtio-mmio devices built in,
// no NVMe, one UART) that tests boot under QEMU.
const EnvFirecrackerKernel = "HYPHAE_TEST_FC_KERNEL"

// FirecrackerLink is the name scripts/build-fc-kernel.sh gives the newest
// such kernel in kernel.DefaultCacheDir.
const FirecrackerLink = "vmlinux-fc"

// FirecrackerPath returns the Firecracker-style test kernel's path:
// $HYPHAE_TEST_FC_KERNEL, else the one scripts/build-fc-kernel.sh cached.
func FirecrackerPath(t testing.TB) string {
	t.Helper()
	p := os.Getenv(EnvFirecrackerKernel)
	if p == "" {
		p = filepath.Join(kernel.DefaultCacheDir, FirecrackerLink)
	}
	if _, err := os.Stat(p); err != nil {
		testenv.Unavailable(t, "no Firecracker-style test kernel at "+p+" (run scripts/build-fc-kernel.sh or set "+EnvFirecrackerKernel+")")
	}
	if _, err := kernel.Inspect(p); err != nil {
		t.Fatalf("Firecracker-style test kernel: %v", err)
	}
	return p
}
