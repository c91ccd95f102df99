package firecracker

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
	"github.com/hyphae-run/hyphae/vmm"
	"github.com/hyphae-run/hyphae/vmm/firecracker/internal/fcspec"
)

var update = flag.Bool("update", false, "rewrite the golden files under testdata/")

// goldenOpts are fixed paths, so that the golden files do not depend on
// where the test runs.
var goldenOpts = ConfigOptions{
	ScratchPath: "/run/hyphae/vm-1/scratch.ext4",
	VsockPath:   "/run/hyphae/vm-1/vsock.sock",
}

func baseSpec() vmm.Spec {
	return vmm.Spec{
		ID:        "vm-1",
		VCPUs:     1,
		MemoryMiB: 128,
		Kernel:    "/var/lib/hyphae/kernels/vmlinux",
		Drives:    []vmm.Drive{{ID: "rootfs", Path: "/var/lib/hyphae/images/ab12.ext4", Root: true}},
	}
}

func configCases() []struct {
	name string
	spec vmm.Spec
	opts ConfigOptions
} {
	one := baseSpec()

	two := baseSpec()
	two.VCPUs, two.MemoryMiB = 2, 512
	two.BootArgs = "hyphae.env.GREETING=hi quiet"

	nics := baseSpec()
	nics.Network = []vmm.NetworkInterface{
		{ID: "eth0", TapName: "hyt0", MAC: "06:00:c0:a8:00:02"},
		{ID: "eth1", TapName: "hyt1"},
	}
	nics.VsockCID = 42

	drives := baseSpec()
	drives.VCPUs = 4
	// A spec may ask for a writable root: it is attached read-only anyway.
	drives.Drives[0].ReadOnly = false
	drives.Drives = append(drives.Drives,
		vmm.Drive{ID: "data", Path: "/srv/data.ext4"},
		vmm.Drive{ID: "ref_data", Path: "/srv/ref.ext4", ReadOnly: true},
	)
	drives.ChannelPort = 2048

	logged := baseSpec()
	logOpts := goldenOpts
	logOpts.LogPath = "/run/hyphae/vm-1/firecracker.log"

	return []struct {
		name string
		spec vmm.Spec
		opts ConfigOptions
	}{
		{"1vcpu", one, goldenOpts},
		{"2vcpus", two, goldenOpts},
		{"nics", nics, goldenOpts},
		{"extra-drives", drives, goldenOpts},
		{"logger", logged, logOpts},
	}
}

func loadSpecs(t *testing.T) []*fcspec.Spec {
	t.Helper()
	specs, err := fcspec.LoadAll()
	if err != nil {
		t.Fatal(err)
	}
	return specs
}

func TestBuildConfigGolden(t *testing.T) {
	for _, c := range configCases() {
		t.Run(c.name, func(t *testing.T) {
			cfg, err := BuildConfig(c.spec, c.opts)
			if err != nil {
				t.Fatal(err)
			}
			got, err := json.MarshalIndent(cfg, "", "  ")
			if err != nil {
				t.Fatal(err)
			}
			got = append(got, '\n')
			path := filepath.Join("testdata", c.name+".json")
			if *update {
				if err := os.WriteFile(path, got, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run go test -update to create it)", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("config differs from %s (run go test -update after checking the change):\n%s", path, got)
			}
		})
	}
}

// TestConfigMatchesSpec validates every generated document and API body
// against both Firecracker API descriptions.
func TestConfigMatchesSpec(t *testing.T) {
	specs := loadSpecs(t)
	for _, c := range configCases() {
		cfg, err := BuildConfig(c.spec, c.opts)
		if err != nil {
			t.Fatal(err)
		}
		doc, err := json.Marshal(cfg)
		if err != nil {
			t.Fatal(err)
		}
		var top map[string]json.RawMessage
		if err := json.Unmarshal(doc, &top); err != nil {
			t.Fatal(err)
		}
		for _, s := range specs {
			// Firecracker ignores unknown top-level keys, so a typo would
			// silently drop a device: check each key is one it reads.
			known := s.ConfigFileKeys()
			for k := range top {
				if !slices.Contains(known, k) {
					t.Errorf("%s/%s: top-level key %q is not one of %v", c.name, s.Name, k, known)
				}
			}
			if err := s.ValidateConfigFile(doc); err != nil {
				t.Errorf("%s/%s: config file: %v", c.name, s.Name, err)
			}
			for _, r := range cfg.Requests() {
				body, err := json.Marshal(r.Body)
				if err != nil {
					t.Fatal(err)
				}
				if err := s.ValidateRequest(r.Method, r.Path, body); err != nil {
					t.Errorf("%s/%s: %v", c.name, s.Name, err)
				}
			}
			for _, a := range []string{ActionInstanceStart, ActionSendCtrlAltDel} {
				body, _ := json.Marshal(InstanceAction{ActionType: a})
				if err := s.ValidateRequest("PUT", "/actions", body); err != nil {
					t.Errorf("%s: %v", s.Name, err)
				}
			}
		}
	}
}

