// Package testenv holds capability checks for tests. A check that fails
// skips the test with its reason, except when HYPHAE_E2E=require (set by
// CI), where a missing prerequisite fails the test instead: in CI a skip
// would hide a broken install step.
package testenv

import (
	"crypto/sha256"
	"encoding/hex"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// Required reports whether missing prerequisites must fail tests.
func Required() bool { return os.Getenv("HYPHAE_E2E") == "require" }

// Unavailable skips or, under HYPHAE_E2E=require, fails t with reason.
func Unavailable(t testing.TB, reason string) {
	t.Helper()
	if Required() {
		t.Fatalf("prerequisite missing (HYPHAE_E2E=require): %s", reason)
	}
	t.Skipf("skipped: %s (set HYPHAE_E2E=require to make this a failure)", reason)
}

// RequiresRoot needs uid 0.
func RequiresRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Unavailable(t, "needs root")
	}
}

// RequiresTool needs program on PATH and returns its path.
func RequiresTool(t testing.TB, program string) string {
	t.Helper()
	p, err := exec.LookPath(program)
	if err != nil {
		Unavailable(t, program+" not found on PATH")
	}
	return p
}

// Optional is for prerequisites that CI cannot provide on these machines
// (a real Firecracker with working KVM): it always skips, whatever
// HYPHAE_E2E says.
func Optional(t testing.TB, reason string) {
	t.Helper()
	t.Skipf("skipped: %s", reason)
}

// GuestBinaries builds the named commands under cmd/ with CGO_ENABLED=0
// into a fresh directory, points HYPHAE_LIBEXEC at it for the rest of the
// test, and returns the directory.
func GuestBinaries(t testing.TB, names ...string) string {
	t.Helper()
	root := ModuleRoot(t)
	dir := t.TempDir()
	for _, n := range names {
		cmd := exec.Command("go", "build", "-trimpath", "-o", filepath.Join(dir, n), "./cmd/"+n)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("building %s: %v\n%s", n, err, out)
		}
	}
	t.Setenv("HYPHAE_LIBEXEC", dir)
	return dir
}

// ModuleRoot returns the directory holding go.mod.
func ModuleRoot(t testing.TB) string {
	t.Helper()
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatalf("go env GOMOD: %v", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		t.Fatal("not inside the hyphae module")
	}
	return filepath.Dir(mod)
}

// FileSHA256 returns the hex SHA-256 of the file at path.
func FileSHA256(t testing.TB, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}
