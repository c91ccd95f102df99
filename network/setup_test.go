package network

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"testing"
)

func TestSetupCreatesTap(t *testing.T) {
	host := newTestNS(t, "host")
	m := newTestManager(t, host, Config{})
	ctx := context.Background()

	att, err := m.Setup(ctx, "vm1", Options{UID: 4321, GID: 4322})
	if err != nil {
		t.Fatal(err)
	}
	if att.TapName != "hyphae-tap0" || att.HostIP.String() != "172.16.0.1" || att.GuestIP.String() != "172.16.0.2" ||
		att.MAC.String() != "06:00:ac:10:00:02" {
		t.Errorf("attachment %+v", att)
	}
	if !strings.HasPrefix(att.BootArgs, "ip=172.16.0.2::172.16.0.1:255.255.255.252::eth0:off") ||
		!strings.Contains(att.BootArgs, "hyphae.dns=1.1.1.1,8.8.8.8") {
		t.Errorf("boot args %q", att.BootArgs)
	}

	var links []struct {
		Ifname   string
		Flags    []string
		Linkinfo struct {
			InfoKind string `json:"info_kind"`
			InfoData struct {
				Type       string
				Pi         bool
				VnetHdr    bool `json:"vnet_hdr"`
				Persist    bool
				MultiQueue bool `json:"multi_queue"`
				User       any  // a number, or a name when the uid has one
				Group      any
			} `json:"info_data"`
		}
		AddrInfo []struct {
			Local     string
			Prefixlen int
		} `json:"addr_info"`
	}
	out := host.ip(t, "-d", "-j", "addr", "show", "dev", "hyphae-tap0")
	if err := json.Unmarshal([]byte(out), &links); err != nil || len(links) != 1 {
		t.Fatalf("ip -j addr: %v\n%s", err, out)
	}
	l := links[0]
	info := l.Linkinfo.InfoData
	if l.Linkinfo.InfoKind != "tun" || info.Type != "tap" || !info.Persist || !info.VnetHdr || info.Pi || info.MultiQueue {
		t.Errorf("link kind %q data %+v, want a persistent single-queue tap with vnet_hdr and no PI\n%s", l.Linkinfo.InfoKind, info, out)
	}
	if fmt.Sprint(info.User) != "4321" || fmt.Sprint(info.Group) != "4322" {
		t.Errorf("owner %s:%s, want 4321:4322", info.User, info.Group)
	}
	if !strings.Contains(strings.Join(l.Flags, ","), "UP") {
		t.Errorf("flags %v, want UP", l.Flags)
	}
	if len(l.AddrInfo) != 1 || l.AddrInfo[0].Local != "172.16.0.1" || l.AddrInfo[0].Prefixlen != 30 {
		t.Errorf("addresses %+v, want 172.16.0.1/30", l.AddrInfo)
	}

	// A second VM gets the next lease.
	att2, err := m.Setup(ctx, "vm2", Options{})
	if err != nil {
		t.Fatal(err)
	}
	if att2.TapName != "hyphae-tap1" || att2.GuestIP.String() != "172.16.0.6" {
		t.Errorf("second attachment %+v", att2)
	}
	if err := m.Teardown(ctx, "vm1"); err != nil {
		t.Fatal(err)
	}
	if host.hasLink(t, "hyphae-tap0") || !host.hasLink(t, "hyphae-tap1") {
		t.Error("Teardown(vm1) removed the wrong TAP")
	}
}

