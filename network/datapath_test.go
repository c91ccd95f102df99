package network

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
)

// blockedWait bounds a connection attempt that the filter is expected to
// drop: a dropped SYN gets no answer, so only a deadline ends the attempt.
// The tests also check that the server saw nothing and that the expected
// drop rule counted the packets, so a slow success cannot pass as blocked.
const blockedWait = 1500 * time.Millisecond

// server accepts connections in a namespace and answers each with the
// address it saw the client at.
type server struct {
	ln   net.Listener
	mu   sync.Mutex
	seen []string // "local<-remote"
}

func listenIn(t *testing.T, ns *testNS, addr string) *server {
	t.Helper()
	s := &server{}
	ns.do(t, func() error {
		var err error
		s.ln, err = net.Listen("tcp4", addr)
		return err
	})
	t.Cleanup(func() { s.ln.Close() })
	go func() {
		for {
			c, err := s.ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.seen = append(s.seen, c.LocalAddr().String()+"<-"+c.RemoteAddr().String())
			s.mu.Unlock()
			fmt.Fprintf(c, "%s\n", c.RemoteAddr())
			c.Close()
		}
	}()
	return s
}

func (s *server) connections() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.seen...)
}

// dialFrom connects from ns to addr and returns what the server answered.
func dialFrom(t *testing.T, ns *testNS, addr string, timeout time.Duration) (string, error) {
	t.Helper()
	var reply string
	var dialErr error
	ns.do(t, func() error {
		c, err := net.DialTimeout("tcp4", addr, timeout)
		if err != nil {
			dialErr = err
			return nil
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		reply, dialErr = bufio.NewReader(c).ReadString('\n')
		reply = strings.TrimSpace(reply)
		return nil
	})
	return reply, dialErr
}

// topology is ns "host" (where the Manager works) with an uplink veth to
// ns "remote" (198.51.100.2/24, plus the private 10.99.0.1/24 and the
// link-local metadata address 169.254.169.254 reached through it), and one
// guest ns per VM whose eth0 is the peer of the veth
// that stands in for the VM's TAP.
type topology struct {
	host, remote *testNS
	guests       map[int]*testNS
	m            *Manager
}

// metadataIP is the link-local address clouds serve instance metadata on,
// the usual reason a guest must not reach 169.254.0.0/16.
const metadataIP = "169.254.169.254"

func newTopology(t *testing.T) *topology {
	tp := &topology{host: newTestNS(t, "host"), remote: newTestNS(t, "remote"), guests: map[int]*testNS{}}
	run(t, "ip", "-n", tp.host.name, "link", "add", "up0", "type", "veth", "peer", "name", "up0", "netns", tp.remote.name)
	tp.host.ip(t, "addr", "add", "198.51.100.1/24", "dev", "up0")
	tp.host.ip(t, "link", "set", "up0", "up")
	tp.remote.ip(t, "addr", "add", "198.51.100.2/24", "dev", "up0")
	tp.remote.ip(t, "addr", "add", "10.99.0.1/24", "dev", "up0")
	tp.remote.ip(t, "link", "set", "up0", "up")
	tp.remote.ip(t, "addr", "add", metadataIP+"/32", "dev", "up0")
	tp.host.ip(t, "route", "add", "10.99.0.0/24", "via", "198.51.100.2")
	tp.host.ip(t, "route", "add", metadataIP+"/32", "via", "198.51.100.2")
	// The remote has no route back to the pool: replies reach the guest
	// only if its address was masqueraded.

	tp.m = newTestManager(t, tp.host, Config{})
	tp.m.newLink = func(l Lease, _ Options) netlink.Link {
		return &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: l.TapName}, PeerName: "eth0",
			PeerNamespace: netlink.NsFd(int(tp.guests[l.Index].ns.handle))}
	}
	return tp
}

