package network

import (
	"net/netip"
	"strconv"
	"strings"

	"github.com/hyphae-run/hyphae/errcode"
)

// Allow lets a guest reach a destination that the filter would otherwise
// block (the host itself, private ranges, the pool). Port 0 allows every
// protocol and port; a non-zero port allows TCP and UDP to that port only.
type Allow struct {
	Prefix netip.Prefix
	Port   uint16
}

// ParseAllow parses "CIDR[:PORT]" as given to --allow: "10.0.0.0/8:443",
// "192.168.1.10:53" (a bare address means /32) or "10.0.0.0/8" (all
// ports). Only IPv4 is accepted, since guests have no IPv6 addresses.
func ParseAllow(s string) (Allow, error) {
	bad := func(format string, args ...any) (Allow, error) {
		return Allow{}, errcode.New(errcode.InvalidArgument, "--allow %q: "+format, append([]any{s}, args...)...).
			WithHint("use CIDR[:PORT], e.g. 10.0.0.0/8:443")
	}
	addr, portText, hasPort := strings.Cut(s, ":")
	var port uint16
	if hasPort {
		n, err := strconv.ParseUint(portText, 10, 16)
		if err != nil || n == 0 || strconv.FormatUint(n, 10) != portText {
			return bad("port %q is not a number in 1..65535", portText)
		}
		port = uint16(n)
	}
	var prefix netip.Prefix
	if strings.Contains(addr, "/") {
		p, err := netip.ParsePrefix(addr)
		if err != nil {
			return bad("%v", err)
		}
		prefix = p
	} else {
		a, err := netip.ParseAddr(addr)
		if err != nil {
			return bad("%v", err)
		}
		prefix = netip.PrefixFrom(a, a.BitLen())
	}
	if !prefix.Addr().Is4() {
		return bad("only IPv4 destinations can be allowed")
	}
	if prefix.Masked() != prefix {
		return bad("host bits set (did you mean %s?)", prefix.Masked())
	}
	return Allow{Prefix: prefix, Port: port}, nil
}

// String renders a in the form ParseAllow reads.
func (a Allow) String() string {
	if a.Port == 0 {
		return a.Prefix.String()
	}
	return a.Prefix.String() + ":" + strconv.Itoa(int(a.Port))
}
