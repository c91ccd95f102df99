package network

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"regexp"
	"slices"
	"sync"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/hyphae-run/hyphae/errcode"
)

// cleanupTimeout bounds the rollback of a failed Setup.
const cleanupTimeout = 30 * time.Second

// DefaultDNS is the guest's resolver when Config.DNS is empty.
var DefaultDNS = []netip.Addr{netip.MustParseAddr("1.1.1.1"), netip.MustParseAddr("8.8.8.8")}

// Config configures a Manager.
type Config struct {
	// Pool is the IPv4 CIDR leases are carved from; "" means DefaultPool.
	Pool string
	// Allocations records which VM holds which lease. Required.
	Allocations Allocations
	// NetNSPath is a network namespace (e.g. /var/run/netns/x) to work in;
	// "" means the process's own.
	NetNSPath string
	// DNS servers handed to guests; nil means DefaultDNS. Guests may always
	// reach them on port 53, even when they are private addresses.
	DNS []netip.Addr
	// Uplink, when set, is the only link guest traffic is masqueraded out
	// of; otherwise any link that is not a hyphae TAP.
	Uplink string
	// Logger receives what changed on the host; nil means slog.Default().
	Logger *slog.Logger
}

// Options are per-VM settings for Setup.
type Options struct {
	// UID and GID own the TAP so an unprivileged VMM (the jailer's user) can
	// open it. The zero value, root, needs CAP_NET_ADMIN to open it.
	UID, GID uint32
	// Allow lets the guest reach otherwise blocked destinations.
	Allow []Allow
	// NoNAT skips masquerading (and enabling ip_forward): the guest then
	// talks to its host's TAP address only, within the filter's limits.
	NoNAT bool
}

// Attachment is a VM's network as Setup made it.
type Attachment struct {
	VMID string
	Lease
	DNS []netip.Addr
	// BootArgs are the kernel command-line tokens for the guest (see
	// GuestBootArgs).
	BootArgs string
	// ForwardingEnabled reports that this Setup switched
	// net.ipv4.ip_forward on. It is not switched off again (see the
	// package documentation).
	ForwardingEnabled bool
}

// Manager sets up and tears down VM networks on one host (or in one network
// namespace). It is safe for concurrent use.
type Manager struct {
	pool   Pool
	allocs Allocations
	ns     *namespace
	dns    []netip.Addr
	uplink string
	log    *slog.Logger

	mu sync.Mutex // serializes this process's changes to links and rules

	// Seams for tests: the link a lease gets, the nftables connection, and
	// a hook called before each Setup step that may fail it.
	newLink    func(Lease, Options) netlink.Link
	newNft     func() (nftConn, error)
	beforeStep func(step string) error
}

// New returns a Manager for cfg. Close releases its namespace handle.
func New(cfg Config) (*Manager, error) {
	if cfg.Allocations == nil {
		return nil, errcode.New(errcode.InvalidArgument, "network: Config.Allocations is required")
	}
	poolText := cfg.Pool
	if poolText == "" {
		poolText = DefaultPool
	}
	pool, err := ParsePool(poolText)
	if err != nil {
		return nil, err
	}
	dns := cfg.DNS
	if dns == nil {
		dns = DefaultDNS
	}
	for _, d := range dns {
		if !d.Is4() {
			return nil, errcode.New(errcode.InvalidArgument, "DNS server %s is not IPv4", d)
		}
	}
	if cfg.Uplink != "" {
		if _, isTap := ParseTapName(cfg.Uplink); isTap || len(cfg.Uplink) >= 16 {
			return nil, errcode.New(errcode.InvalidArgument, "uplink %q is not a usable interface name", cfg.Uplink)
		}
	}
	ns, err := openNamespace(cfg.NetNSPath)
	if err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	m := &Manager{
		pool: pool, allocs: cfg.Allocations, ns: ns, dns: slices.Clone(dns), uplink: cfg.Uplink,
		log:        log.With("component", "network"),
		newLink:    tapLink,
		beforeStep: func(string) error { return nil },
	}
	m.newNft = ns.nft
	return m, nil
}

// Close releases the namespace handle. It does not tear anything down.
func (m *Manager) Close() error { return m.ns.close() }

