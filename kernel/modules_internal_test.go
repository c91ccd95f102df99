package kernel

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
)

// makeModule builds a minimal relocatable ELF whose .modinfo section holds
// name=, depends= and a filler record, as modpost writes it.
func makeModule(name, depends string) []byte {
	modinfo := []byte("license=GPL\x00name=" + name + "\x00depends=" + depends + "\x00vermagic=6.1.0 SMP\x00")
	shstrtab := []byte("\x00.modinfo\x00.shstrtab\x00")
	const ehsize, shentsize = 64, 64
	var b bytes.Buffer
	ident := [16]byte{0x7f, 'E', 'L', 'F', 2, 1, 1}
	b.Write(ident[:])
	dataOff := uint64(ehsize)
	strOff := dataOff + uint64(len(modinfo))
	shoff := strOff + uint64(len(shstrtab))
	binary.Write(&b, binary.LittleEndian, struct {
		Type, Machine                                   uint16
		Version                                         uint32
		Entry, Phoff, Shoff                             uint64
		Flags                                           uint32
		Ehsize, Phentsize, Phnum, Shentsize, Shnum, Shx uint16
	}{1, 62, 1, 0, 0, shoff, 0, ehsize, 0, 0, shentsize, 3, 2})
	b.Write(modinfo)
	b.Write(shstrtab)
	type sh struct {
		Name, Type             uint32
		Flags, Addr, Off, Size uint64
		Link, Info             uint32
		Addralign, Entsize     uint64
	}
	binary.Write(&b, binary.LittleEndian, sh{})
	binary.Write(&b, binary.LittleEndian, sh{Name: 1, Type: 1, Flags: 2, Off: dataOff, Size: uint64(len(modinfo)), Addralign: 1})
	binary.Write(&b, binary.LittleEndian, sh{Name: 10, Type: 3, Off: strOff, Size: uint64(len(shstrtab)), Addralign: 1})
	return b.Bytes()
}

// compress encodes b for a module file suffix.
func compress(t *testing.T, suffix string, b []byte) []byte {
	t.Helper()
	var out bytes.Buffer
	switch suffix {
	case ".ko":
		return b
	case ".ko.xz":
		w, err := xz.NewWriter(&out)
		if err != nil {
			t.Fatal(err)
		}
		w.Write(b)
		w.Close()
	case ".ko.zst":
		w, err := zstd.NewWriter(&out)
		if err != nil {
			t.Fatal(err)
		}
		w.Write(b)
		w.Close()
	case ".ko.gz":
		w := gzip.NewWriter(&out)
		w.Write(b)
		w.Close()
	}
	return out.Bytes()
}

