package project

import (
	"encoding/binary"
	"os"
	"slices"
	"testing"
)

type cacheEntry struct {
	key, value string
	hwcap      uint64
}

// buildLDCache writes a cache in the glibc-ld.so.cache1.1 format, strings
// after the entries, as ldconfig does.
func buildLDCache(entries []cacheEntry) []byte {
	le := binary.LittleEndian
	strBase := ldCacheHeaderSize + len(entries)*ldCacheEntrySize
	var strs []byte
	add := func(s string) uint32 {
		off := uint32(strBase + len(strs))
		strs = append(append(strs, s...), 0)
		return off
	}
	b := make([]byte, strBase)
	copy(b, ldCacheMagic)
	le.PutUint32(b[20:], uint32(len(entries)))
	for i, e := range entries {
		p := b[ldCacheHeaderSize+i*ldCacheEntrySize:]
		le.PutUint32(p[0:], 0x0303)
		le.PutUint32(p[4:], add(e.key))
		le.PutUint32(p[8:], add(e.value))
		le.PutUint64(p[16:], e.hwcap)
	}
	le.PutUint32(b[24:], uint32(len(strs)))
	return append(b, strs...)
}

func TestParseLDCache(t *testing.T) {
	b := buildLDCache([]cacheEntry{
		{"libfoo.so.1", "/usr/lib/x86_64-linux-gnu/glibc-hwcaps/x86-64-v3/libfoo.so.1", 1 << 62},
		{"libfoo.so.1", "/usr/lib/x86_64-linux-gnu/libfoo.so.1", 0},
		{"libfoo.so.1", "/opt/lib/libfoo.so.1", 0},
		{"libbar.so", "/usr/local/lib/libbar.so", 0},
	})
	got, err := parseLDCache(b)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"/usr/lib/x86_64-linux-gnu/libfoo.so.1", "/opt/lib/libfoo.so.1"}; !slices.Equal(got["libfoo.so.1"], want) {
		t.Errorf("libfoo.so.1 → %q, want %q (hwcaps entry skipped, order kept)", got["libfoo.so.1"], want)
	}
	if want := []string{"/usr/local/lib/libbar.so"}; !slices.Equal(got["libbar.so"], want) {
		t.Errorf("libbar.so → %q, want %q", got["libbar.so"], want)
	}

	bad := map[string][]byte{
		"empty":      nil,
		"old format": append([]byte("ld.so-1.7.0\x00"), make([]byte, 64)...),
		"truncated":  b[:ldCacheHeaderSize+10],
		"string past end": func() []byte {
			c := slices.Clone(b)
			binary.LittleEndian.PutUint32(c[ldCacheHeaderSize+ldCacheEntrySize+4:], 1<<30)
			return c
		}(),
		"unterminated":     b[:len(b)-1],
		"too many entries": func() []byte { c := slices.Clone(b); binary.LittleEndian.PutUint32(c[20:], 1<<31); return c }(),
	}
	for name, data := range bad {
		if _, err := parseLDCache(data); err == nil {
			t.Errorf("%s: parsed without error", name)
		}
	}
}

// TestParseHostLDCache reads this machine's real cache, which must know
// where libc is.
func TestParseHostLDCache(t *testing.T) {
	b, err := os.ReadFile(ldCachePath)
	if err != nil {
		t.Skipf("no %s on this host: %v", ldCachePath, err)
	}
	got, err := parseLDCache(b)
	if err != nil {
		t.Fatal(err)
	}
	paths := got["libc.so.6"]
	if len(paths) == 0 {
		t.Fatalf("libc.so.6 not in %s (%d sonames parsed)", ldCachePath, len(got))
	}
	for _, p := range paths {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("cache lists %s for libc.so.6: %v", p, err)
		}
	}
}

func FuzzParseLDCache(f *testing.F) {
	f.Add(buildLDCache([]cacheEntry{{"libc.so.6", "/lib/x86_64-linux-gnu/libc.so.6", 0}}))
	f.Add(buildLDCache(nil))
	f.Add([]byte(ldCacheMagic))
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := parseLDCache(data)
		if err != nil {
			return
		}
		for k, vs := range m {
			if k == "" || len(vs) == 0 {
				t.Fatalf("empty key or no paths: %q → %q", k, vs)
			}
			for _, v := range vs {
				if v == "" {
					t.Fatalf("empty path for %q", k)
				}
			}
		}
	})
}