func TestBuildConfigLayout(t *testing.T) {
	spec := baseSpec()
	spec.Drives = append(spec.Drives, vmm.Drive{ID: "data", Path: "/d"})
	// The root listed last must still come first.
	spec.Drives[0], spec.Drives[1] = spec.Drives[1], spec.Drives[0]
	spec.BootArgs = "  extra=1\tquiet "
	cfg, err := BuildConfig(spec, goldenOpts)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, d := range cfg.Drives {
		ids = append(ids, d.DriveID)
	}
	if want := []string{"rootfs", ScratchDriveID, "data"}; !slices.Equal(ids, want) {
		t.Errorf("drive order %v, want %v", ids, want)
	}
	if !cfg.Drives[0].IsReadOnly || !cfg.Drives[0].IsRootDevice || cfg.Drives[1].IsReadOnly || cfg.Drives[1].PathOnHost != goldenOpts.ScratchPath {
		t.Errorf("root must be read-only and the scratch layer writable: %+v", cfg.Drives[:2])
	}
	args := cfg.BootSource.BootArgs
	for _, want := range []string{"console=ttyS0", "reboot=k", "ro", "hyphae.channel=vsock:1024", "extra=1", "quiet"} {
		if !slices.Contains(strings.Fields(args), want) {
			t.Errorf("boot args %q lack %q", args, want)
		}
	}
	if v, _ := guest.CmdlineValue(args, guest.CmdlineOverlay); v != "/dev/vdb" {
		t.Errorf("overlay device %q, want /dev/vdb", v)
	}
	if strings.Contains(args, "  ") || strings.ContainsAny(args, "\t") {
		t.Errorf("boot args %q not normalised", args)
	}
	if cfg.Vsock.GuestCID != DefaultVsockCID || cfg.Vsock.UDSPath != goldenOpts.VsockPath {
		t.Errorf("vsock %+v", cfg.Vsock)
	}
}

func TestBuildConfigRejects(t *testing.T) {
	cases := []struct {
		name string
		edit func(*vmm.Spec, *ConfigOptions)
		// want is how many problems must be reported together.
		want int
	}{
		{"id with a slash", func(s *vmm.Spec, _ *ConfigOptions) { s.ID = "a/b" }, 1},
		{"id too long", func(s *vmm.Spec, _ *ConfigOptions) { s.ID = strings.Repeat("a", 65) }, 1},
		{"no id", func(s *vmm.Spec, _ *ConfigOptions) { s.ID = "" }, 1},
		{"reserved drive id", func(s *vmm.Spec, _ *ConfigOptions) {
			s.Drives = append(s.Drives, vmm.Drive{ID: ScratchDriveID, Path: "/x"})
		}, 1},
		{"drive id with a hyphen", func(s *vmm.Spec, _ *ConfigOptions) { s.Drives[0].ID = "root-fs" }, 1},
		{"bad mac", func(s *vmm.Spec, _ *ConfigOptions) {
			s.Network = []vmm.NetworkInterface{{ID: "eth0", TapName: "t0", MAC: "06:00:00:00:00"}}
		}, 1},
		{"boot args too long", func(s *vmm.Spec, _ *ConfigOptions) { s.BootArgs = strings.Repeat("x", 2048) }, 1},
		{"no paths", func(_ *vmm.Spec, o *ConfigOptions) { *o = ConfigOptions{} }, 2},
		{"many at once", func(s *vmm.Spec, _ *ConfigOptions) {
			s.VCPUs, s.MemoryMiB, s.ID, s.VsockCID = 3, 4, "x y", 2
		}, 4},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			spec, opts := baseSpec(), goldenOpts
			c.edit(&spec, &opts)
			_, err := BuildConfig(spec, opts)
			if err == nil {
				t.Fatal("accepted")
			}
			if !errcode.HasCode(err, errcode.InvalidSpec) {
				t.Errorf("error %v lacks %s", err, errcode.InvalidSpec)
			}
			if n := countLeaves(err); n != c.want {
				t.Errorf("%d problems reported, want %d: %v", n, c.want, err)
			}
		})
	}
}

// countLeaves counts the errors joined (possibly in nested joins) in err.
func countLeaves(err error) int {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		n := 0
		for _, e := range j.Unwrap() {
			n += countLeaves(e)
		}
		return n
	}
	if err == nil {
		return 0
	}
	return 1
}