// nextLease is the lease the next addGuest will get, so that a guest's
// Allow entries can name its own host address.
func (tp *topology) nextLease(t *testing.T) Lease {
	t.Helper()
	l, err := tp.m.Pool().Lease(len(allocated(t, tp.m)))
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// addGuest sets up a VM whose guest end is a fresh namespace.
func (tp *topology) addGuest(t *testing.T, vmID string, opts Options) (*Attachment, *testNS) {
	t.Helper()
	g := newTestNS(t, "guest")
	next := len(allocated(t, tp.m)) // the lease Setup will pick in this test
	tp.guests[next] = g
	att, err := tp.m.Setup(context.Background(), vmID, opts)
	if err != nil {
		t.Fatal(err)
	}
	if att.Index != next {
		t.Fatalf("lease %d, expected %d", att.Index, next)
	}
	g.ip(t, "addr", "add", att.GuestIP.String()+"/30", "dev", "eth0")
	g.ip(t, "link", "set", "eth0", "up")
	g.ip(t, "route", "add", "default", "via", att.HostIP.String())
	return att, g
}

// dropCount sums the counters of drop rules in chain whose expression
// contains match.
func (tp *topology) dropCount(t *testing.T, chain, match string) int {
	n := 0
	for _, r := range tp.host.listRules(t).rulesOf(chain) {
		if strings.Contains(r.Expr, `"drop"`) && strings.Contains(r.Expr, match) {
			n += r.Packets
		}
	}
	return n
}

func TestDataPath(t *testing.T) {
	tp := newTopology(t)
	// g1 may reach one private service, one port of its own host address
	// and one port of the metadata address; g2 has no Allow entries.
	g1Host := netip.PrefixFrom(tp.nextLease(t).HostIP, 32)
	att, guest := tp.addGuest(t, "g1", Options{Allow: []Allow{
		{Prefix: netip.MustParsePrefix("10.99.0.1/32"), Port: 8443},
		{Prefix: g1Host, Port: 9191},
		{Prefix: netip.MustParsePrefix(metadataIP + "/32"), Port: 80},
	}})
	att2, guest2 := tp.addGuest(t, "g2", Options{})

	public := listenIn(t, tp.remote, "0.0.0.0:8080")
	private := listenIn(t, tp.remote, "0.0.0.0:8443")
	metadata := listenIn(t, tp.remote, "0.0.0.0:80")
	hostSvc := listenIn(t, tp.host, "0.0.0.0:9090")
	hostAllowed := listenIn(t, tp.host, "0.0.0.0:9191")
	inGuest := listenIn(t, guest, "0.0.0.0:7070")
	inGuest2 := listenIn(t, guest2, "0.0.0.0:7070")
	guests := map[string]*testNS{"g1": guest, "g2": guest2}

	t.Run("masquerade to a public address", func(t *testing.T) {
		reply, err := dialFrom(t, guest, "198.51.100.2:8080", 10*time.Second)
		if err != nil {
			t.Fatalf("guest → remote: %v", err)
		}
		if host, _, _ := net.SplitHostPort(reply); host != "198.51.100.1" {
			t.Errorf("remote saw the guest as %q, want the masqueraded 198.51.100.1", reply)
		}
	})

	const linkLocal = `"169.254.0.0","len":16`
	blocked := []struct {
		name, from, addr string
		server           *server
		chain, rule      string
	}{
		// g1 is allowed port 9191 of this address, not 9090.
		{"guest to host address", "g1", att.HostIP.String() + ":9090", hostSvc, "vm-g1-host", `"drop"`},
		{"guest to host uplink address", "g1", "198.51.100.1:9090", hostSvc, "vm-g1-host", `"drop"`},
		// g1's host Allow names its own host address, not the host as a
		// whole.
		{"guest to allowed port of another host address", "g1", att2.HostIP.String() + ":9191", hostAllowed, "vm-g1-host", `"drop"`},
		{"unallowed guest to host address", "g2", att2.HostIP.String() + ":9191", hostAllowed, "vm-g2-host", `"drop"`},
		{"guest to RFC 1918", "g1", "10.99.0.1:8080", public, "vm-g1-out", `"10.0.0.0","len":8`},
		// Both guests' chains would drop this; the receiver's in chain is
		// evaluated first.
		{"guest to another guest", "g1", att2.GuestIP.String() + ":7070", inGuest2, "vm-g2-in", `"drop"`},
		{"unallowed guest to RFC 1918", "g2", "10.99.0.1:8443", private, "vm-g2-out", `"10.0.0.0","len":8`},
		{"guest to link-local", "g1", metadataIP + ":8080", public, "vm-g1-out", linkLocal},
		{"unallowed guest to link-local", "g2", metadataIP + ":80", metadata, "vm-g2-out", linkLocal},
	}
	for _, b := range blocked {
		t.Run(b.name, func(t *testing.T) {
			before, seenBefore := tp.dropCount(t, b.chain, b.rule), len(b.server.connections())
			if reply, err := dialFrom(t, guests[b.from], b.addr, blockedWait); err == nil {
				t.Fatalf("connected to %s (reply %q); want it blocked", b.addr, reply)
			}
			if after := tp.dropCount(t, b.chain, b.rule); after <= before {
				t.Errorf("drop counter of %s %s stayed at %d: not dropped by the expected rule", b.chain, b.rule, after)
			}
			if got := b.server.connections(); len(got) != seenBefore {
				t.Errorf("server saw %v", got)
			}
		})
	}

	allowed := []struct {
		name, addr string
		server     *server
		seenAs     string // the client address the server should see
	}{
		{"allowed CIDR:PORT passes", "10.99.0.1:8443", private, "198.51.100.1"},
		// Traffic to the host is not masqueraded.
		{"allowed host address:PORT passes", att.HostIP.String() + ":9191", hostAllowed, att.GuestIP.String()},
		{"allowed link-local:PORT passes", metadataIP + ":80", metadata, "198.51.100.1"},
	}
	for _, a := range allowed {
		t.Run(a.name, func(t *testing.T) {
			seenBefore := len(a.server.connections())
			reply, err := dialFrom(t, guest, a.addr, 10*time.Second)
			if err != nil {
				t.Fatalf("allowed %s: %v", a.addr, err)
			}
			if host, _, _ := net.SplitHostPort(reply); host != a.seenAs {
				t.Errorf("server saw the guest as %q, want %s", reply, a.seenAs)
			}
			if got := a.server.connections(); len(got) != seenBefore+1 {
				t.Errorf("server saw %v, want one more connection than %d", got, seenBefore)
			}
		})
	}

	t.Run("host reaches the guest", func(t *testing.T) {
		reply, err := dialFrom(t, tp.host, att.GuestIP.String()+":7070", 10*time.Second)
		if err != nil {
			t.Fatalf("host → guest: %v", err)
		}
		if host, _, _ := net.SplitHostPort(reply); host != att.HostIP.String() {
			t.Errorf("guest saw the host as %q", reply)
		}
		if len(inGuest.connections()) != 1 {
			t.Errorf("guest server saw %v", inGuest.connections())
		}
	})

	t.Run("new connections into a guest are dropped", func(t *testing.T) {
		// The remote routes the pool through the host; without the filter
		// the host would forward this SYN to the guest.
		tp.remote.ip(t, "route", "add", att.Subnet.String(), "via", "198.51.100.1")
		defer tp.remote.ip(t, "route", "del", att.Subnet.String(), "via", "198.51.100.1")
		before := tp.dropCount(t, "vm-g1-in", `"drop"`)
		if _, err := dialFrom(t, tp.remote, att.GuestIP.String()+":7070", blockedWait); err == nil {
			t.Fatal("remote opened a connection into the guest")
		}
		if tp.dropCount(t, "vm-g1-in", `"drop"`) <= before {
			t.Error("not dropped by vm-g1-in")
		}
	})

	t.Run("teardown removes the path", func(t *testing.T) {
		if err := tp.m.Teardown(context.Background(), "g1"); err != nil {
			t.Fatal(err)
		}
		if tp.host.hasLink(t, att.TapName) || tp.host.listRules(t).mentions("g1") {
			t.Error("link or rules left after Teardown")
		}
		// The other guest is untouched.
		if _, err := dialFrom(t, guest2, "198.51.100.2:8080", 10*time.Second); err != nil {
			t.Errorf("g2 lost its network: %v", err)
		}
	})
}
