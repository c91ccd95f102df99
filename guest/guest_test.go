package guest

import (
	"slices"
	"strings"
	"testing"

	"github.com/hyphae-run/hyphae/errcode"
)

func TestEntrypointRoundTrip(t *testing.T) {
	tests := []struct {
		name    string
		argv    []string
		encoded string
	}{
		{"single", []string{"/app"}, "/app\x00"},
		{"args", []string{"node", "/app/index.js", "--port=80"}, "node\x00/app/index.js\x00--port=80\x00"},
		{"empty middle argument kept", []string{"sh", "", "x"}, "sh\x00\x00x\x00"},
		{"trailing empty argument kept", []string{"sh", ""}, "sh\x00\x00"},
		{"spaces and newlines are plain bytes", []string{"a b", "c\nd"}, "a b\x00c\nd\x00"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			enc, err := EncodeEntrypoint(tt.argv)
			if err != nil {
				t.Fatal(err)
			}
			if string(enc) != tt.encoded {
				t.Fatalf("encoded %q, want %q", enc, tt.encoded)
			}
			got, err := DecodeEntrypoint(enc)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, tt.argv) {
				t.Fatalf("decoded %q, want %q", got, tt.argv)
			}
		})
	}
}

func TestDecodeEntrypoint(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want []string
		code errcode.Code
	}{
		{"without trailing NUL", "/bin/app\x00-v", []string{"/bin/app", "-v"}, ""},
		{"only one trailing NUL dropped", "/bin/app\x00\x00", []string{"/bin/app", ""}, ""},
		{"empty file", "", nil, errcode.NoEntrypoint},
		{"only a NUL", "\x00", nil, errcode.NoEntrypoint},
		{"empty program name", "\x00arg\x00", nil, errcode.NoEntrypoint},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := DecodeEntrypoint([]byte(tt.in))
			if tt.code != "" {
				if !errcode.HasCode(err, tt.code) {
					t.Fatalf("err = %v, want code %s", err, tt.code)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, tt.want) {
				t.Fatalf("got %q, want %q", got, tt.want)
			}
		})
	}
}

func TestEncodeEntrypointRefuses(t *testing.T) {
	tests := []struct {
		name string
		argv []string
		code errcode.Code
	}{
		{"nil", nil, errcode.NoEntrypoint},
		{"empty program", []string{"", "x"}, errcode.NoEntrypoint},
		{"NUL in argument", []string{"a", "b\x00c"}, errcode.InvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := EncodeEntrypoint(tt.argv); !errcode.HasCode(err, tt.code) {
				t.Fatalf("err = %v, want code %s", err, tt.code)
			}
		})
	}
}

func TestParseEnvVar(t *testing.T) {
	tests := []struct {
		in      string
		want    EnvVar
		invalid bool
	}{
		{in: "A=b", want: EnvVar{"A", "b"}},
		{in: "A=", want: EnvVar{"A", ""}},
		{in: "A=b=c", want: EnvVar{"A", "b=c"}},
		{in: "A=multi\nline", want: EnvVar{"A", "multi\nline"}},
		{in: "noequals", invalid: true},
		{in: "=value", invalid: true},
		{in: "A\x00=b", invalid: true},
		{in: "A\n=b", invalid: true},
		{in: "A=b\x00", invalid: true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := ParseEnvVar(tt.in)
			if tt.invalid {
				if !errcode.HasCode(err, errcode.InvalidEnv) {
					t.Fatalf("err = %v, want %s", err, errcode.InvalidEnv)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("got %+v, %v; want %+v", got, err, tt.want)
			}
		})
	}
}

