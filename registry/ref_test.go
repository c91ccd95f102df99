package registry

import (
	"strings"
	"testing"

	"github.com/hyphae-run/hyphae/errcode"
)

func TestParseRef(t *testing.T) {
	hex64 := strings.Repeat("ab", 32)
	tests := []struct {
		in      string
		want    Ref
		wantErr errcode.Code
	}{
		{in: "hello", want: Ref{Name: "hello", Tag: "latest"}},
		{in: "hello:v1.2", want: Ref{Name: "hello", Tag: "v1.2"}},
		{in: "my-app_2.x:V_1-rc", want: Ref{Name: "my-app_2.x", Tag: "V_1-rc"}},
		{in: "sha256:" + hex64, want: Ref{Digest: "sha256:" + hex64}},
		{in: "abcdef012345", want: Ref{Name: "abcdef012345", Tag: "latest", HexPrefix: "abcdef012345"}},
		{in: hex64, want: Ref{Name: hex64, Tag: "latest", HexPrefix: hex64}},
		{in: "abcdef01234", want: Ref{Name: "abcdef01234", Tag: "latest"}},                     // too short to be a prefix
		{in: "abcdef012345:latest", want: Ref{Name: "abcdef012345", Tag: "latest"}},            // explicit tag: a name only
		{in: strings.Repeat("a", 65), want: Ref{Name: strings.Repeat("a", 65), Tag: "latest"}}, // longer than a digest
		{in: "", wantErr: errcode.InvalidName},
		{in: ":tag", wantErr: errcode.InvalidName},
		{in: "name:", wantErr: errcode.InvalidName},
		{in: "Hello", wantErr: errcode.InvalidName},
		{in: "-x", wantErr: errcode.InvalidName},
		{in: "a/b", wantErr: errcode.InvalidName},
		{in: "a:b:c", wantErr: errcode.InvalidName},
		{in: "a:.hidden", wantErr: errcode.InvalidName},
		{in: "a b", wantErr: errcode.InvalidName},
		{in: "../etc", wantErr: errcode.InvalidName},
		{in: strings.Repeat("a", 129), wantErr: errcode.InvalidName},
		{in: "sha256:" + hex64[:63], wantErr: errcode.InvalidName},
		{in: "sha256:" + strings.ToUpper(hex64), wantErr: errcode.InvalidName},
		{in: "sha256:", wantErr: errcode.InvalidName},
		{in: "sha256", wantErr: errcode.InvalidName}, // reserved: sha256:latest would read as a digest
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := ParseRef(tt.in)
			if tt.wantErr != "" {
				if !errcode.HasCode(err, tt.wantErr) {
					t.Fatalf("ParseRef(%q) error = %v, want code %s", tt.in, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseRef(%q): %v", tt.in, err)
			}
			if got != tt.want {
				t.Fatalf("ParseRef(%q) = %+v, want %+v", tt.in, got, tt.want)
			}
		})
	}
}

// FuzzParseRef checks that any accepted reference is well formed and
// survives a round trip through String.
func FuzzParseRef(f *testing.F) {
	for _, s := range []string{"hello", "a:b", "sha256:" + strings.Repeat("0", 64), "0123456789ab", "x:", ":", "A", "a:b:c"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ref, err := ParseRef(s)
		if err != nil {
			if errcode.CodeOf(err) != errcode.InvalidName {
				t.Fatalf("ParseRef(%q) error without E204: %v", s, err)
			}
			return
		}
		if (ref.Digest == "") == (ref.Name == "") {
			t.Fatalf("ParseRef(%q) = %+v: exactly one of digest and name must be set", s, ref)
		}
		if ref.Digest != "" {
			if ValidateDigest(ref.Digest) != nil {
				t.Fatalf("ParseRef(%q) accepted bad digest %q", s, ref.Digest)
			}
		} else if ValidateName(ref.Name) != nil || ValidateTag(ref.Tag) != nil {
			t.Fatalf("ParseRef(%q) accepted bad name or tag %+v", s, ref)
		}
		if strings.ContainsAny(ref.Name+ref.Tag, "/\x00 \n") {
			t.Fatalf("ParseRef(%q) = %+v holds a path or control character", s, ref)
		}
		again, err := ParseRef(ref.String())
		if err != nil || again.Name != ref.Name || again.Tag != ref.Tag || again.Digest != ref.Digest {
			t.Fatalf("round trip of %q: %+v → %q → %+v, %v", s, ref, ref.String(), again, err)
		}
	})
}
