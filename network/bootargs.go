package network

import (
	"net"
	"net/netip"
	"strings"

	"github.com/hyphae-run/hyphae/guest"
)

// GuestDevice is the guest interface the ip= argument configures: the first
// (and only) virtio-net device.
const GuestDevice = "eth0"

// GuestBootArgs returns the kernel command-line tokens configuring the
// guest's network: the kernel's static "ip=" argument (format of
// Documentation/admin-guide/nfs/nfsroot.rst:
// ip=<client-ip>:<server-ip>:<gw-ip>:<netmask>:<hostname>:<device>:<autoconf>:<dns0-ip>:<dns1-ip>)
// and, when dns is not empty, the guest.CmdlineDNS token
// ("hyphae.dns=1.1.1.1,8.8.8.8") from which hyphae-init writes
// /etc/resolv.conf. Kernels built with CONFIG_IP_PNP
// apply ip= themselves; for kernels without it (Debian's), hyphae-init
// applies its static form with netlink. The first two DNS servers also go into ip= so such
// kernels expose them in /proc/net/pnp.
func GuestBootArgs(l Lease, dns []netip.Addr) string {
	mask := net.IP(net.CIDRMask(l.Subnet.Bits(), 32)).String()
	fields := []string{l.GuestIP.String(), "", l.HostIP.String(), mask, "", GuestDevice, "off"}
	for i, d := range dns {
		if i == 2 {
			break
		}
		fields = append(fields, d.String())
	}
	args := "ip=" + strings.Join(fields, ":")
	if len(dns) > 0 {
		servers := make([]string, len(dns))
		for i, d := range dns {
			servers[i] = d.String()
		}
		args += " " + guest.CmdlineDNS + "=" + strings.Join(servers, ",")
	}
	return args
}