func TestDecodeEnvFile(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    []EnvVar
		invalid bool
	}{
		{name: "empty", in: "", want: nil},
		{name: "lines", in: "A=1\nB=two words\n", want: []EnvVar{{"A", "1"}, {"B", "two words"}}},
		{name: "no final newline", in: "A=1", want: []EnvVar{{"A", "1"}}},
		{name: "blank lines skipped", in: "\nA=1\n\n\nB=\n", want: []EnvVar{{"A", "1"}, {"B", ""}}},
		{name: "CRLF", in: "A=1\r\nB=2\r\n", want: []EnvVar{{"A", "1"}, {"B", "2"}}},
		{name: "first equals splits", in: "URL=a=b&c=d\n", want: []EnvVar{{"URL", "a=b&c=d"}}},
		{name: "duplicates kept in order", in: "A=1\nA=2\n", want: []EnvVar{{"A", "1"}, {"A", "2"}}},
		{name: "line without equals", in: "A=1\nbogus\n", invalid: true},
		{name: "empty key", in: "=1\n", invalid: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := DecodeEnvFile([]byte(tt.in))
			if tt.invalid {
				if !errcode.HasCode(err, errcode.InvalidEnv) {
					t.Fatalf("err = %v, want %s", err, errcode.InvalidEnv)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, tt.want) {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestEncodeEnvFile(t *testing.T) {
	tests := []struct {
		name    string
		vars    []EnvVar
		want    string
		invalid bool
	}{
		{name: "two", vars: []EnvVar{{"A", "1"}, {"B", "x=y"}}, want: "A=1\nB=x=y\n"},
		{name: "none", vars: nil, want: ""},
		{name: "newline in value", vars: []EnvVar{{"A", "1\n2"}}, invalid: true},
		{name: "trailing CR in value", vars: []EnvVar{{"A", "1\r"}}, invalid: true},
		{name: "empty key", vars: []EnvVar{{"", "1"}}, invalid: true},
		{name: "equals in key", vars: []EnvVar{{"A=B", "1"}}, invalid: true},
		{name: "NUL in value", vars: []EnvVar{{"A", "\x00"}}, invalid: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := EncodeEnvFile(tt.vars)
			if tt.invalid {
				if !errcode.HasCode(err, errcode.InvalidEnv) {
					t.Fatalf("err = %v, want %s", err, errcode.InvalidEnv)
				}
				return
			}
			if err != nil || string(got) != tt.want {
				t.Fatalf("got %q, %v; want %q", got, err, tt.want)
			}
			back, err := DecodeEnvFile(got)
			if err != nil || !slices.Equal(back, tt.vars) {
				t.Fatalf("round trip gave %+v, %v", back, err)
			}
		})
	}
}

func TestMergeEnv(t *testing.T) {
	tests := []struct {
		name   string
		layers [][]EnvVar
		want   []EnvVar
	}{
		{name: "none", want: nil},
		{
			name:   "later layer wins, first position kept",
			layers: [][]EnvVar{{{"PATH", "/bin"}, {"A", "file"}}, {{"B", "cmd"}, {"A", "cmd"}}},
			want:   []EnvVar{{"PATH", "/bin"}, {"A", "cmd"}, {"B", "cmd"}},
		},
		{
			name:   "duplicate within a layer: last wins",
			layers: [][]EnvVar{{{"A", "1"}, {"A", "2"}}},
			want:   []EnvVar{{"A", "2"}},
		},
		{
			name:   "three layers",
			layers: [][]EnvVar{{{"HOME", "/root"}}, {{"HOME", "/app"}}, {{"HOME", "/srv"}}},
			want:   []EnvVar{{"HOME", "/srv"}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := MergeEnv(tt.layers...); !slices.Equal(got, tt.want) {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestMergeEnvDoesNotAliasInput(t *testing.T) {
	base := []EnvVar{{"A", "1"}}
	MergeEnv(base, []EnvVar{{"A", "2"}})
	if base[0].Value != "1" {
		t.Fatalf("MergeEnv changed its input: %+v", base)
	}
}

func TestCmdlineEnv(t *testing.T) {
	tests := []struct {
		name    string
		vars    []EnvVar
		encoded string
	}{
		{"plain", []EnvVar{{"A", "1"}}, "hyphae.env.A=1"},
		{"sorted by key", []EnvVar{{"B", "2"}, {"A", "1"}}, "hyphae.env.A=1 hyphae.env.B=2"},
		{"space and percent", []EnvVar{{"MSG", "50% off now"}}, "hyphae.env.MSG=50%25%20off%20now"},
		{"equals in key escaped, in value kept", []EnvVar{{"K=1", "v=2"}}, "hyphae.env.K%3D1=v=2"},
		{"newline, tab, quote", []EnvVar{{"X", "a\nb\t\"c\""}}, "hyphae.env.X=a%0Ab%09%22c%22"},
		{"non-ASCII escaped", []EnvVar{{"NAME", "zoë\u00a0x"}}, "hyphae.env.NAME=zo%C3%AB%C2%A0x"},
		{"empty value", []EnvVar{{"E", ""}}, "hyphae.env.E="},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			enc := EncodeCmdlineEnv(tt.vars)
			if enc != tt.encoded {
				t.Fatalf("encoded %q, want %q", enc, tt.encoded)
			}
			got := ParseCmdlineEnv("console=ttyS0 reboot=k " + enc + " panic=-1")
			want := slices.Clone(tt.vars)
			slices.SortStableFunc(want, func(a, b EnvVar) int { return strings.Compare(a.Key, b.Key) })
			if !slices.Equal(got, want) {
				t.Fatalf("parsed %+v, want %+v", got, want)
			}
		})
	}
}

func TestParseCmdlineEnv(t *testing.T) {
	tests := []struct {
		name    string
		cmdline string
		want    []EnvVar
	}{
		{"none", "console=ttyS0 root=/dev/vda", nil},
		{"order kept", "hyphae.env.B=2 x hyphae.env.A=1", []EnvVar{{"B", "2"}, {"A", "1"}}},
		{"no equals means empty value", "hyphae.env.FLAG", []EnvVar{{"FLAG", ""}}},
		{"empty key skipped", "hyphae.env.=x hyphae.env.%=y", []EnvVar{{"%", "y"}}},
		{"bad escapes kept literally", "hyphae.env.P=100%zz%4", []EnvVar{{"P", "100%zz%4"}}},
		{"lower-case hex", "hyphae.env.S=a%2fb", []EnvVar{{"S", "a/b"}}},
		{"tabs and newlines separate", "a\thyphae.env.A=1\nhyphae.env.B=2\n", []EnvVar{{"A", "1"}, {"B", "2"}}},
		{"raw UTF-8 space is not a separator", "hyphae.env.A=x\u0085y", []EnvVar{{"A", "x\u0085y"}}},
		{"prefix must start the token", "xhyphae.env.A=1", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := ParseCmdlineEnv(tt.cmdline); !slices.Equal(got, tt.want) {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestCmdlineValue(t *testing.T) {
	const cmdline = "console=ttyS0 hyphae.overlay=tmpfs hyphae.channel=vsock:1024 hyphae.overlay=/dev/vdb quiet"
	tests := []struct {
		key   string
		want  string
		found bool
	}{
		{CmdlineOverlay, "tmpfs", true},
		{CmdlineChannel, "vsock:1024", true},
		{"console", "ttyS0", true},
		{"quiet", "", false},
		{"hyphae", "", false},
	}
	for _, tt := range tests {
		t.Run(tt.key, func(t *testing.T) {
			got, ok := CmdlineValue(cmdline, tt.key)
			if got != tt.want || ok != tt.found {
				t.Fatalf("got %q, %v; want %q, %v", got, ok, tt.want, tt.found)
			}
		})
	}
}

func TestResolvConf(t *testing.T) {
	tests := []struct{ in, want string }{
		{"192.0.2.53", "nameserver 192.0.2.53\n"},
		{"192.0.2.53,2001:db8::1", "nameserver 192.0.2.53\nnameserver 2001:db8::1\n"},
		{"192.0.2.53,options%20ndots:9,evil\nsearch x", "nameserver 192.0.2.53\n"},
		{"", ""},
	}
	for _, tt := range tests {
		if got := string(ResolvConf(tt.in)); got != tt.want {
			t.Errorf("ResolvConf(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}