// fakeTree writes modules (file path relative to the tree → depends=) and
// a modules.builtin listing builtin.
func fakeTree(t *testing.T, modules map[string]string, builtin ...string) string {
	t.Helper()
	dir := t.TempDir()
	for rel, deps := range modules {
		p := filepath.Join(dir, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		suffix := rel[strings.Index(rel, ".ko"):]
		if err := os.WriteFile(p, compress(t, suffix, makeModule(moduleName(filepath.Base(rel)), deps)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "modules.builtin"), []byte(strings.Join(builtin, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestModulesImageResolution(t *testing.T) {
	base := map[string]string{
		"kernel/net/core/failover.ko":                    "",
		"kernel/drivers/net/net_failover.ko":             "failover",
		"kernel/drivers/virtio/virtio.ko":                "",
		"kernel/drivers/virtio/virtio_ring.ko":           "",
		"kernel/drivers/net/virtio_net.ko":               "net_failover,virtio,virtio_ring",
		"kernel/drivers/virtio/virtio_pci.ko":            "virtio_ring,virtio,virtio-pci-modern-dev",
		"kernel/drivers/virtio/virtio_pci_modern_dev.ko": "",
		"kernel/drivers/char/virtio-rng.ko":              "virtio,crc32c",
		"kernel/cycle/a.ko":                              "b",
		"kernel/cycle/b.ko":                              "a",
	}
	tests := []struct {
		name    string
		names   []string
		builtin []string
		want    []string // load order; nil with code set means an error
		code    errcode.Code
	}{
		{name: "dependencies first", names: []string{"virtio_net"},
			want: []string{"failover", "net_failover", "virtio", "virtio_ring", "virtio_net"}},
		{name: "shared dependencies once", names: []string{"virtio_net", "virtio-pci"},
			want: []string{"failover", "net_failover", "virtio", "virtio_ring", "virtio_net", "virtio_pci_modern_dev", "virtio_pci"}},
		{name: "dashes fold, built-in dependency left out", names: []string{"virtio-rng"}, builtin: []string{"kernel/lib/crc32c.ko"},
			want: []string{"virtio", "virtio_rng"}},
		{name: "all built in", names: []string{"nvme"}, builtin: []string{"kernel/drivers/nvme/host/nvme.ko"}, want: []string{}},
		{name: "unknown module", names: []string{"e1000"}, code: errcode.ModulesNotFound},
		{name: "missing dependency", names: []string{"virtio-rng"}, code: errcode.ModulesNotFound},
		{name: "cycle", names: []string{"a"}, code: errcode.ModulesNotFound},
		{name: "bad name", names: []string{"../virtio"}, code: errcode.InvalidArgument},
		{name: "no names", code: errcode.InvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := fakeTree(t, base, tt.builtin...)
			out := t.TempDir()
			path, order, err := ModulesImage(context.Background(), dir, tt.names, out)
			if tt.code != "" {
				if !errcode.HasCode(err, tt.code) {
					t.Fatalf("err = %v, want %s", err, tt.code)
				}
				if entries, _ := os.ReadDir(out); len(entries) != 0 {
					t.Errorf("failed build left %d files in %s", len(entries), out)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(order, tt.want) && !(len(order) == 0 && len(tt.want) == 0) {
				t.Fatalf("order = %q, want %q", order, tt.want)
			}
			if len(tt.want) == 0 {
				if path != "" {
					t.Fatalf("path = %q for built-in modules only", path)
				}
				return
			}
			if got := readImageFile(t, path, guest.ModulesLoadFile); got != strings.Join(tt.want, ".ko\n")+".ko\n" {
				t.Errorf("%s = %q", guest.ModulesLoadFile, got)
			}
		})
	}
}

// TestModulesImageDecompresses packs the same modules stored raw, as xz,
// zstd and gzip: the image holds them decompressed, so all four give the
// same content-addressed image.
func TestModulesImageDecompresses(t *testing.T) {
	var paths []string
	for _, suffix := range []string{".ko", ".ko.xz", ".ko.zst", ".ko.gz"} {
		dir := fakeTree(t, map[string]string{
			"kernel/a/virtio" + suffix:     "",
			"kernel/b/virtio_net" + suffix: "virtio",
		})
		path, order, err := ModulesImage(context.Background(), dir, []string{"virtio_net"}, t.TempDir())
		if err != nil {
			t.Fatalf("%s: %v", suffix, err)
		}
		if !slices.Equal(order, []string{"virtio", "virtio_net"}) {
			t.Fatalf("%s: order %q", suffix, order)
		}
		if got := readImageFile(t, path, "virtio_net.ko"); got != string(makeModule("virtio_net", "virtio")) {
			t.Fatalf("%s: virtio_net.ko in the image is not the decompressed module", suffix)
		}
		paths = append(paths, filepath.Base(path))
	}
	for _, p := range paths[1:] {
		if p != paths[0] {
			t.Errorf("images differ by compression: %q", paths)
		}
	}
}

func TestModulesImageUpdatesWin(t *testing.T) {
	dir := fakeTree(t, map[string]string{
		"kernel/drivers/virtio_net.ko": "",
		"updates/virtio_net.ko":        "virtio",
		"kernel/virtio.ko":             "",
	})
	_, order, err := ModulesImage(context.Background(), dir, []string{"virtio_net"}, t.TempDir())
	if err != nil || !slices.Equal(order, []string{"virtio", "virtio_net"}) {
		t.Fatalf("order %q, %v: want the updates/ copy (which depends on virtio)", order, err)
	}
}

// readImageFile reads one file out of an ext4 image with debugfs, which is
// independent of the code that built it.
func readImageFile(t *testing.T, image, name string) string {
	t.Helper()
	debugfs, err := exec.LookPath("debugfs")
	if err != nil {
		debugfs = "/usr/sbin/debugfs"
	}
	out, err := exec.Command(debugfs, "-R", "cat /"+name, image).Output()
	if err != nil {
		t.Fatalf("debugfs cat %s: %v", name, err)
	}
	return string(out)
}

func TestParseDepends(t *testing.T) {
	tests := []struct {
		in   string
		want []string
		bad  bool
	}{
		{"depends=\x00", nil, false},
		{"license=GPL\x00depends=a,b-c\x00name=x\x00", []string{"a", "b_c"}, false},
		{"depends=a,,a\x00", []string{"a"}, false},
		{"nodepends=a\x00", nil, false},
		{"depends=../x\x00", nil, true},
		{"depends=a b\x00", nil, true},
	}
	for _, tt := range tests {
		got, err := parseDepends([]byte(tt.in))
		if (err != nil) != tt.bad || !slices.Equal(got, tt.want) {
			t.Errorf("parseDepends(%q) = %q, %v", tt.in, got, err)
		}
	}
}

func FuzzParseDepends(f *testing.F) {
	f.Add([]byte("depends=virtio,virtio_ring\x00name=virtio_net\x00"))
	f.Add(makeModule("x", "y"))
	f.Fuzz(func(t *testing.T, b []byte) {
		deps, err := parseDepends(b)
		if err != nil {
			return
		}
		for _, d := range deps {
			if !validModuleName.MatchString(d) {
				t.Fatalf("accepted dependency %q", d)
			}
		}
		_, _ = moduleDepends(b)
	})
}

func TestBzRelease(t *testing.T) {
	withVersion := func(s string) []byte {
		b := makeBzImage(0x020f, loadedHigh, xlfKernel64)
		binary.LittleEndian.PutUint16(b[bzKernelVersionOffset:], 0x300)
		copy(b[bzKernelVersionBase+0x300:], s+"\x00")
		return b
	}
	tests := []struct {
		name string
		img  []byte
		want string
	}{
		{"debian", withVersion("6.1.0-57-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP PREEMPT_DYNAMIC Debian 6.1.192-3"), "6.1.0-57-cloud-amd64"},
		{"bare", withVersion("6.12.9"), "6.12.9"},
		{"no pointer", makeBzImage(0x020f, loadedHigh, xlfKernel64), ""},
		{"not a release", withVersion("../../etc (x)"), ""},
		{"not a bzImage", make([]byte, 4096), ""},
	}
	for _, tt := range tests {
		got, err := bzRelease(bytes.NewReader(tt.img), int64(len(tt.img)))
		if got != tt.want || (tt.want == "") != (err != nil) {
			t.Errorf("%s: bzRelease = %q, %v; want %q", tt.name, got, err, tt.want)
		}
		if err != nil && !errcode.HasCode(err, errcode.InvalidKernel) {
			t.Errorf("%s: error %v lacks %s", tt.name, err, errcode.InvalidKernel)
		}
	}
}

func FuzzBzRelease(f *testing.F) {
	b := makeBzImage(0x020f, loadedHigh, xlfKernel64)
	binary.LittleEndian.PutUint16(b[bzKernelVersionOffset:], 0x300)
	copy(b[bzKernelVersionBase+0x300:], "6.1.0 (x)\x00")
	f.Add(b)
	f.Fuzz(func(t *testing.T, img []byte) {
		rel, err := bzRelease(bytes.NewReader(img), int64(len(img)))
		if err == nil && !validRelease.MatchString(rel) {
			t.Fatalf("accepted release %q", rel)
		}
	})
}
