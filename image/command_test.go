package image

import (
	"slices"
	"strings"
	"testing"

	"github.com/hyphae-run/hyphae/errcode"
)

func TestSplitCommand(t *testing.T) {
	tests := []struct {
		in   string
		want []string
		code errcode.Code
	}{
		{in: "node server.js", want: []string{"node", "server.js"}},
		{in: "  a \t b\n c  ", want: []string{"a", "b", "c"}},
		{in: `sh -c 'echo "$HOME" && exit 3'`, want: []string{"sh", "-c", `echo "$HOME" && exit 3`}},
		{in: `printf "a\"b\\c\d"`, want: []string{"printf", `a"b\c\d`}},
		{in: `a\ b c`, want: []string{"a b", "c"}},
		{in: `prog "" '' x`, want: []string{"prog", "", "", "x"}},
		{in: `prog ""`, want: []string{"prog", ""}},
		{in: "a\\\nb", want: []string{"ab"}},
		{in: `pre"mid"'post'`, want: []string{"premidpost"}},
		{in: "héllo wörld", want: []string{"héllo", "wörld"}},
		{in: `"unterminated`, code: errcode.InvalidArgument},
		{in: `'unterminated`, code: errcode.InvalidArgument},
		{in: `trailing\`, code: errcode.InvalidArgument},
		{in: "   ", code: errcode.NoEntrypoint},
		{in: `"" arg`, code: errcode.NoEntrypoint},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := SplitCommand(tt.in)
			if tt.code != "" {
				if !errcode.HasCode(err, tt.code) {
					t.Fatalf("SplitCommand(%q) = %q, %v; want %s", tt.in, got, err, tt.code)
				}
				return
			}
			if err != nil || !slices.Equal(got, tt.want) {
				t.Fatalf("SplitCommand(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
			}
		})
	}
}

// FuzzSplitCommand checks that quoting any argv with single quotes splits
// back to the same argv, and that no input makes SplitCommand panic or
// return an empty program name.
func FuzzSplitCommand(f *testing.F) {
	f.Add("node server.js", "a'b")
	f.Add(`sh -c "x y"`, "")
	f.Add(`\`, "\n")
	f.Fuzz(func(t *testing.T, line, arg string) {
		if argv, err := SplitCommand(line); err == nil && (len(argv) == 0 || argv[0] == "") {
			t.Fatalf("SplitCommand(%q) = %q without an error", line, argv)
		}
		want := []string{"prog", arg}
		quoted := "prog '" + strings.ReplaceAll(arg, "'", `'\''`) + "'"
		got, err := SplitCommand(quoted)
		if err != nil || !slices.Equal(got, want) {
			t.Fatalf("SplitCommand(%q) = %q, %v; want %q", quoted, got, err, want)
		}
	})
}
