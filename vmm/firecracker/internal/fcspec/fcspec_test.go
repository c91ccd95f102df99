package fcspec

import (
	"strings"
	"testing"
)

func TestLoadAll(t *testing.T) {
	specs, err := LoadAll()
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{Head: "1.17.0-dev", V1_16_1: "1.16.1"}
	for _, s := range specs {
		if s.Version != want[s.Name] {
			t.Errorf("%s: version %q, want %q", s.Name, s.Version, want[s.Name])
		}
		for _, k := range []string{"boot-source", "drives", "machine-config", "network-interfaces", "vsock", "logger"} {
			if !strings.Contains(" "+strings.Join(s.ConfigFileKeys(), " ")+" ", " "+k+" ") {
				t.Errorf("%s: config keys %v lack %q", s.Name, s.ConfigFileKeys(), k)
			}
		}
	}
}

// TestValidateRequest makes sure the validator can say no: each bad body
// breaks one rule of the description.
func TestValidateRequest(t *testing.T) {
	specs, err := LoadAll()
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name, method, path, body string
		ok                       bool
	}{
		{"boot source", "PUT", "/boot-source", `{"kernel_image_path":"/k","boot_args":"console=ttyS0"}`, true},
		{"boot source without kernel", "PUT", "/boot-source", `{"boot_args":"x"}`, false},
		{"drive", "PUT", "/drives/rootfs", `{"drive_id":"rootfs","is_root_device":true,"is_read_only":true,"path_on_host":"/r"}`, true},
		{"drive with wrong type", "PUT", "/drives/rootfs", `{"drive_id":"rootfs","is_root_device":"yes"}`, false},
		{"drive with unknown field", "PUT", "/drives/rootfs", `{"drive_id":"rootfs","is_root_device":true,"read_only":true}`, false},
		{"machine config", "PUT", "/machine-config", `{"vcpu_count":2,"mem_size_mib":256}`, true},
		{"too many vcpus", "PUT", "/machine-config", `{"vcpu_count":33,"mem_size_mib":256}`, false},
		{"fractional memory", "PUT", "/machine-config", `{"vcpu_count":1,"mem_size_mib":1.5}`, false},
		{"nic", "PUT", "/network-interfaces/eth0", `{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"06:00:00:00:00:01"}`, true},
		{"vsock", "PUT", "/vsock", `{"guest_cid":3,"uds_path":"/v.sock"}`, true},
		{"vsock reserved cid", "PUT", "/vsock", `{"guest_cid":2,"uds_path":"/v.sock"}`, false},
		{"start", "PUT", "/actions", `{"action_type":"InstanceStart"}`, true},
		{"unknown action", "PUT", "/actions", `{"action_type":"Reboot"}`, false},
		{"not JSON", "PUT", "/actions", `{`, false},
		{"no such path", "PUT", "/nope", `{}`, false},
		{"empty path parameter", "PUT", "/drives/", `{"drive_id":"x","is_root_device":false}`, false},
	}
	for _, s := range specs {
		for _, c := range cases {
			err := s.ValidateRequest(c.method, c.path, []byte(c.body))
			if (err == nil) != c.ok {
				t.Errorf("%s: %s: got err=%v, want ok=%v", s.Name, c.name, err, c.ok)
			}
		}
	}
}

func TestValidateConfigFile(t *testing.T) {
	specs, err := LoadAll()
	if err != nil {
		t.Fatal(err)
	}
	good := `{"boot-source":{"kernel_image_path":"/k"},"machine-config":{"vcpu_count":1,"mem_size_mib":128},"drives":[{"drive_id":"r","is_root_device":true,"is_read_only":true,"path_on_host":"/r"}]}`
	bad := map[string]string{
		"snake-case top-level key": `{"boot_source":{"kernel_image_path":"/k"}}`,
		"unknown drive field":      `{"drives":[{"drive_id":"r","is_root_device":true,"readonly":true}]}`,
		"bad machine config":       `{"machine-config":{"vcpu_count":0,"mem_size_mib":128}}`,
	}
	for _, s := range specs {
		if err := s.ValidateConfigFile([]byte(good)); err != nil {
			t.Errorf("%s: good config rejected: %v", s.Name, err)
		}
		for name, body := range bad {
			if err := s.ValidateConfigFile([]byte(body)); err == nil {
				t.Errorf("%s: %s accepted", s.Name, name)
			}
		}
	}
}
