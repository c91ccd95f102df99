package network

import (
	"encoding/binary"
	"maps"
	"net/netip"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"

	"github.com/hyphae-run/hyphae/errcode"
)

// TableName is the nftables table (family inet) hyphae owns. Nothing
// outside it is ever changed.
const TableName = "hyphae"

// Base chains of the table. They hold only per-VM jump rules, so adding
// them again is a no-op; the table goes with the last VM.
var (
	table           = &nftables.Table{Family: nftables.TableFamilyINet, Name: TableName}
	forwardChain    = baseChain("forward", nftables.ChainTypeFilter, nftables.ChainHookForward, nftables.ChainPriorityFilter)
	inputChain      = baseChain("input", nftables.ChainTypeFilter, nftables.ChainHookInput, nftables.ChainPriorityFilter)
	postroutingNAT  = baseChain("postrouting", nftables.ChainTypeNAT, nftables.ChainHookPostrouting, nftables.ChainPriorityNATSource)
	baseChains      = []*nftables.Chain{forwardChain, inputChain, postroutingNAT}
	acceptPolicy    = nftables.ChainPolicyAccept
	blockedPrefixes = []netip.Prefix{
		netip.MustParsePrefix("0.0.0.0/8"),
		netip.MustParsePrefix("10.0.0.0/8"),
		netip.MustParsePrefix("100.64.0.0/10"),
		netip.MustParsePrefix("127.0.0.0/8"),
		netip.MustParsePrefix("169.254.0.0/16"),
		netip.MustParsePrefix("172.16.0.0/12"),
		netip.MustParsePrefix("192.168.0.0/16"),
		netip.MustParsePrefix("224.0.0.0/4"),
		netip.MustParsePrefix("240.0.0.0/4"),
	}
)

func baseChain(name string, typ nftables.ChainType, hook *nftables.ChainHook, prio *nftables.ChainPriority) *nftables.Chain {
	return &nftables.Chain{Table: table, Name: name, Type: typ, Hooknum: hook, Priority: prio, Policy: &acceptPolicy}
}

// nftConn is the part of *nftables.Conn the rules code uses; tests wrap it
// to make a batch fail inside the kernel.
type nftConn interface {
	AddTable(*nftables.Table) *nftables.Table
	AddChain(*nftables.Chain) *nftables.Chain
	FlushChain(*nftables.Chain)
	DelChain(*nftables.Chain)
	DelTable(*nftables.Table)
	AddRule(*nftables.Rule) *nftables.Rule
	InsertRule(*nftables.Rule) *nftables.Rule
	DelRule(*nftables.Rule) error
	ListChainsOfTableFamily(nftables.TableFamily) ([]*nftables.Chain, error)
	GetRules(*nftables.Table, *nftables.Chain) ([]*nftables.Rule, error)
	Flush() error
}

// Per-VM chains, named "vm-<id>-<role>". The VM id is validated to be a
// legal part of a chain name (see validVMID).
const (
	roleOut  = "out"  // FORWARD, from the guest
	roleIn   = "in"   // FORWARD, to the guest
	roleHost = "host" // INPUT, from the guest to the host itself
	roleNAT  = "nat"  // POSTROUTING, masquerade of the guest's address
)

func vmChainName(vmID, role string) string { return "vm-" + vmID + "-" + role }

// vmIDOfChain returns the VM id of a per-VM chain name.
func vmIDOfChain(name string) (string, bool) {
	rest, ok := strings.CutPrefix(name, "vm-")
	if !ok {
		return "", false
	}
	i := strings.LastIndexByte(rest, '-')
	if i <= 0 {
		return "", false
	}
	switch rest[i+1:] {
	case roleOut, roleIn, roleHost, roleNAT:
		return rest[:i], true
	}
	return "", false
}

// vmTag is the comment on each jump rule, which is how a VM's rules in the
// shared base chains are found again.
func vmTag(vmID string) []byte {
	return userdata.AppendString(nil, userdata.TypeComment, "hyphae vm "+vmID)
}

// vmPlan is what the filter needs to know about one VM.
type vmPlan struct {
	vmID   string
	lease  Lease
	allow  []Allow
	nat    bool
	uplink string       // masquerade only out of this link; "" = any non-TAP link
	pool   netip.Prefix // blocked like the private ranges
}

// nftState is the part of the table that concerns one VM, as found in the
// kernel before changing it.
type nftState struct {
	chains map[string]bool // every chain name in the table
	jumps  []*nftables.Rule
}

func readState(c nftConn, vmID string) (nftState, error) {
	st := nftState{chains: map[string]bool{}}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return st, errcode.Wrap(errcode.NftFailed, err, "listing nftables chains")
	}
	for _, ch := range chains {
		if ch.Table.Name == TableName {
			st.chains[ch.Name] = true
		}
	}
	if vmID == "" {
		return st, nil
	}
	tag := vmTag(vmID)
	for _, bc := range baseChains {
		if !st.chains[bc.Name] {
			continue
		}
		rules, err := c.GetRules(table, bc)
		if err != nil {
			return st, errcode.Wrap(errcode.NftFailed, err, "listing rules of chain %s", bc.Name)
		}
		for _, r := range rules {
			if slices.Equal(r.UserData, tag) {
				r.Table, r.Chain = table, bc
				st.jumps = append(st.jumps, r)
			}
		}
	}
	return st, nil
}

