package vmm

import (
	"errors"
	"strings"
	"testing"

	"github.com/hyphae-run/hyphae/errcode"
)

func validSpec() Spec {
	return Spec{
		ID:        "vm1",
		VCPUs:     2,
		MemoryMiB: 128,
		Kernel:    "/k/vmlinuz",
		Drives:    []Drive{{ID: "root", Path: "/img/root.ext4", Root: true, ReadOnly: true}},
	}
}

func TestValidate(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(*Spec)
		// want lists a substring of each expected problem; empty means valid.
		want []string
	}{
		{"valid", func(*Spec) {}, nil},
		{"one vcpu", func(s *Spec) { s.VCPUs = 1 }, nil},
		{"32 vcpus", func(s *Spec) { s.VCPUs = 32 }, nil},
		{"zero vcpus", func(s *Spec) { s.VCPUs = 0 }, []string{"vcpus: 0"}},
		{"odd vcpus", func(s *Spec) { s.VCPUs = 3 }, []string{"vcpus: 3"}},
		{"too many vcpus", func(s *Spec) { s.VCPUs = 34 }, []string{"vcpus: 34"}},
		{"minimum memory", func(s *Spec) { s.MemoryMiB = 8 }, nil},
		{"too little memory", func(s *Spec) { s.MemoryMiB = 7 }, []string{"memory_mib: 7"}},
		{"no kernel", func(s *Spec) { s.Kernel = "" }, []string{"kernel:"}},
		{"no drives", func(s *Spec) { s.Drives = nil }, []string{"0 root drives"}},
		{"two roots", func(s *Spec) {
			s.Drives = append(s.Drives, Drive{ID: "r2", Path: "/x", Root: true})
		}, []string{"2 root drives"}},
		{"extra drive", func(s *Spec) {
			s.Drives = append(s.Drives, Drive{ID: "data", Path: "/data.ext4"})
		}, nil},
		{"duplicate drive id", func(s *Spec) {
			s.Drives = append(s.Drives, Drive{ID: "root", Path: "/data.ext4"})
		}, []string{`drives[1].id: "root"`}},
		{"empty drive id and path", func(s *Spec) {
			s.Drives = append(s.Drives, Drive{})
		}, []string{"drives[1].id: empty", "drives[1].path: empty"}},
		{"vsock cid reserved", func(s *Spec) { s.VsockCID = 2 }, []string{"vsock_cid: 2"}},
		{"vsock cid ok", func(s *Spec) { s.VsockCID = 3 }, nil},
		{"nics ok", func(s *Spec) {
			s.Network = []NetworkInterface{{ID: "eth0", TapName: "tap0"}, {ID: "eth1", TapName: "tap1"}}
		}, nil},
		{"duplicate nic id and tap", func(s *Spec) {
			s.Network = []NetworkInterface{{ID: "eth0", TapName: "tap0"}, {ID: "eth0", TapName: "tap0"}}
		}, []string{`network[1].id: "eth0"`, `network[1].tap_name: "tap0"`}},
		{"empty nic fields", func(s *Spec) {
			s.Network = []NetworkInterface{{}}
		}, []string{"network[0].id: empty", "network[0].tap_name: empty"}},
		{"tap name too long", func(s *Spec) {
			s.Network = []NetworkInterface{{ID: "eth0", TapName: "tap-0123456789ab"}}
		}, []string{"longer than 15"}},
		{"everything wrong at once", func(s *Spec) {
			*s = Spec{VCPUs: 5, MemoryMiB: 1, VsockCID: 1}
		}, []string{"vcpus: 5", "memory_mib: 1", "kernel:", "0 root drives", "vsock_cid: 1"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := validSpec()
			tt.mutate(&s)
			err := Validate(s)
			if len(tt.want) == 0 {
				if err != nil {
					t.Fatalf("Validate: %v, want nil", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Validate: nil, want %d problems", len(tt.want))
			}
			joined, ok := err.(interface{ Unwrap() []error })
			if !ok {
				t.Fatalf("error %T is not a joined error", err)
			}
			problems := joined.Unwrap()
			if len(problems) != len(tt.want) {
				t.Fatalf("got %d problems, want %d:\n%v", len(problems), len(tt.want), err)
			}
			for i, p := range problems {
				if !errcode.HasCode(p, errcode.InvalidSpec) {
					t.Errorf("problem %d (%v) lacks code %s", i, p, errcode.InvalidSpec)
				}
				if !strings.Contains(p.Error(), tt.want[i]) {
					t.Errorf("problem %d = %q, want it to mention %q", i, p, tt.want[i])
				}
			}
			if !errors.Is(err, errcode.New(errcode.InvalidSpec, "")) {
				t.Errorf("errors.Is(err, InvalidSpec) is false for %v", err)
			}
		})
	}
}
