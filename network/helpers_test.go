package network

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/hyphae-run/hyphae/internal/testenv"
)

var nsSeq atomic.Int32

// testNS is a network namespace made for one test and deleted after it.
type testNS struct {
	name string
	path string
	ns   *namespace
}

func newTestNS(t *testing.T, role string) *testNS {
	t.Helper()
	testenv.RequiresRoot(t)
	testenv.RequiresTool(t, "ip")
	name := fmt.Sprintf("hyt-%d-%d-%s", os.Getpid(), nsSeq.Add(1), role)
	run(t, "ip", "netns", "add", name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	path := filepath.Join("/var/run/netns", name)
	ns, err := openNamespace(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.close() })
	run(t, "ip", "-n", name, "link", "set", "lo", "up")
	return &testNS{name: name, path: path, ns: ns}
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// ip runs ip(8) inside the namespace.
func (n *testNS) ip(t *testing.T, args ...string) string {
	t.Helper()
	return run(t, "ip", append([]string{"-n", n.name}, args...)...)
}

// do runs fn on a thread inside the namespace (sockets made there stay
// there).
func (n *testNS) do(t *testing.T, fn func() error) {
	t.Helper()
	if err := n.ns.run(func(*netlink.Handle) error { return fn() }); err != nil {
		t.Fatal(err)
	}
}

// ruleset is the part of `nft -j list ruleset` the tests read.
type ruleset struct {
	Tables []string
	Chains map[string]bool // "table/chain" for the hyphae table: chain
	Rules  []nftRule       // rules of the hyphae table
}

type nftRule struct {
	Chain   string
	Comment string
	Expr    string // the rule's expressions as JSON
	Packets int    // of its counter, when it has one
}

// listRules reads the namespace's ruleset back with the nft CLI, which is
// independent of the google/nftables code under test.
func (n *testNS) listRules(t *testing.T) ruleset {
	t.Helper()
	testenv.RequiresTool(t, "nft")
	out := run(t, "ip", "netns", "exec", n.name, "nft", "-j", "list", "ruleset")
	var doc struct {
		Nftables []map[string]json.RawMessage `json:"nftables"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("nft -j: %v\n%s", err, out)
	}
	rs := ruleset{Chains: map[string]bool{}}
	for _, obj := range doc.Nftables {
		switch {
		case obj["table"] != nil:
			var tb struct{ Family, Name string }
			json.Unmarshal(obj["table"], &tb)
			rs.Tables = append(rs.Tables, tb.Family+" "+tb.Name)
		case obj["chain"] != nil:
			var ch struct{ Family, Table, Name string }
			json.Unmarshal(obj["chain"], &ch)
			if ch.Table == TableName {
				rs.Chains[ch.Name] = true
			}
		case obj["rule"] != nil:
			var r struct {
				Table, Chain, Comment string
				Expr                  []map[string]json.RawMessage
			}
			json.Unmarshal(obj["rule"], &r)
			if r.Table != TableName {
				continue
			}
			nr := nftRule{Chain: r.Chain, Comment: r.Comment}
			raw, _ := json.Marshal(r.Expr)
			nr.Expr = string(raw)
			for _, e := range r.Expr {
				if c := e["counter"]; c != nil {
					var cnt struct{ Packets int }
					json.Unmarshal(c, &cnt)
					nr.Packets = cnt.Packets
				}
			}
			rs.Rules = append(rs.Rules, nr)
		}
	}
	return rs
}

// rulesOf returns the rules of one chain.
func (rs ruleset) rulesOf(chain string) []nftRule {
	var out []nftRule
	for _, r := range rs.Rules {
		if r.Chain == chain {
			out = append(out, r)
		}
	}
	return out
}

// mentions reports whether anything in the ruleset belongs to vmID.
func (rs ruleset) mentions(vmID string) bool {
	for c := range rs.Chains {
		if id, ok := vmIDOfChain(c); ok && id == vmID {
			return true
		}
	}
	for _, r := range rs.Rules {
		if strings.Contains(r.Comment, vmID) {
			return true
		}
	}
	return false
}

// newTestManager returns a Manager working in ns with its own allocation
// file.
func newTestManager(t *testing.T, ns *testNS, cfg Config) *Manager {
	t.Helper()
	if cfg.Allocations == nil {
		cfg.Allocations = FileAllocations(filepath.Join(t.TempDir(), "alloc.json"))
	}
	cfg.NetNSPath = ns.path
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func allocated(t *testing.T, m *Manager) []Allocation {
	t.Helper()
	list, err := m.allocs.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return list
}

func (n *testNS) hasLink(t *testing.T, name string) bool {
	t.Helper()
	ok := false
	n.do(t, func() error {
		h, err := netlink.NewHandle()
		if err != nil {
			return err
		}
		defer h.Close()
		_, ok, err = linkExists(h, name)
		return err
	})
	return ok
}
