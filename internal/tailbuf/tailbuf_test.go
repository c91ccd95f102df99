package tailbuf

import (
	"strings"
	"sync"
	"testing"
)

func TestBuffer(t *testing.T) {
	tests := []struct {
		name       string
		max        int
		writes     []string
		str, lines string
	}{
		{"fits", 16, []string{"a\n", "b\n"}, "a\nb\n", "a\nb"},
		{"cut mid-line", 8, []string{"first\nsecond\nthird\n"}, "d\nthird\n", "third"},
		{"cut in later write", 6, []string{"abc\n", "defg\n"}, "\ndefg\n", "defg"},
		{"cut without newline", 4, []string{"abcdefgh"}, "efgh", "efgh"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := New(tt.max)
			for _, w := range tt.writes {
				if n, err := b.Write([]byte(w)); n != len(w) || err != nil {
					t.Fatalf("Write = %d, %v", n, err)
				}
			}
			if got := b.String(); got != tt.str {
				t.Errorf("String() = %q, want %q", got, tt.str)
			}
			if got := b.Lines(); got != tt.lines {
				t.Errorf("Lines() = %q, want %q", got, tt.lines)
			}
		})
	}
}

func TestBufferConcurrent(t *testing.T) {
	b := New(100)
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 1000 {
				b.Write([]byte("0123456789"))
			}
		})
	}
	wg.Wait()
	if got := b.String(); got != strings.Repeat("0123456789", 10) {
		t.Fatalf("String() = %q", got)
	}
}
