package guest

import (
	"bytes"
	"slices"
	"strings"
	"testing"
)

// FuzzDecodeEntrypoint checks that whatever DecodeEntrypoint accepts
// encodes back to the same bytes (up to the optional trailing NUL) and
// decodes to the same argv again.
func FuzzDecodeEntrypoint(f *testing.F) {
	for _, s := range []string{"/app\x00", "sh\x00-c\x00echo hi\x00", "a\x00\x00", "a", "", "\x00", "\x00x"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		argv, err := DecodeEntrypoint(b)
		if err != nil {
			return
		}
		enc, err := EncodeEntrypoint(argv)
		if err != nil {
			t.Fatalf("decoded %q but cannot encode it: %v", argv, err)
		}
		if !bytes.Equal(enc, b) && !bytes.Equal(enc, append(slices.Clone(b), 0)) {
			t.Fatalf("input %q re-encoded as %q", b, enc)
		}
		back, err := DecodeEntrypoint(enc)
		if err != nil || !slices.Equal(back, argv) {
			t.Fatalf("round trip of %q gave %q, %v", argv, back, err)
		}
	})
}

// FuzzDecodeEnvFile checks that DecodeEnvFile never panics, that every
// variable it returns is valid, and that Encode then Decode gives back the
// input, both for decoded files and for a variable built from the fuzzer's
// key and value.
func FuzzDecodeEnvFile(f *testing.F) {
	f.Add([]byte("A=1\nB=2\n"), "KEY", "value")
	f.Add([]byte("A=1\r\n\r\nB=x=y"), "K", "a=b")
	f.Add([]byte("=bad\n"), "K", "v\r")
	f.Add([]byte("A=\x00"), "K\n", "v\n")
	f.Fuzz(func(t *testing.T, b []byte, key, value string) {
		if vars, err := DecodeEnvFile(b); err == nil {
			for _, v := range vars {
				if _, err := ParseEnvVar(v.String()); err != nil {
					t.Fatalf("decoded invalid variable %+v: %v", v, err)
				}
			}
			roundTripEnvFile(t, vars)
		}
		roundTripEnvFile(t, []EnvVar{{Key: key, Value: value}})
	})
}

func roundTripEnvFile(t *testing.T, vars []EnvVar) {
	t.Helper()
	enc, err := EncodeEnvFile(vars)
	if err != nil {
		return
	}
	back, err := DecodeEnvFile(enc)
	if err != nil {
		t.Fatalf("encoded %+v as %q, which does not decode: %v", vars, enc, err)
	}
	if !slices.Equal(back, vars) {
		t.Fatalf("round trip of %+v gave %+v (encoded %q)", vars, back, enc)
	}
}

// FuzzParseCmdlineEnv checks that EncodeCmdlineEnv then ParseCmdlineEnv
// gives back the variables, even among other tokens, and that whatever
// ParseCmdlineEnv extracts from an arbitrary command line survives another
// round trip.
func FuzzParseCmdlineEnv(f *testing.F) {
	f.Add("console=ttyS0 hyphae.env.A=1", "KEY", "a value with spaces")
	f.Add("hyphae.env.%41=%zz hyphae.env.=x", "K=V", "100%\n\"q\"")
	f.Add("\x85 hyphae.env.Z=\u00a0", "é", "\u0085\u00a0")
	f.Fuzz(func(t *testing.T, cmdline, key, value string) {
		parsed := ParseCmdlineEnv(cmdline)
		for _, v := range parsed {
			if v.Key == "" {
				t.Fatalf("parsed an empty key from %q", cmdline)
			}
		}
		sorted := slices.Clone(parsed)
		slices.SortStableFunc(sorted, func(a, b EnvVar) int { return strings.Compare(a.Key, b.Key) })
		if back := ParseCmdlineEnv(EncodeCmdlineEnv(parsed)); !slices.Equal(back, sorted) {
			t.Fatalf("re-encoding %+v gave %+v", sorted, back)
		}
		if key == "" {
			return
		}
		vars := []EnvVar{{Key: key, Value: value}}
		enc := EncodeCmdlineEnv(vars)
		if strings.ContainsAny(enc, " \t\n\r\"") {
			t.Fatalf("token %q holds a separator or quote", enc)
		}
		for _, line := range []string{enc, "console=ttyS0 " + enc + " quiet", "\t" + enc + "\n"} {
			if got := ParseCmdlineEnv(line); !slices.Equal(got, vars) {
				t.Fatalf("ParseCmdlineEnv(%q) = %+v, want %+v", line, got, vars)
			}
		}
	})
}
