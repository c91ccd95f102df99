package network

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"

	"github.com/hyphae-run/hyphae/errcode"
)

// DefaultPool is the address pool used when Config.Pool is empty.
const DefaultPool = "172.16.0.0/16"

// TapPrefix starts the name of every link hyphae creates for a VM; the rest
// of the name is the lease index in decimal. Filters match the prefix as an
// interface-name wildcard, so no other software should use it.
const TapPrefix = "hyphae-tap"

// maxIndex bounds the lease index so that TapPrefix plus the index fits in
// the kernel's 15-byte interface names (IFNAMSIZ minus the NUL).
const maxIndex = 99999

// Pool is an IPv4 range carved into /30 subnets: lease index N owns the
// N-th /30, whose first usable address (.1 of a /30) is the host end of
// the TAP and whose second (.2) is the guest.
type Pool struct {
	prefix netip.Prefix
	size   int
}

// ParsePool parses an IPv4 CIDR such as "172.16.0.0/16". The prefix must be
// /30 or wider; its host bits must be zero.
func ParsePool(cidr string) (Pool, error) {
	p, err := netip.ParsePrefix(cidr)
	if err != nil {
		return Pool{}, errcode.Wrap(errcode.InvalidArgument, err, "address pool %q is not a CIDR", cidr)
	}
	if !p.Addr().Is4() {
		return Pool{}, errcode.New(errcode.InvalidArgument, "address pool %q is not IPv4", cidr)
	}
	if p.Bits() > 30 {
		return Pool{}, errcode.New(errcode.InvalidArgument, "address pool %q is narrower than one /30", cidr)
	}
	if p.Masked() != p {
		return Pool{}, errcode.New(errcode.InvalidArgument, "address pool %q has host bits set", cidr).
			WithHint("use " + p.Masked().String())
	}
	size := 1 << (30 - p.Bits())
	if size > maxIndex+1 {
		size = maxIndex + 1
	}
	return Pool{prefix: p, size: size}, nil
}

// Prefix returns the whole pool.
func (p Pool) Prefix() netip.Prefix { return p.prefix }

// Size returns how many leases the pool holds (capped at 100000 so TAP
// names stay within IFNAMSIZ).
func (p Pool) Size() int { return p.size }

// Lease is the addressing of one lease index.
type Lease struct {
	Index   int
	Subnet  netip.Prefix // the /30
	HostIP  netip.Addr   // .1 of the /30, on the host end of the TAP
	GuestIP netip.Addr   // .2 of the /30
	// MAC is the guest's address: 06:00 followed by the four bytes of
	// GuestIP. 0x06 has the locally-administered bit set and the multicast
	// bit clear, and distinct guest IPs give distinct MACs.
	MAC     net.HardwareAddr
	TapName string
}

// Lease returns the addressing of index, which must be in [0, Size()).
func (p Pool) Lease(index int) (Lease, error) {
	if index < 0 || index >= p.size {
		return Lease{}, errcode.New(errcode.InvalidArgument, "lease index %d outside pool %s (0..%d)", index, p.prefix, p.size-1)
	}
	base := p.prefix.Addr().As4()
	n := uint32(base[0])<<24 | uint32(base[1])<<16 | uint32(base[2])<<8 | uint32(base[3])
	n += uint32(index) * 4
	at := func(off uint32) netip.Addr {
		v := n + off
		return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
	}
	guest := at(2)
	g := guest.As4()
	return Lease{
		Index:   index,
		Subnet:  netip.PrefixFrom(at(0), 30),
		HostIP:  at(1),
		GuestIP: guest,
		MAC:     net.HardwareAddr{0x06, 0x00, g[0], g[1], g[2], g[3]},
		TapName: TapName(index),
	}, nil
}

// TapName returns the link name of lease index.
func TapName(index int) string { return TapPrefix + strconv.Itoa(index) }

// ParseTapName returns the lease index of a link named by TapName, and
// false for any other name (including non-canonical numbers like "07").
func ParseTapName(name string) (int, bool) {
	digits, ok := strings.CutPrefix(name, TapPrefix)
	if !ok || digits == "" || len(digits) > len(strconv.Itoa(maxIndex)) {
		return 0, false
	}
	n, err := strconv.Atoi(digits)
	if err != nil || n < 0 || strconv.Itoa(n) != digits {
		return 0, false
	}
	return n, true
}

// String returns the pool's CIDR.
func (p Pool) String() string { return fmt.Sprint(p.prefix) }
