package project

import (
	"bytes"
	"encoding/binary"
	"fmt"
)

// ldCacheMagic opens the "new" ld.so.cache format that glibc has written
// alone since 2.32 (Debian 12 ships 2.36).
const ldCacheMagic = "glibc-ld.so.cache1.1"

const (
	ldCacheHeaderSize = 48 // magic, nlibs, len_strings, flags, padding, extension_offset, unused[3]
	ldCacheEntrySize  = 24 // flags, key, value, osversion, hwcap
	ldCacheMaxEntries = 1 << 20
)

// parseLDCache reads a glibc ld.so.cache and returns, for each soname, the
// paths it lists in cache order. Entries for hwcap subdirectories (the
// glibc-hwcaps/x86-64-v3 kind) are skipped: a guest CPU — QEMU's TCG one,
// say — need not support the host's ISA level, so the baseline build is
// the one to ship. Other formats (the pre-2.32 combined one) are refused
// and the caller falls back to the standard directories.
func parseLDCache(b []byte) (map[string][]string, error) {
	if len(b) < ldCacheHeaderSize || !bytes.HasPrefix(b, []byte(ldCacheMagic)) {
		return nil, fmt.Errorf("not a %q ld.so.cache", ldCacheMagic)
	}
	le := binary.LittleEndian
	n := le.Uint32(b[20:])
	if n > ldCacheMaxEntries || uint64(ldCacheHeaderSize)+uint64(n)*ldCacheEntrySize > uint64(len(b)) {
		return nil, fmt.Errorf("ld.so.cache claims %d entries, more than its %d bytes hold", n, len(b))
	}
	str := func(off uint32) (string, error) {
		if uint64(off) >= uint64(len(b)) {
			return "", fmt.Errorf("ld.so.cache string offset %d out of range", off)
		}
		end := bytes.IndexByte(b[off:], 0)
		if end < 0 {
			return "", fmt.Errorf("ld.so.cache string at %d is not terminated", off)
		}
		return string(b[off : int(off)+end]), nil
	}
	out := map[string][]string{}
	for i := range n {
		e := b[ldCacheHeaderSize+int(i)*ldCacheEntrySize:]
		if hwcap := le.Uint64(e[16:]); hwcap != 0 {
			continue
		}
		key, err := str(le.Uint32(e[4:]))
		if err != nil {
			return nil, err
		}
		value, err := str(le.Uint32(e[8:]))
		if err != nil {
			return nil, err
		}
		if key == "" || value == "" {
			continue
		}
		out[key] = append(out[key], value)
	}
	return out, nil
}
