package cli

import (
	"strings"
	"testing"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/vmm/vmmproc"
)

// TestRunNetworkFlags: malformed --allow entries are usage errors, and
// network settings without --network are refused before anything else.
func TestRunNetworkFlags(t *testing.T) {
	home := t.TempDir()
	t.Setenv(vmmproc.EnvRuntimeDir, t.TempDir())
	for _, tt := range []struct {
		args []string
		exit int
	}{
		{[]string{"--network", "--allow", "10.0.0.1/8"}, ExitUsage},
		{[]string{"--network", "--allow", "10.0.0.0/8:0"}, ExitUsage},
		{[]string{"--network", "--allow", "::1"}, ExitUsage},
		{[]string{"--network", "--allow", ""}, ExitUsage},
		{[]string{"--no-nat"}, ExitError},
		{[]string{"--allow", "10.0.0.0/8:443"}, ExitError},
	} {
		r := hyphae(t, home, nil, append([]string{"run", "no-such-image", "--json"}, tt.args...)...)
		var je jsonError
		r.decode(t, &je)
		if r.code != tt.exit || je.Error.Code != string(errcode.InvalidArgument) {
			t.Errorf("run %v: exit %d, %+v; want exit %d with E201", tt.args, r.code, je.Error, tt.exit)
		}
	}
	r := hyphae(t, home, nil, "run", "--help")
	for _, want := range []string{"--network", "--no-nat", "--allow CIDR[:PORT]", "--jail", EnvNetPool, "hyphae-fc"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("run --help lacks %q", want)
		}
	}
}

func TestReleaseOf(t *testing.T) {
	for _, tt := range []struct{ line, want string }{
		{"Jailer v1.16.1", "v1.16.1"},
		{"Firecracker v1.16.1", "v1.16.1"},
		{"Firecracker v1.17.0-dev", "v1.17.0-dev"},
		{"version unknown", "version unknown"},
		{"", ""},
	} {
		if got := releaseOf(tt.line); got != tt.want {
			t.Errorf("releaseOf(%q) = %q, want %q", tt.line, got, tt.want)
		}
	}
}