func TestRulesPresentThenGone(t *testing.T) {
	host := newTestNS(t, "host")
	m := newTestManager(t, host, Config{})
	ctx := context.Background()
	allow := []Allow{{Prefix: netip.MustParsePrefix("10.9.0.0/16"), Port: 443}}

	before := host.listRules(t)
	if len(before.Tables) != 0 {
		t.Fatalf("fresh namespace has tables %v", before.Tables)
	}
	att, err := m.Setup(ctx, "vm-a", Options{Allow: allow})
	if err != nil {
		t.Fatal(err)
	}
	if !att.ForwardingEnabled {
		t.Error("ip_forward was off in the fresh namespace but Setup did not report enabling it")
	}
	if got := strings.TrimSpace(run(t, "ip", "netns", "exec", host.name, "cat", "/proc/sys/net/ipv4/ip_forward")); got != "1" {
		t.Errorf("ip_forward = %s after Setup with NAT", got)
	}
	rs := host.listRules(t)
	for _, c := range []string{"forward", "input", "postrouting", "vm-vm-a-out", "vm-vm-a-in", "vm-vm-a-host", "vm-vm-a-nat"} {
		if !rs.Chains[c] {
			t.Errorf("chain %s missing; have %v", c, rs.Chains)
		}
	}
	jumps := map[string]string{}
	for _, r := range rs.Rules {
		if r.Comment == "hyphae vm vm-a" {
			jumps[r.Chain] += r.Expr
		}
	}
	for chain, want := range map[string][]string{
		"forward":     {`"jump":{"target":"vm-vm-a-out"}`, `"jump":{"target":"vm-vm-a-in"}`, `"hyphae-tap0"`},
		"input":       {`"jump":{"target":"vm-vm-a-host"}`},
		"postrouting": {`"jump":{"target":"vm-vm-a-nat"}`, `"172.16.0.2"`},
	} {
		for _, w := range want {
			if !strings.Contains(jumps[chain], w) {
				t.Errorf("%s jumps %s lack %s", chain, jumps[chain], w)
			}
		}
	}
	outRules := ""
	for _, r := range rs.rulesOf("vm-vm-a-out") {
		outRules += r.Expr + "\n"
	}
	for _, w := range []string{`"10.0.0.0","len":8`, `"192.168.0.0","len":16`, `"169.254.0.0","len":16`,
		`"100.64.0.0","len":10`, `"172.16.0.0","len":12`, `"10.9.0.0","len":16`, `"right":443`, `"1.1.1.1"`, `"right":53`} {
		if !strings.Contains(outRules, w) {
			t.Errorf("vm-vm-a-out lacks %s:\n%s", w, outRules)
		}
	}
	if nat := rs.rulesOf("vm-vm-a-nat"); len(nat) != 1 || !strings.Contains(nat[0].Expr, `"masquerade"`) ||
		!strings.Contains(nat[0].Expr, `"hyphae-tap*"`) {
		t.Errorf("nat chain %+v", nat)
	}

	// Idempotent: a second Setup gives the same lease and the same rules.
	att2, err := m.Setup(ctx, "vm-a", Options{Allow: allow})
	if err != nil {
		t.Fatal(err)
	}
	if att2.Lease.Index != att.Lease.Index || att2.ForwardingEnabled {
		t.Errorf("second Setup: %+v", att2)
	}
	if again := host.listRules(t); !sameRules(rs, again) {
		t.Errorf("second Setup changed the rules:\n%v\n%v", rs.Rules, again.Rules)
	}

	// A second VM, then NoNAT for the first: its nat chain and jump go.
	if _, err := m.Setup(ctx, "vm-b", Options{}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Setup(ctx, "vm-a", Options{NoNAT: true}); err != nil {
		t.Fatal(err)
	}
	rs = host.listRules(t)
	if rs.Chains["vm-vm-a-nat"] || strings.Contains(joinExprs(rs.rulesOf("postrouting")), "vm-vm-a-nat") {
		t.Error("NoNAT left vm-a's masquerade in place")
	}
	if !rs.Chains["vm-vm-b-nat"] {
		t.Error("vm-b's nat chain went with vm-a's")
	}

	for range 2 { // idempotent
		if err := m.Teardown(ctx, "vm-a"); err != nil {
			t.Fatal(err)
		}
	}
	rs = host.listRules(t)
	if rs.mentions("vm-a") {
		t.Errorf("rules of vm-a left after Teardown: %v %v", rs.Chains, rs.Rules)
	}
	if !rs.mentions("vm-b") {
		t.Error("Teardown(vm-a) removed vm-b's rules")
	}
	if err := m.Teardown(ctx, "vm-b"); err != nil {
		t.Fatal(err)
	}
	rs = host.listRules(t)
	if len(rs.Tables) != 0 {
		t.Errorf("after the last Teardown: tables %v chains %v rules %v; want no table", rs.Tables, rs.Chains, rs.Rules)
	}
	if host.hasLink(t, "hyphae-tap0") || host.hasLink(t, "hyphae-tap1") || len(allocated(t, m)) != 0 {
		t.Error("TAPs or allocations left after Teardown")
	}
}

func sameRules(a, b ruleset) bool {
	if len(a.Rules) != len(b.Rules) {
		return false
	}
	for i := range a.Rules {
		if a.Rules[i].Chain != b.Rules[i].Chain || a.Rules[i].Expr != b.Rules[i].Expr || a.Rules[i].Comment != b.Rules[i].Comment {
			return false
		}
	}
	return true
}

func joinExprs(rules []nftRule) string {
	var b strings.Builder
	for _, r := range rules {
		b.WriteString(r.Expr)
	}
	return b.String()
}

func TestNATUplink(t *testing.T) {
	tests := []struct {
		uplink, want string
	}{
		{"", `{"match":{"op":"!=","left":{"meta":{"key":"oifname"}},"right":"hyphae-tap*"}},{"masquerade":null}`},
		{"up0", `{"match":{"op":"==","left":{"meta":{"key":"oifname"}},"right":"up0"}},{"masquerade":null}`},
	}
	for _, tt := range tests {
		host := newTestNS(t, "uplink")
		m := newTestManager(t, host, Config{Uplink: tt.uplink})
		if _, err := m.Setup(context.Background(), "vm", Options{}); err != nil {
			t.Fatal(err)
		}
		if got := joinExprs(host.listRules(t).rulesOf("vm-vm-nat")); !strings.Contains(got, tt.want) {
			t.Errorf("uplink %q: nat chain %s, want %s", tt.uplink, got, tt.want)
		}
	}
	for _, bad := range []string{"hyphae-tap3", "a-name-longer-than-15"} {
		if _, err := New(Config{Uplink: bad, Allocations: FileAllocations(t.TempDir() + "/a")}); err == nil {
			t.Errorf("uplink %q accepted", bad)
		}
	}
}

func TestNoNATLeavesForwardingOff(t *testing.T) {
	host := newTestNS(t, "nonat")
	m := newTestManager(t, host, Config{})
	att, err := m.Setup(context.Background(), "vm", Options{NoNAT: true})
	if err != nil {
		t.Fatal(err)
	}
	fwd := strings.TrimSpace(run(t, "ip", "netns", "exec", host.name, "cat", "/proc/sys/net/ipv4/ip_forward"))
	rs := host.listRules(t)
	if att.ForwardingEnabled || fwd != "0" || rs.Chains["vm-vm-nat"] || !rs.Chains["vm-vm-out"] {
		t.Errorf("NoNAT: forwarding %v (%s), chains %v", att.ForwardingEnabled, fwd, rs.Chains)
	}
}
