package runner

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/hyphae-run/hyphae/image"
	"github.com/hyphae-run/hyphae/internal/testenv"
	"github.com/hyphae-run/hyphae/registry"
)

// images are real registry images built --with-agent for the mock and VM
// tests: examples/echo-go and testdata/sleeper.
type images struct {
	echo, sleeper string
	libexec       string
}

func buildImages(t *testing.T) images {
	t.Helper()
	testenv.RequiresTool(t, "debugfs")
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		if _, err := os.Stat("/usr/sbin/mkfs.ext4"); err != nil {
			testenv.Unavailable(t, "mkfs.ext4 not installed")
		}
	}
	libexec := testenv.GuestBinaries(t, "hyphae-init", "dimension-agent")
	root := testenv.ModuleRoot(t)
	bins := t.TempDir()
	goBuild := func(name, dir, pkg string) string {
		out := filepath.Join(bins, name)
		cmd := exec.Command("go", "build", "-trimpath", "-o", out, pkg)
		cmd.Dir = dir
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("building %s: %v\n%s", name, err, b)
		}
		return out
	}
	echoBin := goBuild("echo-go", filepath.Join(root, "examples", "echo-go"), ".")
	sleepBin := goBuild("sleeper", root, "./dimension/runner/testdata/sleeper")

	reg, err := registry.Open(t.Context(), t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	b := &image.Builder{Store: reg}
	build := func(bin, name string) string {
		res, err := b.Build(t.Context(), image.BuildOptions{Binary: bin, Name: name, WithAgent: true})
		if err != nil {
			t.Fatalf("building image %s: %v", name, err)
		}
		return res.Path
	}
	return images{echo: build(echoBin, "echo-go"), sleeper: build(sleepBin, "sleeper"), libexec: libexec}
}