// Pool returns the manager's address pool.
func (m *Manager) Pool() Pool { return m.pool }

// validVMID keeps VM ids usable in chain names and comments.
var validVMID = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

func checkVMID(vmID string) error {
	if !validVMID.MatchString(vmID) {
		return errcode.New(errcode.InvalidArgument, "VM id %q: want 1-64 letters, digits, '_', '.', '-', starting with a letter or digit", vmID)
	}
	return nil
}

// Setup gives vmID a lease, its TAP and its filter and NAT rules, and
// enables IPv4 forwarding when NAT needs it. Calling it again for the same
// VM returns the same lease and replaces the VM's rules with ones built
// from opts. When a step fails, what this call created is removed again
// (the lease released, the TAP deleted, the rules removed) and the error
// carries a code.
func (m *Manager) Setup(ctx context.Context, vmID string, opts Options) (att *Attachment, err error) {
	if err := checkVMID(vmID); err != nil {
		return nil, err
	}
	for _, a := range opts.Allow {
		if !a.Prefix.IsValid() || !a.Prefix.Addr().Is4() || a.Prefix.Masked() != a.Prefix {
			return nil, errcode.New(errcode.InvalidArgument, "allow entry %s is not an IPv4 CIDR", a)
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	log := m.log.With("vm", vmID)

	var undo []func() error
	defer func() {
		if err == nil {
			return
		}
		for _, u := range slices.Backward(undo) {
			if uerr := u(); uerr != nil {
				log.Error("network: rolling back a failed setup", "err", uerr)
				err = errors.Join(err, uerr)
			}
		}
	}()
	step := m.beforeStep
	// Rollback must run even when ctx is what ended Setup, but still within
	// a bound.
	cleanup := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
	}

	// 1. The lease. An existing allocation means an earlier Setup of this
	// VM, whose TAP and rules are reused.
	existing, err := m.allocs.List(ctx)
	if err != nil {
		return nil, err
	}
	resumed := slices.ContainsFunc(existing, func(a Allocation) bool { return a.VMID == vmID })
	if err := step("allocate"); err != nil {
		return nil, err
	}
	index, err := m.allocs.Allocate(ctx, vmID, m.pool.Size())
	if err != nil {
		return nil, err
	}
	if !resumed {
		undo = append(undo, func() error {
			ctx, cancel := cleanup()
			defer cancel()
			return m.allocs.Release(ctx, vmID)
		})
	}
	lease, err := m.pool.Lease(index)
	if err != nil {
		return nil, err
	}
	log = log.With("tap", lease.TapName, "guest_ip", lease.GuestIP)

	// 2. The TAP.
	if err := step("link"); err != nil {
		return nil, err
	}
	err = m.ns.run(func(h *netlink.Handle) error {
		if _, ok, err := linkExists(h, lease.TapName); err != nil {
			return err
		} else if ok && resumed {
			return configureLink(h, lease)
		}
		if err := createLink(h, lease, m.newLink(lease, opts)); err != nil {
			return err
		}
		undo = append(undo, func() error {
			return m.ns.run(func(h *netlink.Handle) error { return deleteLink(h, lease.TapName) })
		})
		return nil
	})
	if err != nil {
		return nil, err
	}

	// 3. Filter and NAT rules, one atomic batch.
	if err := step("rules"); err != nil {
		return nil, err
	}
	plan := vmPlan{vmID: vmID, lease: lease, allow: m.allowWithDNS(opts.Allow), nat: !opts.NoNAT, uplink: m.uplink, pool: m.pool.Prefix()}
	hadRules := false
	err = m.withRules(ctx, func(c nftConn) (err error) {
		hadRules, err = installVM(c, plan)
		return err
	})
	if err != nil {
		return nil, err
	}
	if !hadRules {
		undo = append(undo, func() error {
			ctx, cancel := cleanup()
			defer cancel()
			return m.withRules(ctx, func(c nftConn) error { return removeVM(c, vmID) })
		})
	}

	// 4. Forwarding, which NAT needs.
	att = &Attachment{VMID: vmID, Lease: lease, DNS: slices.Clone(m.dns), BootArgs: GuestBootArgs(lease, m.dns)}
	if !opts.NoNAT {
		if err := step("forwarding"); err != nil {
			return nil, err
		}
		changed, err := m.ns.enableForwarding()
		if err != nil {
			return nil, err
		}
		if changed {
			log.Info("network: enabled net.ipv4.ip_forward (it stays on)")
		}
		att.ForwardingEnabled = changed
	}
	log.Info("network: set up", "nat", !opts.NoNAT, "allow", len(opts.Allow), "resumed", resumed)
	return att, nil
}

// allowWithDNS adds port 53 of each DNS server to allow.
func (m *Manager) allowWithDNS(allow []Allow) []Allow {
	out := slices.Clone(allow)
	for _, d := range m.dns {
		out = append(out, Allow{Prefix: netip.PrefixFrom(d, 32), Port: 53})
	}
	return out
}

// Teardown removes vmID's rules and TAP and releases its lease. Tearing
// down a VM that has none of them is not an error.
func (m *Manager) Teardown(ctx context.Context, vmID string) error {
	if err := checkVMID(vmID); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.teardown(ctx, vmID)
}

// teardown removes in the reverse order of Setup, so that anything left
// after a crash still has its allocation and Reclaim can find it.
func (m *Manager) teardown(ctx context.Context, vmID string) error {
	if err := m.withRules(ctx, func(c nftConn) error { return removeVM(c, vmID) }); err != nil {
		return err
	}
	list, err := m.allocs.List(ctx)
	if err != nil {
		return err
	}
	i := slices.IndexFunc(list, func(a Allocation) bool { return a.VMID == vmID })
	if i < 0 {
		return nil
	}
	name := TapName(list[i].Index)
	if err := m.ns.run(func(h *netlink.Handle) error { return deleteLink(h, name) }); err != nil {
		return err
	}
	if err := m.allocs.Release(ctx, vmID); err != nil {
		return err
	}
	m.log.Info("network: torn down", "vm", vmID, "tap", name)
	return nil
}

// Reclaim removes what VMs that are gone left behind: allocations whose VM
// live reports false (with their TAPs and rules), TAPs with no allocation,
// and rules of VMs with no allocation. Run it at start-up, before serving;
// live must report true for VMs that another process is still setting up.
func (m *Manager) Reclaim(ctx context.Context, live func(vmID string) bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	var errs []error
	list, err := m.allocs.List(ctx)
	if err != nil {
		return err
	}
	kept := map[string]int{}
	for _, a := range list {
		if live(a.VMID) {
			kept[a.VMID] = a.Index
			continue
		}
		m.log.Info("network: reclaiming the network of a VM that is gone", "vm", a.VMID, "index", a.Index)
		if err := m.teardown(ctx, a.VMID); err != nil {
			errs = append(errs, err)
			kept[a.VMID] = a.Index // still allocated
		}
	}
	keptIndex := map[int]bool{}
	for _, i := range kept {
		keptIndex[i] = true
	}
	err = m.ns.run(func(h *netlink.Handle) error {
		links, err := hyphaeLinks(h)
		if err != nil {
			return err
		}
		for i, name := range links {
			if keptIndex[i] {
				continue
			}
			m.log.Info("network: removing an orphaned TAP", "tap", name)
			if err := deleteLink(h, name); err != nil {
				errs = append(errs, err)
			}
		}
		return nil
	})
	if err != nil {
		errs = append(errs, err)
	}
	err = m.withRules(ctx, func(c nftConn) error {
		ids, err := vmsWithRules(c)
		if err != nil {
			return err
		}
		for _, id := range ids {
			if _, ok := kept[id]; ok {
				continue
			}
			m.log.Info("network: removing orphaned rules", "vm", id)
			if err := removeVM(c, id); err != nil {
				errs = append(errs, err)
			}
		}
		return nil
	})
	return errors.Join(append(errs, err)...)
}

// withRules runs fn with an nftables connection while holding the
// namespace lock.
func (m *Manager) withRules(ctx context.Context, fn func(nftConn) error) error {
	lock, err := m.ns.lock(ctx)
	if err != nil {
		return err
	}
	defer lock.Close()
	c, err := m.newNft()
	if err != nil {
		return err
	}
	return fn(c)
}
