// Package kernel validates guest kernel files, fetches them (over HTTP with
// a pinned SHA-256, or Debian's cloud kernel through apt) and stores them
// content-addressed. It works on files only; the registry keeps names and
// rows on top of it.
//
// Two formats are accepted: an ELF vmlinux (x86_64 or aarch64) and an x86
// bzImage. Which VMMs can boot a file is decided here, once, so that a
// mismatch is refused before any VMM is spawned:
//
//   - Firecracker (v1.16) boots an uncompressed ELF vmlinux on x86_64 (on
//     aarch64 it wants a PE "Image", which this package does not accept).
//   - QEMU boots a bzImage, and an x86_64 ELF vmlinux only when it carries a
//     PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); qemu-system-aarch64 loads an
//     aarch64 ELF directly.
package kernel

import (
	"bytes"
	"crypto/sha256"
	"debug/elf"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"runtime"
	"slices"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/vmm"
)

// Formats.
const (
	FormatELF     = "elf"
	FormatBzImage = "bzimage"
)

// Architectures.
const (
	ArchX86_64  = "x86_64"
	ArchAarch64 = "aarch64"
)

// Info describes a kernel file.
type Info struct {
	Format    string   `json:"format"`
	Arch      string   `json:"arch"`
	SHA256    string   `json:"sha256"`
	SizeBytes int64    `json:"size_bytes"`
	VMMs      []string `json:"vmms"`
	// PVH reports an x86_64 ELF with a PVH entry point note.
	PVH bool `json:"pvh,omitempty"`
	// BootProtocol is a bzImage's boot protocol version, e.g. "2.15".
	BootProtocol string `json:"boot_protocol,omitempty"`
}

// Inspect identifies the kernel at path and hashes it.
func Inspect(path string) (Info, error) {
	f, err := os.Open(path)
	if err != nil {
		if os.IsNotExist(err) {
			return Info{}, errcode.Wrap(errcode.KernelNotFound, err, "kernel %s", path)
		}
		return Info{}, errcode.Wrap(errcode.InvalidKernel, err, "open kernel %s", path)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return Info{}, errcode.Wrap(errcode.InvalidKernel, err, "stat kernel %s", path)
	}
	if !st.Mode().IsRegular() {
		return Info{}, errcode.New(errcode.InvalidKernel, "kernel %s is not a regular file", path)
	}
	info, err := identify(f, st.Size())
	if err != nil {
		return Info{}, fmt.Errorf("%s: %w", path, err)
	}
	h := sha256.New()
	n, err := io.Copy(h, io.NewSectionReader(f, 0, st.Size()))
	if err != nil {
		return Info{}, errcode.Wrap(errcode.InvalidKernel, err, "read kernel %s", path)
	}
	info.SHA256 = hex.EncodeToString(h.Sum(nil))
	info.SizeBytes = n
	return info, nil
}

// identify reads the format, architecture and bootable VMMs from a kernel
// image of the given size. It is the parser of untrusted input and is
// fuzzed.
func identify(r io.ReaderAt, size int64) (Info, error) {
	var magic [4]byte
	if _, err := r.ReadAt(magic[:], 0); err == nil && string(magic[:]) == elf.ELFMAG {
		return identifyELF(r)
	}
	var hdrs [4]byte
	if _, err := r.ReadAt(hdrs[:], bzMagicOffset); err == nil && string(hdrs[:]) == bzMagic {
		return identifyBzImage(r, size)
	}
	return Info{}, errcode.New(errcode.InvalidKernel, "not an ELF vmlinux or a bzImage").
		WithHint("give the kernel's vmlinux (ELF) or its bzImage (arch/x86/boot/bzImage, /boot/vmlinuz-*)")
}

func identifyELF(r io.ReaderAt) (Info, error) {
	f, err := elf.NewFile(r)
	if err != nil {
		return Info{}, errcode.Wrap(errcode.InvalidKernel, err, "malformed ELF")
	}
	if f.Type != elf.ET_EXEC && f.Type != elf.ET_DYN {
		return Info{}, errcode.New(errcode.InvalidKernel, "ELF type %s is not an executable kernel", f.Type)
	}
	info := Info{Format: FormatELF}
	switch {
	case f.Machine == elf.EM_X86_64 && f.Class == elf.ELFCLASS64:
		info.Arch = ArchX86_64
		info.PVH = hasPVHNote(f)
		info.VMMs = []string{vmm.Firecracker}
		if info.PVH {
			info.VMMs = append(info.VMMs, vmm.QEMU)
		}
	case f.Machine == elf.EM_AARCH64 && f.Class == elf.ELFCLASS64:
		info.Arch = ArchAarch64
		info.VMMs = []string{vmm.QEMU}
	default:
		return Info{}, errcode.New(errcode.InvalidKernel, "ELF for %s (%s), want x86_64 or aarch64", f.Machine, f.Class)
	}
	return info, nil
}

// xenElfnotePhys32Entry is the ELF note type (name "Xen") holding the
// 32-bit PVH entry point that QEMU and Firecracker jump to.
const xenElfnotePhys32Entry = 18

