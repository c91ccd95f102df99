package errcode

import (
	"errors"
	"fmt"
	"io/fs"
	"testing"
)

func TestErrorRenderingAndMatching(t *testing.T) {
	cause := fs.ErrNotExist
	tests := []struct {
		name     string
		err      error
		want     string
		code     Code
		isCause  bool
		hint     string
		matchNew error
	}{
		{
			name:     "plain",
			err:      New(NoProjectMarker, "no project marker found in %s (looked for package.json, Cargo.toml, go.mod)", "./x").WithHint("add a go.mod"),
			want:     "E402: no project marker found in ./x (looked for package.json, Cargo.toml, go.mod)",
			code:     NoProjectMarker,
			hint:     "add a go.mod",
			matchNew: New(NoProjectMarker, ""),
		},
		{
			name:     "wrapped cause",
			err:      fmt.Errorf("build: %w", Wrap(MkfsFailed, cause, "mkfs.ext4 failed")),
			want:     "build: E407: mkfs.ext4 failed: file does not exist",
			code:     MkfsFailed,
			isCause:  true,
			matchNew: New(MkfsFailed, "other message"),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.err.Error(); got != tt.want {
				t.Errorf("Error() = %q, want %q", got, tt.want)
			}
			if got := CodeOf(tt.err); got != tt.code {
				t.Errorf("CodeOf = %q, want %q", got, tt.code)
			}
			if !HasCode(tt.err, tt.code) || HasCode(tt.err, InvalidSpec) {
				t.Errorf("HasCode wrong for %v", tt.err)
			}
			if got := errors.Is(tt.err, cause); got != tt.isCause {
				t.Errorf("errors.Is(cause) = %v, want %v", got, tt.isCause)
			}
			if !errors.Is(tt.err, tt.matchNew) {
				t.Errorf("errors.Is(same code) = false")
			}
			if errors.Is(tt.err, New(InvalidSpec, "")) {
				t.Errorf("errors.Is(other code) = true")
			}
			if got := HintOf(tt.err); got != tt.hint {
				t.Errorf("HintOf = %q, want %q", got, tt.hint)
			}
		})
	}
}

func TestWrapNil(t *testing.T) {
	if Wrap(MkfsFailed, nil, "x") != nil {
		t.Fatal("Wrap(nil) must be nil")
	}
}

func TestHasCodeJoined(t *testing.T) {
	err := errors.Join(New(InvalidSpec, "a"), New(InvalidArgument, "b"))
	if !HasCode(err, InvalidArgument) || !HasCode(err, InvalidSpec) || HasCode(err, NotFound) {
		t.Fatal("HasCode must look into joined errors")
	}
}

func TestHintOfJoined(t *testing.T) {
	err := errors.Join(New(InvalidSpec, "a"), fmt.Errorf("b: %w", New(InvalidArgument, "b").WithHint("fix b")))
	if got := HintOf(err); got != "fix b" {
		t.Fatalf("HintOf = %q, want the joined error's hint", got)
	}
}
