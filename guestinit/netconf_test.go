package guestinit

import (
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
	"github.com/hyphae-run/hyphae/internal/testenv"
	"github.com/hyphae-run/hyphae/internal/testenv/pid1"
)

func TestParseIPArg(t *testing.T) {
	p := netip.MustParsePrefix
	a := netip.MustParseAddr
	tests := []struct {
		in     string
		want   ipConfig
		static bool
		bad    string // substring of the error
	}{
		// What network.GuestBootArgs writes.
		{in: "172.16.0.2::172.16.0.1:255.255.255.252::eth0:off:1.1.1.1:8.8.8.8",
			want: ipConfig{Addr: p("172.16.0.2/30"), Gateway: a("172.16.0.1"), Device: "eth0"}, static: true},
		{in: "172.16.0.2::172.16.0.1:255.255.255.252::eth0:off",
			want: ipConfig{Addr: p("172.16.0.2/30"), Gateway: a("172.16.0.1"), Device: "eth0"}, static: true},
		{in: "10.0.0.5:10.0.0.1::255.255.0.0:host:eth1:none",
			want: ipConfig{Addr: p("10.0.0.5/16"), Device: "eth1"}, static: true},
		{in: "10.0.0.5:::255.255.255.0", want: ipConfig{Addr: p("10.0.0.5/24"), Device: "eth0"}, static: true},
		{in: "10.0.0.5::192.168.1.1:255.255.255.0:::",
			want: ipConfig{Addr: p("10.0.0.5/24"), Gateway: a("192.168.1.1"), Device: "eth0"}, static: true},
		{in: "off"}, {in: "none"}, {in: "dhcp"}, {in: "on"},
		{in: "::::::dhcp"},
		{in: "10.0.0.5::::::bootp"},
		{in: "::10.0.0.1:255.255.255.0::eth0:off", bad: "client address"},
		{in: "2001:db8::2::::::", bad: "client address"},
		{in: "10.0.0.5:::255.0.255.0::eth0:off", bad: "not contiguous"},
		{in: "10.0.0.5::::::off", bad: "netmask"},
		{in: "10.0.0.5::gw:255.255.255.0::eth0:off", bad: "gateway"},
		{in: "10.0.0.5:::255.255.255.0::a-very-long-interface:off", bad: "device"},
		{in: "10.0.0.5:::255.255.255.0::../x:off", bad: "device"},
	}
	for _, tt := range tests {
		got, static, err := parseIPArg(tt.in)
		if tt.bad != "" {
			if !errcode.HasCode(err, errcode.InitFatal) || !strings.Contains(err.Error(), tt.bad) {
				t.Errorf("parseIPArg(%q) error = %v, want E304 mentioning %q", tt.in, err, tt.bad)
			}
			continue
		}
		if err != nil || static != tt.static || got != tt.want {
			t.Errorf("parseIPArg(%q) = %+v, %v, %v; want %+v, %v", tt.in, got, static, err, tt.want, tt.static)
		}
	}
}

func FuzzParseIPArg(f *testing.F) {
	f.Add("172.16.0.2::172.16.0.1:255.255.255.252::eth0:off:1.1.1.1:8.8.8.8")
	f.Add("dhcp")
	f.Add("10.0.0.5:::255.255.255.0")
	f.Fuzz(func(t *testing.T, v string) {
		cfg, static, err := parseIPArg(v)
		if err != nil && !errcode.HasCode(err, errcode.InitFatal) {
			t.Fatalf("error without E304: %v", err)
		}
		if static && (!cfg.Addr.Addr().Is4() || cfg.Device == "" || len(cfg.Device) > 15 || strings.Contains(cfg.Device, "/")) {
			t.Fatalf("accepted %+v", cfg)
		}
	})
}

func TestParseLoadFile(t *testing.T) {
	tests := []struct {
		in   string
		want []string
		bad  bool
	}{
		{"failover.ko\nnet_failover.ko\nvirtio_net.ko\n", []string{"failover.ko", "net_failover.ko", "virtio_net.ko"}, false},
		{"\n  a.ko  \n\n", []string{"a.ko"}, false},
		{"", nil, false},
		{"../etc/x.ko\n", nil, true},
		{"sub/a.ko\n", nil, true},
		{"a.ko.xz\n", nil, true},
		{"..\n", nil, true},
	}
	for _, tt := range tests {
		got, err := parseLoadFile([]byte(tt.in))
		if (err != nil) != tt.bad || !slices.Equal(got, tt.want) {
			t.Errorf("parseLoadFile(%q) = %q, %v", tt.in, got, err)
		}
	}
}

// inFreshNetns runs fn on a thread moved into a new network namespace,
// which disappears with the thread: the thread stays locked, so Go
// discards it when the goroutine ends.
func inFreshNetns(t *testing.T, fn func() error) {
	t.Helper()
	testenv.RequiresRoot(t)
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		ns, err := netns.New()
		if err != nil {
			done <- err
			return
		}
		ns.Close()
		done <- fn()
	}()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// TestConfigureNetwork applies an ip= configuration to a veth end in a