// hasVM reports whether any of the VM's chains exist.
func (st nftState) hasVM(vmID string) bool {
	for _, role := range []string{roleOut, roleIn, roleHost, roleNAT} {
		if st.chains[vmChainName(vmID, role)] {
			return true
		}
	}
	return false
}

// installVM makes the VM's rules exactly what p describes, in one batch: the
// kernel applies an nftables batch atomically, so a failure anywhere leaves
// the ruleset as it was. Running it again replaces the VM's rules rather
// than adding copies. It reports whether the VM had rules before.
func installVM(c nftConn, p vmPlan) (bool, error) {
	st, err := readState(c, p.vmID)
	if err != nil {
		return false, err
	}
	c.AddTable(table)
	for _, bc := range baseChains {
		c.AddChain(bc)
	}
	chain := func(role string) *nftables.Chain {
		ch := c.AddChain(&nftables.Chain{Table: table, Name: vmChainName(p.vmID, role)})
		if st.chains[ch.Name] {
			c.FlushChain(ch)
		}
		return ch
	}
	rule := func(ch *nftables.Chain, exprs ...[]expr.Any) {
		c.AddRule(&nftables.Rule{Table: table, Chain: ch, Exprs: slices.Concat(exprs...)})
	}
	guest := p.lease.GuestIP

	// Common start of the chains that see the guest's own packets: IPv4
	// only, its own source address only, replies always.
	guestPrologue := func(ch *nftables.Chain) {
		rule(ch, notIPv4(), counterDrop())
		rule(ch, addrMatch(srcOffset, netip.PrefixFrom(guest, 32), expr.CmpOpNeq), counterDrop())
		rule(ch, ctEstablished(), accept())
		for _, a := range p.allow {
			for _, m := range allowMatches(a) {
				rule(ch, m, accept())
			}
		}
	}

	out := chain(roleOut)
	guestPrologue(out)
	for _, bp := range blockedFor(p.pool) {
		rule(out, addrMatch(dstOffset, bp, expr.CmpOpEq), counterDrop())
	}
	rule(out, accept())

	host := chain(roleHost)
	guestPrologue(host)
	rule(host, counterDrop())

	in := chain(roleIn)
	rule(in, ctEstablished(), accept())
	rule(in, counterDrop())

	var nat *nftables.Chain
	if p.nat {
		nat = chain(roleNAT)
		if p.uplink != "" {
			rule(nat, ifname(expr.MetaKeyOIFNAME, p.uplink, expr.CmpOpEq), masquerade())
		} else {
			rule(nat, ifnamePrefix(expr.MetaKeyOIFNAME, TapPrefix, expr.CmpOpNeq), masquerade())
		}
	}

	for _, j := range st.jumps {
		if err := c.DelRule(j); err != nil {
			return false, errcode.Wrap(errcode.NftFailed, err, "removing an old jump rule of VM %s", p.vmID)
		}
	}
	if stale := vmChainName(p.vmID, roleNAT); nat == nil && st.chains[stale] {
		// NAT was on in an earlier Setup of this VM; its jump is gone now.
		ch := &nftables.Chain{Table: table, Name: stale}
		c.FlushChain(ch)
		c.DelChain(ch)
	}
	tap := p.lease.TapName
	jump := func(add func(*nftables.Rule) *nftables.Rule, from, to *nftables.Chain, match ...[]expr.Any) {
		add(&nftables.Rule{Table: table, Chain: from, UserData: vmTag(p.vmID),
			Exprs: append(slices.Concat(match...), &expr.Verdict{Kind: expr.VerdictJump, Chain: to.Name})})
	}
	// Jumps into the "to the guest" chains go first in forward: an accept
	// in one guest's out chain ends the base chain, so if they came after
	// it, another guest's in chain would never see traffic between guests.
	jump(c.InsertRule, forwardChain, in, ifname(expr.MetaKeyOIFNAME, tap, expr.CmpOpEq))
	jump(c.AddRule, forwardChain, out, ifname(expr.MetaKeyIIFNAME, tap, expr.CmpOpEq))
	jump(c.AddRule, inputChain, host, ifname(expr.MetaKeyIIFNAME, tap, expr.CmpOpEq))
	if nat != nil {
		jump(c.AddRule, postroutingNAT, nat, addrMatch(srcOffset, netip.PrefixFrom(guest, 32), expr.CmpOpEq))
	}
	if err := c.Flush(); err != nil {
		return false, permissionCode(errcode.NftFailed, err, "installing the nftables rules of VM "+p.vmID)
	}
	return st.hasVM(p.vmID), nil
}

