package network

import (
	"context"
	"slices"
	"strings"
	"testing"

	"github.com/google/nftables"

	"github.com/hyphae-run/hyphae/errcode"
)

// poisonConn makes the kernel reject a batch halfway: after the after-th
// rule it queues the deletion of a chain that does not exist. The kernel
// has processed the earlier messages by then and must undo them.
type poisonConn struct {
	nftConn
	after, added int
}

func (p *poisonConn) AddRule(r *nftables.Rule) *nftables.Rule {
	out := p.nftConn.AddRule(r)
	if p.added++; p.added == p.after {
		p.nftConn.DelChain(&nftables.Chain{Table: table, Name: "hyphae-test-no-such-chain"})
	}
	return out
}

func TestSetupFailuresLeaveNothing(t *testing.T) {
	tests := []struct {
		name   string
		pool   string
		before func(t *testing.T, ns *testNS, m *Manager) // may set up other VMs or links
		inject func(m *Manager)
		code   errcode.Code
		keep   string // a link that is not ours and must survive
	}{
		{
			name: "pool exhausted",
			pool: "10.200.0.0/30",
			before: func(t *testing.T, _ *testNS, m *Manager) {
				if _, err := m.Setup(context.Background(), "first", Options{}); err != nil {
					t.Fatal(err)
				}
			},
			code: errcode.PoolExhausted,
		},
		{
			name: "TAP name taken by a veth",
			before: func(t *testing.T, ns *testNS, _ *Manager) {
				ns.ip(t, "link", "add", "hyphae-tap0", "type", "veth", "peer", "name", "other0")
			},
			code: errcode.TapExists,
			keep: "hyphae-tap0",
		},
		{
			name:   "TAP name taken by another TAP",
			before: func(t *testing.T, ns *testNS, _ *Manager) { ns.ip(t, "tuntap", "add", "hyphae-tap0", "mode", "tap") },
			code:   errcode.TapExists,
			keep:   "hyphae-tap0",
		},
		{
			name: "nft batch rejected halfway",
			inject: func(m *Manager) {
				real := m.newNft
				m.newNft = func() (nftConn, error) {
					c, err := real()
					return &poisonConn{nftConn: c, after: 8}, err
				}
			},
			code: errcode.NftFailed,
		},
		{
			name: "failure after the rules were installed",
			inject: func(m *Manager) {
				m.beforeStep = func(step string) error {
					if step == "forwarding" {
						return errcode.New(errcode.SysctlFailed, "injected")
					}
					return nil
				}
			},
			code: errcode.SysctlFailed,
		},
		{
			name: "failure before the TAP",
			inject: func(m *Manager) {
				m.beforeStep = func(step string) error {
					if step == "link" {
						return errcode.New(errcode.NetlinkFailed, "injected")
					}
					return nil
				}
			},
			code: errcode.NetlinkFailed,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ns := newTestNS(t, "fail")
			m := newTestManager(t, ns, Config{Pool: tt.pool})
			if tt.before != nil {
				tt.before(t, ns, m)
			}
			rulesBefore := ns.listRules(t)
			allocsBefore := allocated(t, m)
			linksBefore := tapLinks(t, ns)
			if tt.inject != nil {
				tt.inject(m)
			}

			_, err := m.Setup(context.Background(), "victim", Options{Allow: []Allow{{Prefix: m.pool.Prefix()}}})
			if !errcode.HasCode(err, tt.code) {
				t.Fatalf("Setup = %v, want %s", err, tt.code)
			}

			after := ns.listRules(t)
			if after.mentions("victim") || !slices.Equal(after.Tables, rulesBefore.Tables) || !sameRules(rulesBefore, after) {
				t.Errorf("ruleset changed:\nbefore %v %v\nafter  %v %v", rulesBefore.Tables, rulesBefore.Rules, after.Tables, after.Rules)
			}
			if got := allocated(t, m); !slices.Equal(got, allocsBefore) {
				t.Errorf("allocations %v, want %v", got, allocsBefore)
			}
			if got := tapLinks(t, ns); !slices.Equal(got, linksBefore) {
				t.Errorf("links %v, want %v", got, linksBefore)
			}
			if tt.keep != "" && !ns.hasLink(t, tt.keep) {
				t.Errorf("the foreign link %s was removed", tt.keep)
			}
			if fwd := strings.TrimSpace(run(t, "ip", "netns", "exec", ns.name, "cat", "/proc/sys/net/ipv4/ip_forward")); fwd != "0" && tt.code != errcode.PoolExhausted {
				t.Errorf("ip_forward = %s after a failed Setup", fwd)
			}
		})
	}
}

// TestFailedResetupKeepsTheEarlierSetup: a second Setup of a running VM
// that fails must not take away what the first one made.
func TestFailedResetupKeepsTheEarlierSetup(t *testing.T) {
	ns := newTestNS(t, "resetup")
	m := newTestManager(t, ns, Config{})
	ctx := context.Background()
	att, err := m.Setup(ctx, "vm", Options{})
	if err != nil {
		t.Fatal(err)
	}
	before := ns.listRules(t)
	real := m.newNft
	m.newNft = func() (nftConn, error) {
		c, err := real()
		return &poisonConn{nftConn: c, after: 3}, err
	}
	if _, err := m.Setup(ctx, "vm", Options{NoNAT: true}); !errcode.HasCode(err, errcode.NftFailed) {
		t.Fatalf("Setup = %v, want E804", err)
	}
	if !sameRules(before, ns.listRules(t)) || !ns.hasLink(t, att.TapName) || len(allocated(t, m)) != 1 {
		t.Error("the failed re-Setup removed the VM's earlier network")
	}
}

func tapLinks(t *testing.T, ns *testNS) []string {
	t.Helper()
	var names []string
	for _, line := range strings.Split(ns.ip(t, "-o", "link", "show"), "\n") {
		if f := strings.Fields(line); len(f) > 1 {
			names = append(names, strings.TrimSuffix(f[1], ":"))
		}
	}
	slices.Sort(names)
	return names
}