// fresh network namespace and reads it back with netlink.
func TestConfigureNetwork(t *testing.T) {
	cfg, _, err := parseIPArg("172.16.0.6::172.16.0.5:255.255.255.252::eth0:off")
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.DiscardHandler)
	inFreshNetns(t, func() error {
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0"}, PeerName: "peer0"}
		if err := netlink.LinkAdd(veth); err != nil {
			return err
		}
		// Twice: a kernel with IP_PNP has done it once already.
		for range 2 {
			if err := configureNetwork(cfg, deviceWait, log); err != nil {
				return err
			}
		}
		link, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		if link.Attrs().Flags&net.FlagUp == 0 {
			t.Error("eth0 is not up")
		}
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		if lo.Attrs().Flags&net.FlagUp == 0 {
			t.Error("lo is not up")
		}
		addrs, err := netlink.AddrList(link, netlink.FAMILY_V4)
		if err != nil {
			return err
		}
		if len(addrs) != 1 || addrs[0].IPNet.String() != "172.16.0.6/30" {
			t.Errorf("eth0 addresses = %v, want 172.16.0.6/30 once", addrs)
		}
		routes, err := netlink.RouteList(link, netlink.FAMILY_V4)
		if err != nil {
			return err
		}
		var defaults []string
		for _, r := range routes {
			if r.Dst == nil || r.Dst.IP.IsUnspecified() {
				defaults = append(defaults, r.Gw.String())
			}
		}
		if !slices.Equal(defaults, []string{"172.16.0.5"}) {
			t.Errorf("default routes via %q, want via 172.16.0.5 once", defaults)
		}

		// A device that never appears ends in E304 once the wait is over.
		missing := cfg
		missing.Device = "eth9"
		err = configureNetwork(missing, 50*time.Millisecond, log)
		if !errcode.HasCode(err, errcode.InitFatal) || !strings.Contains(err.Error(), "eth9 did not appear") {
			t.Errorf("missing device: %v", err)
		}
		return nil
	})
}

// TestNetworkBootInNamespace boots the real init as PID 1 of a fresh
// network namespace holding a veth named eth0: init configures it from ip=
// before the program runs.
func TestNetworkBootInNamespace(t *testing.T) {
	h := newHarness(t)
	testenv.RequiresTool(t, "ip")
	probe := []string{"/bin/probe", "net"}
	veth := "ip link add eth0 type veth peer name peer0"
	tests := []struct {
		name, cmdline, setup string
		want                 []string
		fatal                string
	}{
		{
			name:    "ip= configures eth0",
			cmdline: "console=ttyS0 ip=172.16.0.2::172.16.0.1:255.255.255.252::eth0:off:1.1.1.1 hyphae.dns=1.1.1.1",
			setup:   veth,
			want:    []string{"probe: link.lo=up 127.0.0.1/8", "probe: link.eth0=up 172.16.0.2/30", "probe: route.default=172.16.0.1 dev eth0"},
		},
		{
			name:    "no ip=: eth0 left alone",
			cmdline: "console=ttyS0",
			setup:   veth,
			want:    []string{"probe: link.lo=down", "probe: link.eth0=down"},
		},
		{
			name:    "device missing",
			cmdline: "ip=172.16.0.2::172.16.0.1:255.255.255.252::eth0:off",
			fatal:   "E304: ip=: device eth0 did not appear",
		},
		{
			name:    "bad ip=",
			cmdline: "ip=172.16.0.2::172.16.0.1:255.0.255.0::eth0:off",
			setup:   veth,
			fatal:   "not contiguous",
		},
		{
			name:    "modules device missing",
			cmdline: guest.CmdlineModules + "=/dev/nosuch ip=172.16.0.2::172.16.0.1:255.255.255.252::eth0:off",
			setup:   veth,
			fatal:   "E304: hyphae.modules=/dev/nosuch: cannot mount it read-only as ext4",
		},
		{
			name:    "modules not a device path",
			cmdline: guest.CmdlineModules + "=/etc/../dev/x",
			fatal:   "want a block device path under /dev/",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := h.root(t, testImage{entrypoint: probe})
			res := pid1.Boot(t, root, pid1.Options{Cmdline: tt.cmdline, Net: true, Setup: tt.setup})
			for _, w := range tt.want {
				if !res.Has(w) {
					t.Errorf("console lacks %q", w)
				}
			}
			st := res.Status(t)
			if tt.fatal != "" {
				if st.ExitCode != -1 || !strings.Contains(st.Fatal, tt.fatal) {
					t.Errorf("status %+v, want a fatal line containing %q", st, tt.fatal)
				}
			} else if st != (guest.Status{ExitCode: 0}) {
				t.Errorf("status %+v", st)
			}
			if !res.EndedByReboot() {
				t.Errorf("namespace ended with %v", res.State)
			}
			if t.Failed() {
				t.Logf("console:\n%s\nstderr:\n%s", strings.Join(res.Lines, "\n"), res.Stderr)
			}
		})
	}
}
