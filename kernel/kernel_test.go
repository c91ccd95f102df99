package kernel

import (
	"bytes"
	"crypto/sha256"
	"debug/elf"
	"encoding/binary"
	"encoding/hex"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/vmm"
)

// note renders one ELF note.
func note(name string, typ uint32, desc []byte) []byte {
	var b bytes.Buffer
	n := append([]byte(name), 0)
	binary.Write(&b, binary.LittleEndian, [3]uint32{uint32(len(n)), uint32(len(desc)), typ})
	b.Write(n)
	b.Write(make([]byte, int(align4(uint64(len(n))))-len(n)))
	b.Write(desc)
	b.Write(make([]byte, int(align4(uint64(len(desc))))-len(desc)))
	return b.Bytes()
}

// makeELF builds a minimal 64-bit little-endian ELF with one PT_NOTE
// segment holding notes (when not nil).
func makeELF(machine elf.Machine, typ elf.Type, notes []byte) []byte {
	const ehsize, phsize = 64, 56
	var b bytes.Buffer
	ident := [16]byte{0x7f, 'E', 'L', 'F', byte(elf.ELFCLASS64), byte(elf.ELFDATA2LSB), byte(elf.EV_CURRENT)}
	b.Write(ident[:])
	phnum := uint16(0)
	if notes != nil {
		phnum = 1
	}
	binary.Write(&b, binary.LittleEndian, struct {
		Type, Machine                                   uint16
		Version                                         uint32
		Entry, Phoff, Shoff                             uint64
		Flags                                           uint32
		Ehsize, Phentsize, Phnum, Shentsize, Shnum, Shx uint16
	}{uint16(typ), uint16(machine), 1, 0x1000000, ehsize, 0, 0, ehsize, phsize, phnum, 64, 0, 0})
	if notes != nil {
		binary.Write(&b, binary.LittleEndian, elf.Prog64{
			Type: uint32(elf.PT_NOTE), Off: ehsize + phsize, Filesz: uint64(len(notes)), Memsz: uint64(len(notes)), Align: 4,
		})
		b.Write(notes)
	}
	return b.Bytes()
}

// makeBzImage builds a setup header with the given boot protocol version,
// loadflags and xloadflags.
func makeBzImage(version uint16, loadflags, xloadflags byte) []byte {
	b := make([]byte, 4096)
	copy(b[bzMagicOffset:], bzMagic)
	binary.LittleEndian.PutUint16(b[bzVersionOffset:], version)
	b[bzLoadflagsOffset] = loadflags
	b[bzXloadflagsOff] = xloadflags
	return b
}

