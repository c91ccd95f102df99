package kernel_test

import (
	"bytes"
	"compress/gzip"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/kernel"
	"github.com/hyphae-run/hyphae/kernel/kerneltest"
)

const sampleConfig = `#
# Automatically generated file; DO NOT EDIT.
#
CONFIG_VIRTIO_BLK=y
CONFIG_VIRTIO_CONSOLE=m
# CONFIG_BLK_DEV_NVME is not set
CONFIG_SERIAL_8250_RUNTIME_UARTS=1
CONFIG_LOCALVERSION="-hyphae"

`

func TestParseConfig(t *testing.T) {
	c, err := kernel.ParseConfig(strings.NewReader(sampleConfig))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		sym, value string
		builtin    bool
	}{
		{"VIRTIO_BLK", "y", true},
		{"VIRTIO_CONSOLE", "m", false},
		{"BLK_DEV_NVME", "", false},
		{"SERIAL_8250_RUNTIME_UARTS", "1", false},
		{"LOCALVERSION", `"-hyphae"`, false},
	} {
		if got := c[tc.sym]; got != tc.value {
			t.Errorf("%s = %q, want %q", tc.sym, got, tc.value)
		}
		if got := c.Builtin(tc.sym); got != tc.builtin {
			t.Errorf("Builtin(%s) = %v", tc.sym, got)
		}
	}
	for _, bad := range []string{"VIRTIO_BLK=y\n", "CONFIG_=y\n", "CONFIG_X\n", "hello\n"} {
		if _, err := kernel.ParseConfig(strings.NewReader(bad)); !errcode.HasCode(err, errcode.InvalidKernel) {
			t.Errorf("ParseConfig(%q) = %v, want InvalidKernel", bad, err)
		}
	}
	// Over the bound (a gzip bomb in an image, say) is refused, not cut.
	huge := strings.Repeat("CONFIG_PADDING_SYMBOL_NAME=y\n", (4<<20)/28+1)
	if _, err := kernel.ParseConfig(strings.NewReader(huge)); !errcode.HasCode(err, errcode.SizeLimit) {
		t.Errorf("ParseConfig of %d bytes = %v, want SizeLimit", len(huge), err)
	}
}

// fakeImage is what an IKCONFIG kernel looks like to EmbeddedConfig:
// bytes, the marker, the gzip'd config, the end marker, more bytes. pad
// places the marker across a 1 MiB read boundary.
func fakeImage(t testing.TB, config string, pad int) []byte {
	t.Helper()
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	if _, err := io.WriteString(zw, config); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	b.Write(bytes.Repeat([]byte{0x90}, pad))
	// The marker's text without gzip after it (as in the kernel's own
	// code that refers to it) must be passed over.
	b.WriteString("IKCFG_ST but not the block")
	b.WriteString("IKCFG_ST")
	b.Write(gz.Bytes())
	b.WriteString("IKCFG_ED")
	b.Write(bytes.Repeat([]byte{0xcc}, 4096))
	return b.Bytes()
}

func TestEmbeddedConfig(t *testing.T) {
	for _, pad := range []int{0, 100, 1<<20 - 30, 1<<20 - 4, 3 << 20} {
		c, ok, err := kernel.EmbeddedConfig(bytes.NewReader(fakeImage(t, sampleConfig, pad)))
		if err != nil || !ok {
			t.Fatalf("pad %d: ok=%v err=%v", pad, ok, err)
		}
		if !c.Builtin("VIRTIO_BLK") || c["VIRTIO_CONSOLE"] != "m" {
			t.Errorf("pad %d: config %v", pad, c)
		}
	}
	if _, ok, err := kernel.EmbeddedConfig(bytes.NewReader(bytes.Repeat([]byte("x"), 3<<20))); ok || err != nil {
		t.Errorf("no marker: ok=%v err=%v", ok, err)
	}
	// A start marker with no end within the bound is refused, not read on.
	unterminated := append([]byte("IKCFG_ST\x1f\x8b\x08"), bytes.Repeat([]byte{0}, 5<<20)...)
	if _, _, err := kernel.EmbeddedConfig(bytes.NewReader(unterminated)); !errcode.HasCode(err, errcode.InvalidKernel) {
		t.Errorf("unterminated block: %v", err)
	}
	broken := []byte("IKCFG_ST\x1f\x8b\x08garbageIKCFG_ED")
	if _, _, err := kernel.EmbeddedConfig(bytes.NewReader(broken)); !errcode.HasCode(err, errcode.InvalidKernel) {
		t.Errorf("corrupt gzip: %v", err)
	}
}

func FuzzEmbeddedConfig(f *testing.F) {
	f.Add(fakeImage(f, sampleConfig, 0))
	f.Add([]byte("IKCFG_ST\x1f\x8b\x08IKCFG_ED"))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _, _ = kernel.EmbeddedConfig(bytes.NewReader(b))
	})
}

