// Package network gives microVMs host networking: an address lease, a TAP,
// and nftables rules for NAT and isolation.
//
// # Addresses
//
// A Pool (default 172.16.0.0/16) is carved into /30 subnets. Lease index N
// owns the N-th /30: its .1 is the host end of the TAP, its .2 the guest.
// The TAP is named TapPrefix+N ("hyphae-tap0"), and the guest MAC is
// 06:00 followed by the guest address's four bytes (06:00:ac:10:00:02 for
// 172.16.0.2): locally administered, unicast, unique per address. Which VM
// holds which index is kept by an Allocations implementation that is safe
// across processes (the registry's SQLite, or FileAllocations).
//
// # Guest configuration
//
// GuestBootArgs gives the kernel "ip=" argument and the guest.CmdlineDNS
// token ("hyphae.dns=a,b") from which hyphae-init writes /etc/resolv.conf.
// hyphae-init applies ip= itself on kernels without CONFIG_IP_PNP; for
// QEMU, qemu.AddNetwork also hands the guest the NIC driver modules such
// kernels need.
//
// # Rules
//
// Everything lives in the nftables table "inet hyphae" (TableName). Its
// base chains forward, input (filter, priority 0) and postrouting (nat,
// priority 100) have policy accept and hold only per-VM jump rules, each
// commented "hyphae vm <id>"; a VM's own rules are in chains named
// vm-<id>-out (forwarded from the guest), vm-<id>-in (forwarded to it),
// vm-<id>-host (from the guest to the host itself) and vm-<id>-nat. So a
// VM's rules are removed by deleting its jumps and chains, which is
// idempotent, and each install is one nftables batch, which the kernel
// applies atomically. The guest may send only IPv4 from its own address;
// replies (ct state established,related) always pass; Allow entries and
// the DNS servers' port 53 come next; then destinations in private, shared
// (100.64/10), loopback, link-local, multicast and reserved ranges and the
// pool itself are dropped (with a counter) in vm-<id>-out, and everything
// is dropped in vm-<id>-host; other destinations pass and are masqueraded.
// New connections into a guest are dropped. The table is deleted with the
// last VM. Changes to the table take an flock(2) on the network
// namespace's own nsfs file, which every hyphae process working in that
// namespace shares without any lock directory, so that removing the table
// cannot race with another process adding a VM. Rules elsewhere (another
// table's drop policy, e.g. Docker's FORWARD) can still drop guest traffic
// that hyphae accepts.
//
// # Forwarding
//
// Setup turns net.ipv4.ip_forward on when a VM has NAT and it is off, logs
// it, and reports it in Attachment.ForwardingEnabled. It is never switched
// back off: other VMs, possibly of another hyphae process, or other
// software may depend on it by then, and no single process can tell.
//
// # Namespaces
//
// Config.NetNSPath makes a Manager work inside a named network namespace
// (for the jailer's --netns, and for the tests, which never touch the
// host's own namespace). Data-path tests stand a veth pair, named like a
// TAP, in for the TAP, since a TAP without a VMM reading it passes no
// traffic; TAP creation itself is tested on real TAPs.
package network
