package network

import (
	"errors"
	"net"

	"github.com/vishvananda/netlink"

	"github.com/hyphae-run/hyphae/errcode"
)

// tapLink describes the link Setup creates for a lease: a persistent TAP
// that the VMM opens later by name. IFF_VNET_HDR and IFF_NO_PI match what
// Firecracker and QEMU ask for; multi-queue stays off because a TAP's
// multi-queue flag must match its opener's, and both VMMs open one queue.
// IFF_TUN_EXCL makes the kernel refuse, rather than attach to, an existing
// TAP of that name.
func tapLink(l Lease, o Options) netlink.Link {
	return &netlink.Tuntap{
		LinkAttrs: netlink.LinkAttrs{Name: l.TapName},
		Mode:      netlink.TUNTAP_MODE_TAP,
		Flags:     netlink.TUNTAP_TUN_EXCL | netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR,
		Owner:     o.UID,
		Group:     o.GID,
	}
}

// linkExists reports whether a link of that name exists.
func linkExists(h *netlink.Handle, name string) (netlink.Link, bool, error) {
	l, err := h.LinkByName(name)
	var nf netlink.LinkNotFoundError
	switch {
	case err == nil:
		return l, true, nil
	case errors.As(err, &nf):
		return nil, false, nil
	default:
		return nil, false, errcode.Wrap(errcode.NetlinkFailed, err, "looking up link %s", name)
	}
}

// createLink adds the lease's link, gives it the host address and brings it
// up. A name already in use is errcode.TapExists. On failure the link is
// removed again.
func createLink(h *netlink.Handle, l Lease, link netlink.Link) error {
	name := l.TapName
	taken := func() error {
		return errcode.New(errcode.TapExists, "link %s already exists", name).
			WithHint("another program uses the name, or a crashed hyphae left it: hyphae's start-up reclaim removes its own orphans")
	}
	if _, ok, err := linkExists(h, name); err != nil {
		return err
	} else if ok {
		return taken()
	}
	if err := h.LinkAdd(link); err != nil {
		// Someone may have created it since the check.
		if _, ok, _ := linkExists(h, name); ok {
			return taken()
		}
		return permissionCode(errcode.NetlinkFailed, err, "creating link "+name)
	}
	if err := configureLink(h, l); err != nil {
		_ = deleteLink(h, name)
		return err
	}
	return nil
}

// configureLink gives an existing link the lease's host address (if it
// lacks it) and sets it up.
func configureLink(h *netlink.Handle, l Lease) error {
	name := l.TapName
	link, ok, err := linkExists(h, name)
	if err != nil {
		return err
	}
	if !ok {
		return errcode.New(errcode.NetlinkFailed, "link %s vanished while being configured", name)
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: l.HostIP.AsSlice(), Mask: net.CIDRMask(l.Subnet.Bits(), 32)}}
	if err := h.AddrReplace(link, addr); err != nil {
		return permissionCode(errcode.NetlinkFailed, err, "adding "+addr.String()+" to "+name)
	}
	if err := h.LinkSetUp(link); err != nil {
		return permissionCode(errcode.NetlinkFailed, err, "setting "+name+" up")
	}
	return nil
}

// deleteLink removes the link; a missing one is not an error.
func deleteLink(h *netlink.Handle, name string) error {
	link, ok, err := linkExists(h, name)
	if err != nil || !ok {
		return err
	}
	if err := h.LinkDel(link); err != nil {
		return permissionCode(errcode.NetlinkFailed, err, "deleting link "+name)
	}
	return nil
}

// hyphaeLinks returns the lease index of every link named like a hyphae
// TAP.
func hyphaeLinks(h *netlink.Handle) (map[int]string, error) {
	links, err := h.LinkList()
	if err != nil {
		return nil, errcode.Wrap(errcode.NetlinkFailed, err, "listing links")
	}
	out := map[int]string{}
	for _, l := range links {
		if i, ok := ParseTapName(l.Attrs().Name); ok {
			out[i] = l.Attrs().Name
		}
	}
	return out, nil
}