func FuzzParseConfig(f *testing.F) {
	f.Add(sampleConfig)
	f.Add("CONFIG_A=\nCONFIG_B==y")
	f.Fuzz(func(t *testing.T, s string) {
		c, err := kernel.ParseConfig(strings.NewReader(s))
		if err == nil {
			for k := range c {
				if k == "" {
					t.Fatal("empty symbol accepted")
				}
			}
		}
	})
}

func writeFile(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestFindConfigSidecarAndEmbedded(t *testing.T) {
	dir := t.TempDir()
	// A kernel with no embedded config, its config beside it under the
	// scripts/fetch-kernel.sh naming, reached through a symlink.
	writeFile(t, filepath.Join(dir, "vmlinuz-6.1.0-test"), []byte("not really a kernel"))
	writeFile(t, filepath.Join(dir, "config-6.1.0-test"), []byte(sampleConfig))
	if err := os.Symlink("vmlinuz-6.1.0-test", filepath.Join(dir, "vmlinuz")); err != nil {
		t.Fatal(err)
	}
	c, from, err := kernel.FindConfig(filepath.Join(dir, "vmlinuz"))
	if err != nil || from != (kernel.ConfigSource{Path: filepath.Join(dir, "config-6.1.0-test")}) || !c.Builtin("VIRTIO_BLK") {
		t.Errorf("FindConfig via symlink = %v from %s, %v", c, from, err)
	}
	// An embedded config wins over a sidecar.
	writeFile(t, filepath.Join(dir, "vmlinux-fc"), fakeImage(t, "CONFIG_VIRTIO_MMIO=y\n", 10))
	writeFile(t, filepath.Join(dir, "config-fc"), []byte(sampleConfig))
	c, from, err = kernel.FindConfig(filepath.Join(dir, "vmlinux-fc"))
	if err != nil || !from.Embedded || !c.Builtin("VIRTIO_MMIO") || c.Builtin("VIRTIO_BLK") {
		t.Errorf("FindConfig embedded = %v from %s, %v", c, from, err)
	}
	// A broken sidecar is an error, not a silent fallback.
	writeFile(t, filepath.Join(dir, "vmlinuz-bad"), []byte("x"))
	writeFile(t, filepath.Join(dir, "config-bad"), []byte("garbage\n"))
	if _, _, err := kernel.FindConfig(filepath.Join(dir, "vmlinuz-bad")); !errcode.HasCode(err, errcode.InvalidKernel) {
		t.Errorf("broken sidecar: %v", err)
	}
	writeFile(t, filepath.Join(dir, "plain"), []byte("x"))
	if _, _, err := kernel.FindConfig(filepath.Join(dir, "plain")); !errcode.HasCode(err, errcode.ConfigNotFound) {
		t.Errorf("no config: %v", err)
	}
	// A search dir holding config-<file name>, as a registry keeps one
	// for a kernel it stores under a content name.
	search := t.TempDir()
	writeFile(t, filepath.Join(search, kernel.ConfigFileName(filepath.Join(dir, "plain"))), []byte(sampleConfig))
	if c, from, err := kernel.FindConfig(filepath.Join(dir, "plain"), search); err != nil || from.Path != filepath.Join(search, "config-plain") || !c.Builtin("VIRTIO_BLK") {
		t.Errorf("FindConfig with a search dir = %v from %s, %v", c, from, err)
	}
	if _, _, err := kernel.FindConfig(filepath.Join(dir, "missing")); !errcode.HasCode(err, errcode.KernelNotFound) {
		t.Errorf("missing kernel: %v", err)
	}
}

// TestFindConfigDebian reads the real Debian cloud kernel's config: found
// by its release in a search dir once the kernel is stored away from it
// (as the registry stores kernels), with virtio modular and NVMe built in,
// the facts the qemu driver's device choice rests on.
func TestFindConfigDebian(t *testing.T) {
	kernelPath := kerneltest.Path(t)
	release, err := kernel.Release(kernelPath)
	if err != nil {
		t.Fatal(err)
	}
	c, from, err := kernel.FindConfig(kernelPath)
	if err != nil {
		t.Fatal(err)
	}
	stored := filepath.Join(t.TempDir(), "sha256-kernel")
	b, err := os.ReadFile(kernelPath)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, stored, b)
	search := t.TempDir()
	cb, err := os.ReadFile(from.Path)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(search, "config-"+release), cb)
	c2, from2, err := kernel.FindConfig(stored, search)
	if err != nil || from2.Path != filepath.Join(search, "config-"+release) || len(c2) != len(c) {
		t.Errorf("FindConfig of the stored copy = %d symbols from %s, %v", len(c2), from2, err)
	}
	if !c.Builtin("BLK_DEV_NVME") || c.Builtin("VIRTIO_BLK") || c.Builtin("VIRTIO_CONSOLE") {
		t.Errorf("Debian cloud kernel: NVME=%q VIRTIO_BLK=%q VIRTIO_CONSOLE=%q; the qemu driver assumes NVMe built in and virtio modular",
			c["BLK_DEV_NVME"], c["VIRTIO_BLK"], c["VIRTIO_CONSOLE"])
	}
}