// maxNoteBytes bounds how much of a note segment is read.
const maxNoteBytes = 1 << 20

func hasPVHNote(f *elf.File) bool {
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		b, err := io.ReadAll(io.LimitReader(p.Open(), maxNoteBytes))
		if err != nil && len(b) == 0 {
			continue
		}
		if notesHave(b, f.ByteOrder, "Xen", xenElfnotePhys32Entry) {
			return true
		}
	}
	return false
}

// notesHave walks a note segment (namesz, descsz, type, name, desc; name
// and desc padded to 4 bytes) looking for a note of the given name and type.
func notesHave(b []byte, order binary.ByteOrder, name string, typ uint32) bool {
	for len(b) >= 12 {
		namesz, descsz, t := order.Uint32(b), order.Uint32(b[4:]), order.Uint32(b[8:])
		b = b[12:]
		descEnd := align4(uint64(namesz)) + align4(uint64(descsz))
		if descEnd > uint64(len(b)) {
			return false
		}
		n := bytes.TrimRight(b[:namesz], "\x00")
		if t == typ && string(n) == name {
			return true
		}
		b = b[descEnd:]
	}
	return false
}

func align4(n uint64) uint64 { return (n + 3) &^ 3 }

// bzImage setup header fields (Documentation/arch/x86/boot.rst).
const (
	bzMagicOffset     = 0x202 // "HdrS"
	bzMagic           = "HdrS"
	bzVersionOffset   = 0x206 // boot protocol version, u16
	bzLoadflagsOffset = 0x211 // bit 0: LOADED_HIGH (a bzImage, not a zImage)
	bzXloadflagsOff   = 0x236 // bit 0: XLF_KERNEL_64 (protocol ≥ 2.12)
	bzSetupHeaderEnd  = 0x268
	loadedHigh        = 0x01
	xlfKernel64       = 0x01
	// QEMU loads protocol 2.00 and later high; 2.06 added cmdline_size,
	// which it relies on for a long command line.
	minBootProtocol = 0x0206
)

func identifyBzImage(r io.ReaderAt, size int64) (Info, error) {
	if size < bzSetupHeaderEnd {
		return Info{}, errcode.New(errcode.InvalidKernel, "bzImage truncated: %d bytes", size)
	}
	hdr := make([]byte, bzSetupHeaderEnd)
	if _, err := r.ReadAt(hdr, 0); err != nil {
		return Info{}, errcode.Wrap(errcode.InvalidKernel, err, "read bzImage header")
	}
	version := binary.LittleEndian.Uint16(hdr[bzVersionOffset:])
	proto := fmt.Sprintf("%d.%02d", version>>8, version&0xff)
	if version < minBootProtocol {
		return Info{}, errcode.New(errcode.InvalidKernel, "bzImage boot protocol %s is older than 2.06", proto)
	}
	if hdr[bzLoadflagsOffset]&loadedHigh == 0 {
		return Info{}, errcode.New(errcode.InvalidKernel, "a zImage (loaded low), not a bzImage")
	}
	if version >= 0x020c && hdr[bzXloadflagsOff]&xlfKernel64 == 0 {
		return Info{}, errcode.New(errcode.InvalidKernel, "bzImage is a 32-bit kernel, want x86_64")
	}
	return Info{Format: FormatBzImage, Arch: ArchX86_64, BootProtocol: proto, VMMs: []string{vmm.QEMU}}, nil
}

// hostArch is the kernel architecture name of the machine hyphae runs on.
func hostArch() string {
	switch runtime.GOARCH {
	case "amd64":
		return ArchX86_64
	case "arm64":
		return ArchAarch64
	}
	return runtime.GOARCH
}

// CheckBootable refuses, with errcode.KernelUnsupported and a hint, a
// kernel that the named VMM cannot boot on this host. Both drivers run
// guests of the host's own architecture.
func CheckBootable(info Info, vmmName string) error {
	if host := hostArch(); info.Arch != host {
		return errcode.New(errcode.KernelUnsupported, "kernel is %s, this host is %s", info.Arch, host).
			WithHint("use a kernel built for " + host)
	}
	if slices.Contains(info.VMMs, vmmName) {
		return nil
	}
	e := errcode.New(errcode.KernelUnsupported, "%s cannot boot this %s %s kernel (bootable by: %v)", vmmName, info.Arch, info.Format, info.VMMs)
	switch {
	case vmmName == vmm.Firecracker && info.Format == FormatBzImage:
		e.WithHint("Firecracker needs an uncompressed ELF vmlinux: use the kernel build's vmlinux (or extract it with the kernel's scripts/extract-vmlinux), or run with --vmm qemu")
	case vmmName == vmm.QEMU && info.Format == FormatELF && !info.PVH:
		e.WithHint("QEMU boots an x86_64 vmlinux only with a PVH entry note (CONFIG_PVH=y); use the bzImage of the same build, or --vmm firecracker")
	default:
		e.WithHint(fmt.Sprintf("pick a VMM from %v", info.VMMs))
	}
	return e
}
