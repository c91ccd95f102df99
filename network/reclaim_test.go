package network

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"
)

func TestReclaim(t *testing.T) {
	ns := newTestNS(t, "reclaim")
	m := newTestManager(t, ns, Config{})
	ctx := context.Background()
	for _, vm := range []string{"alive", "dead", "lost"} {
		if _, err := m.Setup(ctx, vm, Options{}); err != nil {
			t.Fatal(err)
		}
	}
	// "lost" keeps its TAP (hyphae-tap2) and rules but its allocation is
	// gone, as after a registry restored from an older copy.
	if err := m.allocs.Release(ctx, "lost"); err != nil {
		t.Fatal(err)
	}
	ns.ip(t, "tuntap", "add", "hyphae-tap9", "mode", "tap") // a TAP nobody holds
	ns.ip(t, "tuntap", "add", "tap-other", "mode", "tap")   // not hyphae's
	run(t, "ip", "netns", "exec", ns.name, "nft", "add", "table", "inet", "other")

	live := func(vm string) bool { return vm == "alive" }
	for range 2 { // idempotent
		if err := m.Reclaim(ctx, live); err != nil {
			t.Fatal(err)
		}
		if got := allocated(t, m); len(got) != 1 || got[0].VMID != "alive" {
			t.Errorf("allocations %v", got)
		}
		rs := ns.listRules(t)
		if !rs.mentions("alive") || rs.mentions("dead") || rs.mentions("lost") {
			t.Errorf("chains after Reclaim: %v", rs.Chains)
		}
		if !slices.Contains(rs.Tables, "inet other") {
			t.Error("Reclaim removed a table it does not own")
		}
		links := tapLinks(t, ns)
		for _, gone := range []string{"hyphae-tap1", "hyphae-tap2", "hyphae-tap9"} {
			if slices.Contains(links, gone) {
				t.Errorf("%s left: %v", gone, links)
			}
		}
		for _, kept := range []string{"hyphae-tap0", "tap-other"} {
			if !slices.Contains(links, kept) {
				t.Errorf("%s removed: %v", kept, links)
			}
		}
	}
}

// TestConcurrentManagers runs two Managers on one namespace and one
// allocation file, as two hyphae processes would (flock locks conflict
// between open files, so the two Managers contend like two processes).
// Each keeps one VM up while it cycles others through Setup and Teardown,
// so each Teardown that removes its own last cycling VM may be tempted to
// delete the table under the other's feet.
func TestConcurrentManagers(t *testing.T) {
	ns := newTestNS(t, "concurrent")
	allocs := FileAllocations(filepath.Join(t.TempDir(), "alloc.json"))
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	for _, name := range []string{"a", "b"} {
		m := newTestManager(t, ns, Config{Allocations: allocs})
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 15 {
				vm := fmt.Sprintf("%s-%d", name, i)
				if _, err := m.Setup(ctx, vm, Options{}); err != nil {
					errs <- err
					return
				}
				if i%5 == 4 {
					continue // keep this one
				}
				if err := m.Teardown(ctx, vm); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	list := allocated(t, newTestManager(t, ns, Config{Allocations: allocs}))
	rs := ns.listRules(t)
	links := tapLinks(t, ns)
	if len(list) != 6 {
		t.Errorf("allocations %v, want the 6 kept VMs", list)
	}
	for _, a := range list {
		if !rs.Chains[vmChainName(a.VMID, roleOut)] || len(rs.rulesOf(vmChainName(a.VMID, roleOut))) == 0 {
			t.Errorf("kept VM %s lost its rules", a.VMID)
		}
		if !slices.Contains(links, TapName(a.Index)) {
			t.Errorf("kept VM %s lost its TAP", a.VMID)
		}
	}
	if n := len(rs.rulesOf("forward")); n != 2*len(list) {
		t.Errorf("%d jump rules in forward, want %d", n, 2*len(list))
	}
}

// flushHook runs before once, just before the first batch is sent.
type flushHook struct {
	nftConn
	before func()
}

func (f *flushHook) Flush() error {
	if f.before != nil {
		f.before()
		f.before = nil
	}
	return f.nftConn.Flush()
}

// TestTableRemovalWaitsForOtherManager: Manager A tears down its only VM,
// so it removes the table; just before that batch goes out, Manager B
// (another process, as far as the lock can tell) sets up a VM. B must end
// up with its rules: it waits for A's lock, or A would delete B's fresh
// rules with the table.
func TestTableRemovalWaitsForOtherManager(t *testing.T) {
	ns := newTestNS(t, "tablerace")
	allocs := FileAllocations(filepath.Join(t.TempDir(), "alloc.json"))
	a := newTestManager(t, ns, Config{Allocations: allocs})
	b := newTestManager(t, ns, Config{Allocations: allocs})
	ctx := context.Background()
	if _, err := a.Setup(ctx, "a1", Options{}); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	real := a.newNft
	a.newNft = func() (nftConn, error) {
		c, err := real()
		return &flushHook{nftConn: c, before: func() {
			go func() {
				_, err := b.Setup(ctx, "b1", Options{})
				done <- err
			}()
			// Give B every chance to get in first; with the lock it
			// cannot, and this wait only delays A.
			select {
			case err := <-done:
				done <- err
			case <-time.After(500 * time.Millisecond):
			}
		}}, err
	}
	if err := a.Teardown(ctx, "a1"); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	rs := ns.listRules(t)
	if rs.mentions("a1") || !rs.Chains[vmChainName("b1", roleOut)] || len(rs.rulesOf("forward")) != 2 {
		t.Errorf("after A's teardown and B's setup: chains %v", rs.Chains)
	}
}
