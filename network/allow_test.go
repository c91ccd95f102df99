package network

import (
	"net/netip"
	"testing"

	"github.com/hyphae-run/hyphae/errcode"
)

func TestParseAllow(t *testing.T) {
	tests := []struct {
		in     string
		prefix string
		port   uint16
		err    bool
	}{
		{"10.0.0.0/8:443", "10.0.0.0/8", 443, false},
		{"10.0.0.0/8", "10.0.0.0/8", 0, false},
		{"192.168.1.10:53", "192.168.1.10/32", 53, false},
		{"192.168.1.10", "192.168.1.10/32", 0, false},
		{"0.0.0.0/0:80", "0.0.0.0/0", 80, false},
		{"10.0.0.1/8:443", "", 0, true}, // host bits
		{"10.0.0.0/8:0", "", 0, true},
		{"10.0.0.0/8:65536", "", 0, true},
		{"10.0.0.0/8:+443", "", 0, true},
		{"10.0.0.0/8:0443", "", 0, true},
		{"10.0.0.0/8:", "", 0, true},
		{"10.0.0.0/33", "", 0, true},
		{"fd00::/8", "", 0, true},
		{"::1", "", 0, true},
		{"", "", 0, true},
		{"example.com:443", "", 0, true},
	}
	for _, tt := range tests {
		a, err := ParseAllow(tt.in)
		if tt.err {
			if !errcode.HasCode(err, errcode.InvalidArgument) {
				t.Errorf("ParseAllow(%q) = %v, %v; want E201", tt.in, a, err)
			}
			continue
		}
		if err != nil || a.Prefix != netip.MustParsePrefix(tt.prefix) || a.Port != tt.port {
			t.Errorf("ParseAllow(%q) = %v, %v", tt.in, a, err)
		}
	}
}

func FuzzParseAllow(f *testing.F) {
	for _, s := range []string{"10.0.0.0/8:443", "1.2.3.4", "0.0.0.0/0", "::1", "10.0.0.0/8:", "a:b:c"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		a, err := ParseAllow(s)
		if err != nil {
			if errcode.CodeOf(err) != errcode.InvalidArgument {
				t.Fatalf("uncoded error %v", err)
			}
			return
		}
		if !a.Prefix.Addr().Is4() || a.Prefix.Masked() != a.Prefix {
			t.Fatalf("accepted %q as %v", s, a)
		}
		back, err := ParseAllow(a.String())
		if err != nil || back != a {
			t.Fatalf("round trip %q -> %q -> %v, %v", s, a, back, err)
		}
	})
}