func TestInspect(t *testing.T) {
	pvh := note("Xen", xenElfnotePhys32Entry, []byte{0, 0, 0, 1})
	other := note("GNU", 3, make([]byte, 20))
	tests := []struct {
		name    string
		data    []byte
		want    Info // SHA256 and SizeBytes are checked separately
		errCode errcode.Code
	}{
		{"x86_64 vmlinux with PVH", makeELF(elf.EM_X86_64, elf.ET_EXEC, append(other, pvh...)),
			Info{Format: FormatELF, Arch: ArchX86_64, PVH: true, VMMs: []string{vmm.Firecracker, vmm.QEMU}}, ""},
		{"x86_64 vmlinux without PVH", makeELF(elf.EM_X86_64, elf.ET_EXEC, other),
			Info{Format: FormatELF, Arch: ArchX86_64, VMMs: []string{vmm.Firecracker}}, ""},
		{"x86_64 vmlinux without notes", makeELF(elf.EM_X86_64, elf.ET_EXEC, nil),
			Info{Format: FormatELF, Arch: ArchX86_64, VMMs: []string{vmm.Firecracker}}, ""},
		{"Xen note of another type", makeELF(elf.EM_X86_64, elf.ET_EXEC, note("Xen", 1, []byte{1, 2, 3, 4})),
			Info{Format: FormatELF, Arch: ArchX86_64, VMMs: []string{vmm.Firecracker}}, ""},
		{"aarch64 vmlinux", makeELF(elf.EM_AARCH64, elf.ET_EXEC, nil),
			Info{Format: FormatELF, Arch: ArchAarch64, VMMs: []string{vmm.QEMU}}, ""},
		{"bzImage 2.15", makeBzImage(0x020f, loadedHigh, xlfKernel64),
			Info{Format: FormatBzImage, Arch: ArchX86_64, BootProtocol: "2.15", VMMs: []string{vmm.QEMU}}, ""},
		{"bzImage 2.10 (before xloadflags)", makeBzImage(0x020a, loadedHigh, 0),
			Info{Format: FormatBzImage, Arch: ArchX86_64, BootProtocol: "2.10", VMMs: []string{vmm.QEMU}}, ""},
		{"riscv ELF", makeELF(elf.EM_RISCV, elf.ET_EXEC, nil), Info{}, errcode.InvalidKernel},
		{"relocatable object", makeELF(elf.EM_X86_64, elf.ET_REL, nil), Info{}, errcode.InvalidKernel},
		{"truncated ELF", makeELF(elf.EM_X86_64, elf.ET_EXEC, nil)[:20], Info{}, errcode.InvalidKernel},
		{"old boot protocol", makeBzImage(0x0204, loadedHigh, 0), Info{}, errcode.InvalidKernel},
		{"zImage", makeBzImage(0x020f, 0, xlfKernel64), Info{}, errcode.InvalidKernel},
		{"32-bit bzImage", makeBzImage(0x020f, loadedHigh, 0), Info{}, errcode.InvalidKernel},
		{"truncated bzImage", makeBzImage(0x020f, loadedHigh, xlfKernel64)[:0x210], Info{}, errcode.InvalidKernel},
		{"text file", []byte("#!/bin/sh\necho not a kernel\n"), Info{}, errcode.InvalidKernel},
		{"empty", nil, Info{}, errcode.InvalidKernel},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "kernel")
			if err := os.WriteFile(path, tt.data, 0o644); err != nil {
				t.Fatal(err)
			}
			got, err := Inspect(path)
			if tt.errCode != "" {
				if !errcode.HasCode(err, tt.errCode) {
					t.Fatalf("Inspect = %+v, %v; want %s", got, err, tt.errCode)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			sum := sha256.Sum256(tt.data)
			if got.SHA256 != hex.EncodeToString(sum[:]) || got.SizeBytes != int64(len(tt.data)) {
				t.Errorf("digest/size = %s/%d, want %x/%d", got.SHA256, got.SizeBytes, sum, len(tt.data))
			}
			got.SHA256, got.SizeBytes = "", 0
			if got.Format != tt.want.Format || got.Arch != tt.want.Arch || got.PVH != tt.want.PVH ||
				got.BootProtocol != tt.want.BootProtocol || !slices.Equal(got.VMMs, tt.want.VMMs) {
				t.Errorf("Inspect = %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestInspectMissingAndDirectory(t *testing.T) {
	dir := t.TempDir()
	if _, err := Inspect(filepath.Join(dir, "nope")); !errcode.HasCode(err, errcode.KernelNotFound) {
		t.Errorf("missing: %v, want KernelNotFound", err)
	}
	if _, err := Inspect(dir); !errcode.HasCode(err, errcode.InvalidKernel) {
		t.Errorf("directory: %v, want InvalidKernel", err)
	}
}

func TestCheckBootable(t *testing.T) {
	host := hostArch()
	bz := Info{Format: FormatBzImage, Arch: ArchX86_64, VMMs: []string{vmm.QEMU}}
	elfPVH := Info{Format: FormatELF, Arch: ArchX86_64, PVH: true, VMMs: []string{vmm.Firecracker, vmm.QEMU}}
	elfNoPVH := Info{Format: FormatELF, Arch: ArchX86_64, VMMs: []string{vmm.Firecracker}}
	arm := Info{Format: FormatELF, Arch: ArchAarch64, VMMs: []string{vmm.QEMU}}
	tests := []struct {
		name string
		info Info
		vmm  string
		ok   bool
		hint string
	}{
		{"bzImage on qemu", bz, vmm.QEMU, host == ArchX86_64, ""},
		{"bzImage on firecracker", bz, vmm.Firecracker, false, "uncompressed ELF vmlinux"},
		{"PVH vmlinux on qemu", elfPVH, vmm.QEMU, host == ArchX86_64, ""},
		{"PVH vmlinux on firecracker", elfPVH, vmm.Firecracker, host == ArchX86_64, ""},
		{"vmlinux without PVH on qemu", elfNoPVH, vmm.QEMU, false, "PVH"},
		{"foreign architecture", arm, vmm.QEMU, host == ArchAarch64, "built for"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := CheckBootable(tt.info, tt.vmm)
			if tt.ok {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if !errcode.HasCode(err, errcode.KernelUnsupported) {
				t.Fatalf("CheckBootable = %v, want KernelUnsupported", err)
			}
			if host == ArchX86_64 && tt.hint != "" && !bytes.Contains([]byte(errcode.HintOf(err)), []byte(tt.hint)) {
				t.Errorf("hint %q does not mention %q", errcode.HintOf(err), tt.hint)
			}
		})
	}
}

func TestStore(t *testing.T) {
	src := filepath.Join(t.TempDir(), "bzImage")
	data := makeBzImage(0x020f, loadedHigh, xlfKernel64)
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "kernels")
	path, info, err := Store(src, dir)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(data)
	if want := filepath.Join(dir, "sha256-"+hex.EncodeToString(sum[:])); path != want {
		t.Errorf("path %s, want %s", path, want)
	}
	if info.Format != FormatBzImage {
		t.Errorf("info %+v", info)
	}
	again, _, err := Store(src, dir)
	if err != nil || again != path {
		t.Errorf("second Store = %s, %v", again, err)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("kernels dir holds %d entries, want 1", len(entries))
	}

	bad := filepath.Join(t.TempDir(), "notakernel")
	os.WriteFile(bad, []byte("hello"), 0o600)
	if _, _, err := Store(bad, dir); !errcode.HasCode(err, errcode.InvalidKernel) {
		t.Errorf("Store(text) = %v, want InvalidKernel", err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Errorf("a refused kernel left files behind: %d entries", len(entries))
	}
}

func FuzzInspect(f *testing.F) {
	f.Add(makeELF(elf.EM_X86_64, elf.ET_EXEC, note("Xen", xenElfnotePhys32Entry, []byte{0, 0, 0, 1})))
	f.Add(makeELF(elf.EM_AARCH64, elf.ET_EXEC, nil))
	f.Add(makeBzImage(0x020f, loadedHigh, xlfKernel64))
	f.Add([]byte("\x7fELF"))
	f.Fuzz(func(t *testing.T, b []byte) {
		info, err := identify(bytes.NewReader(b), int64(len(b)))
		if err != nil {
			if !errcode.HasCode(err, errcode.InvalidKernel) {
				t.Fatalf("error without InvalidKernel code: %v", err)
			}
			return
		}
		if info.Format == "" || info.Arch == "" || len(info.VMMs) == 0 {
			t.Fatalf("accepted with incomplete info %+v", info)
		}
	})
}