// removeVM deletes the VM's jump rules and chains, and the whole table
// when no other VM has rules in it; it is a no-op when there is nothing to
// delete. Callers hold the namespace lock, so no other hyphae process can
// be adding a VM in between.
func removeVM(c nftConn, vmID string) error {
	st, err := readState(c, vmID)
	if err != nil {
		return err
	}
	others := slices.ContainsFunc(slices.Collect(maps.Keys(st.chains)), func(name string) bool {
		id, ok := vmIDOfChain(name)
		return ok && id != vmID
	})
	if !others {
		if len(st.chains) == 0 {
			return nil // no table
		}
		c.DelTable(table)
		if err := c.Flush(); err != nil {
			return permissionCode(errcode.NftFailed, err, "removing the nftables table with the rules of VM "+vmID)
		}
		return nil
	}
	if len(st.jumps) == 0 && !st.hasVM(vmID) {
		return nil
	}
	for _, j := range st.jumps {
		if err := c.DelRule(j); err != nil {
			return errcode.Wrap(errcode.NftFailed, err, "removing a jump rule of VM %s", vmID)
		}
	}
	for _, role := range []string{roleOut, roleIn, roleHost, roleNAT} {
		if name := vmChainName(vmID, role); st.chains[name] {
			ch := &nftables.Chain{Table: table, Name: name}
			c.FlushChain(ch)
			c.DelChain(ch)
		}
	}
	if err := c.Flush(); err != nil {
		return permissionCode(errcode.NftFailed, err, "removing the nftables rules of VM "+vmID)
	}
	return nil
}

// vmsWithRules returns the ids of VMs that have chains in the table.
func vmsWithRules(c nftConn) ([]string, error) {
	st, err := readState(c, "")
	if err != nil {
		return nil, err
	}
	var ids []string
	for name := range st.chains {
		if id, ok := vmIDOfChain(name); ok && !slices.Contains(ids, id) {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	return ids, nil
}

// blockedFor returns the destinations a guest may not reach: the private,
// shared, loopback, link-local, multicast and reserved ranges, plus the
// pool when it lies outside them.
func blockedFor(pool netip.Prefix) []netip.Prefix {
	for _, b := range blockedPrefixes {
		if b.Bits() <= pool.Bits() && b.Contains(pool.Addr()) {
			return blockedPrefixes
		}
	}
	return append(slices.Clone(blockedPrefixes), pool)
}

// Offsets of the addresses in the IPv4 header.
const (
	srcOffset = 12
	dstOffset = 16
)

func isIPv4() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.NFPROTO_IPV4}},
	}
}

func notIPv4() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{unix.NFPROTO_IPV4}},
	}
}

// addrMatch compares the IPv4 address at offset with p. It starts with an
// IPv4 check, which an inet table needs before reading IPv4 header fields
// and which lets `nft list` print "ip daddr 10.0.0.0/8".
func addrMatch(offset uint32, p netip.Prefix, op expr.CmpOp) []expr.Any {
	if p.Bits() == 0 {
		return isIPv4() // every address
	}
	a := p.Addr().As4()
	e := append(isIPv4(), &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: 4})
	if p.Bits() < 32 {
		mask := binary.BigEndian.AppendUint32(nil, ^uint32(0)<<(32-p.Bits()))
		e = append(e, &expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: make([]byte, 4)})
	}
	return append(e, &expr.Cmp{Op: op, Register: 1, Data: a[:]})
}

// allowMatches returns one match per rule an Allow needs: the destination
// alone, or the destination with a TCP and a UDP port.
func allowMatches(a Allow) [][]expr.Any {
	dst := addrMatch(dstOffset, a.Prefix, expr.CmpOpEq)
	if a.Port == 0 {
		return [][]expr.Any{dst}
	}
	var out [][]expr.Any
	for _, proto := range []byte{unix.IPPROTO_TCP, unix.IPPROTO_UDP} {
		out = append(out, slices.Concat(dst, []expr.Any{
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(a.Port)},
		}))
	}
	return out
}

// ifname matches a whole interface name (NUL-padded to IFNAMSIZ, as the
// kernel stores it).
func ifname(key expr.MetaKey, name string, op expr.CmpOp) []expr.Any {
	data := make([]byte, unix.IFNAMSIZ)
	copy(data, name)
	return []expr.Any{&expr.Meta{Key: key, Register: 1}, &expr.Cmp{Op: op, Register: 1, Data: data}}
}

// ifnamePrefix matches names starting with prefix: comparing fewer bytes
// than IFNAMSIZ is how nft expresses the "prefix*" wildcard.
func ifnamePrefix(key expr.MetaKey, prefix string, op expr.CmpOp) []expr.Any {
	return []expr.Any{&expr.Meta{Key: key, Register: 1}, &expr.Cmp{Op: op, Register: 1, Data: []byte(prefix)}}
}

func ctEstablished() []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED),
			Xor:  binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(0)},
	}
}

// counterDrop drops and counts, so an operator (and the tests) can see what
// a guest tried.
func counterDrop() []expr.Any {
	return []expr.Any{&expr.Counter{}, &expr.Verdict{Kind: expr.VerdictDrop}}
}

func accept() []expr.Any { return []expr.Any{&expr.Verdict{Kind: expr.VerdictAccept}} }

func masquerade() []expr.Any { return []expr.Any{&expr.Masq{}} }
