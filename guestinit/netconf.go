package guestinit

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/hyphae-run/hyphae/errcode"
)

// cmdlineIP is the kernel's own network-configuration argument (see
// Documentation/admin-guide/nfs/nfsroot.rst), which network.GuestBootArgs
// writes. Kernels built with CONFIG_IP_PNP apply it before init starts;
// Debian's are not, so init applies its static form itself. Doing it again
// on a kernel that already did is harmless: every step replaces.
const cmdlineIP = "ip"

// defaultDevice is the interface ip= configures when it names none: the
// first NIC, as the kernel would pick it.
const defaultDevice = "eth0"

// deviceWait bounds the wait for the device to appear: a driver loaded
// from hyphae.modules registers it while probing, which may finish just
// after finit_module returns.
const deviceWait = 5 * time.Second

// ipConfig is the static configuration an ip= argument asks for.
type ipConfig struct {
	Addr    netip.Prefix // the client address with the netmask's length
	Gateway netip.Addr   // zero when none
	Device  string
}

// parseIPArg parses the value of ip=
// <client-ip>:<server-ip>:<gw-ip>:<netmask>:<hostname>:<device>:<autoconf>:<dns0>:<dns1>.
// ok is false when there is nothing static to configure: "off" or "none",
// or automatic configuration (dhcp, bootp, rarp, on, any), which only the
// kernel's IP_PNP can do. The hostname, server and DNS fields are not
// used: hyphae gives the DNS servers with guest.CmdlineDNS.
func parseIPArg(v string) (cfg ipConfig, ok bool, err error) {
	bad := func(format string, args ...any) (ipConfig, bool, error) {
		return ipConfig{}, false, errcode.New(errcode.InitFatal, "%s=%s: %s", cmdlineIP, v, fmt.Sprintf(format, args...))
	}
	f := strings.Split(v, ":")
	if len(f) == 1 {
		return ipConfig{}, false, nil // "off", "none" or an autoconf method
	}
	field := func(i int) string {
		if i < len(f) {
			return f[i]
		}
		return ""
	}
	switch field(6) {
	case "", "off", "none":
	default:
		return ipConfig{}, false, nil
	}
	client, err := netip.ParseAddr(field(0))
	if err != nil || !client.Is4() {
		return bad("client address %q is not IPv4", field(0))
	}
	maskIP := net.ParseIP(field(3)).To4()
	if maskIP == nil {
		return bad("netmask %q is not a dotted IPv4 mask", field(3))
	}
	ones, bits := net.IPMask(maskIP).Size()
	if bits != 32 {
		return bad("netmask %q is not contiguous", field(3))
	}
	cfg.Addr = netip.PrefixFrom(client, ones)
	if gw := field(2); gw != "" {
		if cfg.Gateway, err = netip.ParseAddr(gw); err != nil || !cfg.Gateway.Is4() {
			return bad("gateway %q is not IPv4", gw)
		}
	}
	cfg.Device = field(5)
	if cfg.Device == "" {
		cfg.Device = defaultDevice
	}
	if len(cfg.Device) > unix.IFNAMSIZ-1 || strings.ContainsAny(cfg.Device, "/ \x00") {
		return bad("device %q is not an interface name", cfg.Device)
	}
	return cfg, true, nil
}

// configureNetwork brings lo up, then gives cfg.Device its address,
// brings it up and routes everything else through the gateway, in the
// calling thread's network namespace. Each step replaces what is there.
func configureNetwork(cfg ipConfig, wait time.Duration, log *slog.Logger) error {
	fail := func(err error, format string, args ...any) error {
		return errcode.Wrap(errcode.InitFatal, err, "%s=: %s", cmdlineIP, fmt.Sprintf(format, args...))
	}
	// Only rtnetlink: NewHandle() with no families also opens XFRM and
	// netfilter sockets, which a guest kernel may lack.
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return fail(err, "cannot open a netlink socket")
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err != nil {
		return fail(err, "no loopback device")
	}
	if err := h.LinkSetUp(lo); err != nil {
		return fail(err, "cannot bring lo up")
	}
	link, err := waitForLink(h, cfg.Device, wait)
	if err != nil {
		return fail(err, "device %s did not appear within %v (is its driver in the kernel, or loaded with hyphae.modules=?)", cfg.Device, wait)
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: cfg.Addr.Addr().AsSlice(), Mask: net.CIDRMask(cfg.Addr.Bits(), 32)}}
	if err := h.AddrReplace(link, addr); err != nil {
		return fail(err, "cannot give %s the address %s", cfg.Device, cfg.Addr)
	}
	if err := h.LinkSetUp(link); err != nil {
		return fail(err, "cannot bring %s up", cfg.Device)
	}
	if cfg.Gateway.IsValid() {
		route := &netlink.Route{LinkIndex: link.Attrs().Index, Gw: cfg.Gateway.AsSlice(), Scope: netlink.SCOPE_UNIVERSE}
		if !cfg.Addr.Masked().Contains(cfg.Gateway) {
			// A gateway outside the subnet is reachable only if the
			// route says it is on the link.
			route.Flags = int(netlink.FLAG_ONLINK)
		}
		if err := h.RouteReplace(route); err != nil {
			return fail(err, "cannot route through the gateway %s", cfg.Gateway)
		}
	}
	log.Debug("network configured", "device", cfg.Device, "addr", cfg.Addr, "gateway", cfg.Gateway)
	return nil
}

// waitForLink polls for the named link until wait has passed.
func waitForLink(h *netlink.Handle, name string, wait time.Duration) (netlink.Link, error) {
	deadline := time.Now().Add(wait)
	for {
		link, err := h.LinkByName(name)
		var notFound netlink.LinkNotFoundError
		if err == nil || !errors.As(err, &notFound) || time.Now().After(deadline) {
			return link, err
		}
		time.Sleep(20 * time.Millisecond)
	}
}
