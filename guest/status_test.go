package guest

import "testing"

func TestFormatAndParseStatus(t *testing.T) {
	tests := []struct {
		name string
		line string
		want Status
	}{
		{"exit 0", FormatExit(0, 0), Status{ExitCode: 0}},
		{"exit 3", FormatExit(3, 0), Status{ExitCode: 3}},
		{"killed", FormatExit(137, 9), Status{ExitCode: 137, Signal: 9}},
		{"fatal", FormatFatal("E304: cannot read /etc/hyphae/entrypoint"), Status{ExitCode: -1, Fatal: "E304: cannot read /etc/hyphae/entrypoint"}},
		{"fatal newlines flattened", FormatFatal("E304: a\nb\r\nc"), Status{ExitCode: -1, Fatal: "E304: a b  c"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, decorated := range []string{tt.line, tt.line + "\r\n", "[    1.234567] " + tt.line, "\r" + tt.line} {
				got, ok := ParseStatusLine(decorated)
				if !ok || got != tt.want {
					t.Fatalf("ParseStatusLine(%q) = %+v, %v; want %+v", decorated, got, ok, tt.want)
				}
			}
		})
	}
}

func TestFormatExitLines(t *testing.T) {
	tests := []struct {
		code, signal int
		want         string
	}{
		{0, 0, "hyphae-init: exit code=0"},
		{3, 0, "hyphae-init: exit code=3"},
		{137, 9, "hyphae-init: exit code=137 signal=9"},
	}
	for _, tt := range tests {
		if got := FormatExit(tt.code, tt.signal); got != tt.want {
			t.Errorf("FormatExit(%d, %d) = %q, want %q", tt.code, tt.signal, got, tt.want)
		}
	}
}

func TestParseStatusLineRejects(t *testing.T) {
	for _, line := range []string{
		"",
		"hello",
		"hyphae-init: warning something",
		"hyphae-init: exit",
		"hyphae-init: exit signal=9",
		"hyphae-init: exit code=abc",
		"hyphae-init: exit code=1 signal=x",
	} {
		if st, ok := ParseStatusLine(line); ok {
			t.Errorf("ParseStatusLine(%q) = %+v, want not a status line", line, st)
		}
	}
}
