package qemu

import (
	"slices"
	"strings"
	"testing"

	"github.com/hyphae-run/hyphae/vmm"
)

// pairs maps each flag to the values it was given, in order.
func pairs(argv []string) map[string][]string {
	m := map[string][]string{}
	for i := 0; i < len(argv); i++ {
		if strings.HasPrefix(argv[i], "-") && i+1 < len(argv) && !strings.HasPrefix(argv[i+1], "-") {
			m[argv[i]] = append(m[argv[i]], argv[i+1])
			i++
			continue
		}
		m[argv[i]] = append(m[argv[i]], "")
	}
	return m
}

func TestArgs(t *testing.T) {
	base := vmm.Spec{
		ID: "vm1", VCPUs: 2, MemoryMiB: 256, Kernel: "/k/vmlinuz", BootArgs: "hyphae.env.A=1",
		Drives: []vmm.Drive{
			{ID: "data", Path: "/img/data,1.ext4", ReadOnly: true},
			{ID: "root", Path: "/img/root.ext4", Root: true},
		},
		Network: []vmm.NetworkInterface{{ID: "eth0", TapName: "hy-tap0", MAC: "06:00:ac:10:00:02"}},
	}
	lay := layout{accel: AccelTCG, rootFile: "/run/vm1/root-overlay.qcow2", rootFormat: "qcow2",
		channelSock: "/run/vm1/channel.sock", qmpSock: "/run/vm1/qmp.sock", tscKHz: 2600000}

	tests := []struct {
		name   string
		spec   func(vmm.Spec) vmm.Spec
		lay    func(layout) layout
		want   map[string][]string // flag → expected values (all of them)
		absent []string
		cmd    []string // substrings of -append
		noCmd  []string
	}{
		{
			name: "writable root through the overlay, extra drive, nic",
			want: map[string][]string{
				"-accel": {"tcg"}, "-m": {"256"}, "-smp": {"2"}, "-serial": {"stdio"}, "-kernel": {"/k/vmlinuz"},
				"-M": {"microvm,pcie=on,rtc=on"},
				"-drive": {
					"file=/run/vm1/root-overlay.qcow2,if=none,id=drive0,format=qcow2",
					"file=/img/data,,1.ext4,if=none,id=drive1,format=raw,readonly=on",
				},
				"-device": {"i8042", "isa-serial,chardev=ch0", "nvme,drive=drive0,serial=root", "nvme,drive=drive1,serial=data",
					"virtio-net-pci,netdev=net0,disable-legacy=on,romfile=,mac=06:00:ac:10:00:02"},
				"-chardev": {"socket,id=ch0,path=/run/vm1/channel.sock,server=on,wait=off"},
				"-qmp":     {"unix:/run/vm1/qmp.sock,server=on,wait=off"},
				"-netdev":  {"tap,id=net0,ifname=hy-tap0,script=no,downscript=no"},
			},
			absent: []string{"-cpu"},
			cmd: []string{"console=ttyS0 root=/dev/nvme0n1 rw init=/sbin/init panic=-1", "hyphae.channel=serial:/dev/ttyS1",
				"reboot=k", "tsc_early_khz=2600000", "hyphae.env.A=1"},
		},
		{
			name: "read-only root under kvm",
			spec: func(s vmm.Spec) vmm.Spec {
				s.Drives = []vmm.Drive{{ID: "root", Path: "/img/root.ext4", Root: true, ReadOnly: true}}
				s.Network, s.BootArgs = nil, ""
				return s
			},
			lay: func(l layout) layout {
				l.accel, l.rootFile, l.rootFormat, l.tscKHz = AccelKVM, "/img/root.ext4", "raw", 0
				return l
			},
			want: map[string][]string{
				"-accel": {"kvm"}, "-cpu": {"host"},
				"-drive": {"file=/img/root.ext4,if=none,id=drive0,format=raw,readonly=on"},
			},
			absent: []string{"-netdev"},
			cmd:    []string{"root=/dev/nvme0n1 ro "},
			noCmd:  []string{"tsc_early_khz", " rw "},
		},
		{
			name: "virtio kernel: virtio-blk drives, virtio-serial channel, vsock on mmio",
			spec: func(s vmm.Spec) vmm.Spec { s.VsockCID = 7; return s },
			lay: func(l layout) layout {
				l.dev, l.vsock = devices{virtioBlk: true, virtioPort: true, vsock: true}, true
				return l
			},
			want: map[string][]string{"-device": {
				"i8042", "virtio-serial-device,id=vser0", "virtserialport,bus=vser0.0,chardev=ch0,name=org.hyphae.channel",
				"virtio-blk-device,drive=drive0,serial=root", "virtio-blk-device,drive=drive1,serial=data",
				"virtio-net-pci,netdev=net0,disable-legacy=on,romfile=,mac=06:00:ac:10:00:02", "vhost-vsock-device,guest-cid=7"}},
			cmd:   []string{"console=ttyS0 root=/dev/vda rw ", "hyphae.channel=virtio-port:org.hyphae.channel"},
			noCmd: []string{"ttyS1", "nvme"},
		},
		{
			name: "vhost-vsock where the host has it",
			spec: func(s vmm.Spec) vmm.Spec { s.VsockCID = 7; return s },
			lay:  func(l layout) layout { l.vsock = true; return l },
			want: map[string][]string{"-device": {"i8042", "isa-serial,chardev=ch0", "nvme,drive=drive0,serial=root",
				"nvme,drive=drive1,serial=data", "virtio-net-pci,netdev=net0,disable-legacy=on,romfile=,mac=06:00:ac:10:00:02", "vhost-vsock-pci,guest-cid=7"}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, l := base, lay
			if tt.spec != nil {
				s = tt.spec(s)
			}
			if tt.lay != nil {
				l = tt.lay(l)
			}
			argv := args(s, l)
			got := pairs(argv)
			for flag, want := range tt.want {
				if !slices.Equal(got[flag], want) {
					t.Errorf("%s = %q, want %q", flag, got[flag], want)
				}
			}
			for _, flag := range tt.absent {
				if _, ok := got[flag]; ok {
					t.Errorf("%s present: %q", flag, got[flag])
				}
			}
			for _, flag := range []string{"-nodefaults", "-no-user-config", "-nographic", "-no-reboot"} {
				if _, ok := got[flag]; !ok {
					t.Errorf("%s missing", flag)
				}
			}
			app := got["-append"]
			if len(app) != 1 {
				t.Fatalf("-append = %q", app)
			}
			for _, c := range tt.cmd {
				if !strings.Contains(app[0], c) {
					t.Errorf("-append %q lacks %q", app[0], c)
				}
			}
			for _, c := range tt.noCmd {
				if strings.Contains(app[0], c) {
					t.Errorf("-append %q holds %q", app[0], c)
				}
			}
			// The caller's boot args come last so they can override ours.
			if s.BootArgs != "" && !strings.HasSuffix(app[0], " "+s.BootArgs) {
				t.Errorf("-append %q does not end with the boot args", app[0])
			}
		})
	}
}

