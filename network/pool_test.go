package network

import (
	"net/netip"
	"testing"

	"github.com/hyphae-run/hyphae/errcode"
)

func TestPoolLease(t *testing.T) {
	tests := []struct {
		pool              string
		index             int
		subnet, host, gst string
		mac, tap          string
	}{
		{DefaultPool, 0, "172.16.0.0/30", "172.16.0.1", "172.16.0.2", "06:00:ac:10:00:02", "hyphae-tap0"},
		{DefaultPool, 1, "172.16.0.4/30", "172.16.0.5", "172.16.0.6", "06:00:ac:10:00:06", "hyphae-tap1"},
		{DefaultPool, 64, "172.16.1.0/30", "172.16.1.1", "172.16.1.2", "06:00:ac:10:01:02", "hyphae-tap64"},
		{DefaultPool, 16383, "172.16.255.252/30", "172.16.255.253", "172.16.255.254", "06:00:ac:10:ff:fe", "hyphae-tap16383"},
		{"10.200.0.0/30", 0, "10.200.0.0/30", "10.200.0.1", "10.200.0.2", "06:00:0a:c8:00:02", "hyphae-tap0"},
	}
	for _, tt := range tests {
		p, err := ParsePool(tt.pool)
		if err != nil {
			t.Fatal(err)
		}
		l, err := p.Lease(tt.index)
		if err != nil {
			t.Fatalf("Lease(%d): %v", tt.index, err)
		}
		if l.Subnet.String() != tt.subnet || l.HostIP.String() != tt.host || l.GuestIP.String() != tt.gst ||
			l.MAC.String() != tt.mac || l.TapName != tt.tap || l.Index != tt.index {
			t.Errorf("%s[%d] = %+v (mac %s)", tt.pool, tt.index, l, l.MAC)
		}
		if l.MAC[0]&0x02 == 0 || l.MAC[0]&0x01 != 0 {
			t.Errorf("MAC %s is not locally administered unicast", l.MAC)
		}
	}
}

func TestPoolSizeAndBounds(t *testing.T) {
	tests := []struct {
		pool string
		size int
	}{
		{"172.16.0.0/16", 16384},
		{"10.0.0.0/30", 1},
		{"10.0.0.0/28", 4},
		{"10.0.0.0/8", maxIndex + 1}, // capped so names fit IFNAMSIZ
	}
	for _, tt := range tests {
		p, err := ParsePool(tt.pool)
		if err != nil {
			t.Fatal(err)
		}
		if p.Size() != tt.size {
			t.Errorf("%s: size %d, want %d", tt.pool, p.Size(), tt.size)
		}
		for _, bad := range []int{-1, p.Size()} {
			if _, err := p.Lease(bad); !errcode.HasCode(err, errcode.InvalidArgument) {
				t.Errorf("%s: Lease(%d) = %v, want E201", tt.pool, bad, err)
			}
		}
		last, err := p.Lease(p.Size() - 1)
		if err != nil || len(last.TapName) > 15 || !p.Prefix().Contains(last.GuestIP) {
			t.Errorf("%s: last lease %+v, %v", tt.pool, last, err)
		}
	}
}

func TestParsePoolRejects(t *testing.T) {
	for _, s := range []string{"", "172.16.0.0", "172.16.0.1/16", "10.0.0.0/31", "fd00::/64", "nonsense/8"} {
		if _, err := ParsePool(s); !errcode.HasCode(err, errcode.InvalidArgument) {
			t.Errorf("ParsePool(%q) = %v, want E201", s, err)
		}
	}
}

func TestParseTapName(t *testing.T) {
	tests := []struct {
		name  string
		index int
		ok    bool
	}{
		{"hyphae-tap0", 0, true},
		{"hyphae-tap16383", 16383, true},
		{"hyphae-tap99999", 99999, true},
		{"hyphae-tap", 0, false},
		{"hyphae-tap07", 0, false},
		{"hyphae-tap-1", 0, false},
		{"hyphae-tap123456", 0, false},
		{"hyphae-tapx", 0, false},
		{"tap0", 0, false},
		{"eth0", 0, false},
	}
	for _, tt := range tests {
		i, ok := ParseTapName(tt.name)
		if ok != tt.ok || (ok && i != tt.index) {
			t.Errorf("ParseTapName(%q) = %d, %v", tt.name, i, ok)
		}
		if ok && TapName(i) != tt.name {
			t.Errorf("TapName(%d) = %q", i, TapName(i))
		}
	}
}

func TestGuestBootArgs(t *testing.T) {
	p, _ := ParsePool(DefaultPool)
	l, _ := p.Lease(1)
	dns := func(s ...string) []netip.Addr {
		var out []netip.Addr
		for _, a := range s {
			out = append(out, netip.MustParseAddr(a))
		}
		return out
	}
	tests := []struct {
		dns  []netip.Addr
		want string
	}{
		{nil, "ip=172.16.0.6::172.16.0.5:255.255.255.252::eth0:off"},
		{dns("1.1.1.1"), "ip=172.16.0.6::172.16.0.5:255.255.255.252::eth0:off:1.1.1.1 hyphae.dns=1.1.1.1"},
		{dns("1.1.1.1", "8.8.8.8", "9.9.9.9"),
			"ip=172.16.0.6::172.16.0.5:255.255.255.252::eth0:off:1.1.1.1:8.8.8.8 hyphae.dns=1.1.1.1,8.8.8.8,9.9.9.9"},
	}
	for _, tt := range tests {
		if got := GuestBootArgs(l, tt.dns); got != tt.want {
			t.Errorf("GuestBootArgs(%v) =\n %q, want\n %q", tt.dns, got, tt.want)
		}
	}
}

func TestVMIDOfChain(t *testing.T) {
	tests := []struct {
		chain, id string
		ok        bool
	}{
		{"vm-abc-out", "abc", true},
		{"vm-a-b-c-nat", "a-b-c", true},
		{vmChainName("x.y_z", roleHost), "x.y_z", true},
		{"vm-abc-other", "", false},
		{"forward", "", false},
		{"vm--out", "", false},
	}
	for _, tt := range tests {
		id, ok := vmIDOfChain(tt.chain)
		if id != tt.id || ok != tt.ok {
			t.Errorf("vmIDOfChain(%q) = %q, %v", tt.chain, id, ok)
		}
	}
}

func TestCheckVMID(t *testing.T) {
	for _, ok := range []string{"a", "vm-1", "01HZX.abc_def"} {
		if err := checkVMID(ok); err != nil {
			t.Errorf("checkVMID(%q) = %v", ok, err)
		}
	}
	for _, bad := range []string{"", "-a", "a b", "a\"b", "a/b", string(make([]byte, 65))} {
		if err := checkVMID(bad); !errcode.HasCode(err, errcode.InvalidArgument) {
			t.Errorf("checkVMID(%q) = %v, want E201", bad, err)
		}
	}
}

func TestBlockedFor(t *testing.T) {
	inside := blockedFor(netip.MustParsePrefix(DefaultPool))
	if len(inside) != len(blockedPrefixes) {
		t.Errorf("default pool inside 172.16/12 added again: %v", inside)
	}
	outside := blockedFor(netip.MustParsePrefix("198.18.0.0/16"))
	if outside[len(outside)-1] != netip.MustParsePrefix("198.18.0.0/16") {
		t.Errorf("pool outside the private ranges not blocked: %v", outside)
	}
}