func TestDriveSerial(t *testing.T) {
	if got := driveSerial(strings.Repeat("a", 30)); len(got) != 20 {
		t.Errorf("serial %q is %d bytes", got, len(got))
	}
	if got := driveSerial("root"); got != "root" {
		t.Errorf("serial %q", got)
	}
}

func TestGuestDrivePath(t *testing.T) {
	spec := vmm.Spec{Drives: []vmm.Drive{
		{ID: "data", Path: "/d"}, {ID: "root", Path: "/r", Root: true}, {ID: "modules", Path: "/m", ReadOnly: true},
	}}
	for _, tc := range []struct {
		dev    devices
		device string // the -device driver args gives the drives
		want   map[string]string
	}{
		{stockDevices, "nvme", map[string]string{"root": "/dev/nvme0n1", "data": "/dev/nvme1n1", "modules": "/dev/nvme2n1", "none": ""}},
		{devices{virtioBlk: true}, "virtio-blk-device", map[string]string{"root": "/dev/vda", "data": "/dev/vdb", "modules": "/dev/vdc", "none": ""}},
	} {
		for id, want := range tc.want {
			got, ok := guestDrivePath(spec, tc.dev, id)
			if got != want || ok != (want != "") {
				t.Errorf("%s: guestDrivePath(%s) = %q, %v; want %q", tc.device, id, got, ok, want)
			}
		}
		// args attaches the drives in the same order.
		var serials []string
		for _, v := range pairs(args(spec, layout{accel: AccelTCG, rootFile: "/r", rootFormat: "raw", dev: tc.dev}))["-device"] {
			if s, ok := strings.CutPrefix(v, tc.device+","); ok {
				serials = append(serials, s[strings.Index(s, "serial=")+len("serial="):])
			}
		}
		if !slices.Equal(serials, []string{"root", "data", "modules"}) {
			t.Errorf("%s devices in order %q", tc.device, serials)
		}
	}
}
