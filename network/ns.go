package network

import (
	"context"
	"errors"
	"os"
	"runtime"
	"strings"
	"syscall"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/hyphae-run/hyphae/errcode"
)

// namespace is the network namespace a Manager works in: a named one (the
// jailer's --netns, or a test's) or, when handle is not open, the
// process's own.
type namespace struct {
	handle netns.NsHandle
	path   string
	// lockPath names the namespace's nsfs inode, which every process
	// working in the namespace sees, whatever path it opened it by.
	lockPath string
}

func openNamespace(path string) (*namespace, error) {
	if path == "" {
		return &namespace{handle: netns.None(), lockPath: "/proc/self/ns/net"}, nil
	}
	h, err := netns.GetFromPath(path)
	if err != nil {
		return nil, errcode.Wrap(errcode.InvalidArgument, err, "opening network namespace %s", path)
	}
	return &namespace{handle: h, path: path, lockPath: path}, nil
}

// lock takes the namespace-wide lock that serializes changes to the
// hyphae table between processes, so that removing the table with the
// last VM cannot race with another process adding one. flock(2) works on
// nsfs files; closing the returned file unlocks.
func (n *namespace) lock(ctx context.Context) (*os.File, error) {
	return flockFile(ctx, n.lockPath, os.O_RDONLY, errcode.NftFailed)
}

func (n *namespace) close() error {
	if !n.handle.IsOpen() {
		return nil
	}
	return n.handle.Close()
}

// run calls fn on an OS thread inside the namespace, with a netlink handle
// whose sockets live there. Opening /dev/net/tun and writing
// /proc/sys/net act on the calling thread's namespace, which is why this
// switches threads rather than only pointing netlink sockets elsewhere. The
// thread stays locked when its goroutine ends, so Go discards it instead of
// letting other goroutines run in the wrong namespace.
func (n *namespace) run(fn func(h *netlink.Handle) error) error {
	inner := func() error {
		h, err := netlink.NewHandle()
		if err != nil {
			return errcode.Wrap(errcode.NetlinkFailed, err, "opening a netlink socket")
		}
		defer h.Close()
		return fn(h)
	}
	if !n.handle.IsOpen() {
		return inner()
	}
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := netns.Set(n.handle); err != nil {
			done <- errcode.Wrap(errcode.NetlinkFailed, err, "entering network namespace %s", n.path)
			return
		}
		done <- inner()
	}()
	return <-done
}

// nft returns an nftables connection to the namespace.
func (n *namespace) nft() (nftConn, error) {
	var opts []nftables.ConnOption
	if n.handle.IsOpen() {
		opts = append(opts, nftables.WithNetNSFd(int(n.handle)))
	}
	c, err := nftables.New(opts...)
	if err != nil {
		return nil, errcode.Wrap(errcode.NftFailed, err, "opening an nftables connection")
	}
	return c, nil
}

// enableForwarding turns net.ipv4.ip_forward on in the namespace and
// reports whether it was off.
func (n *namespace) enableForwarding() (bool, error) {
	const knob = "/proc/sys/net/ipv4/ip_forward"
	changed := false
	err := n.run(func(*netlink.Handle) error {
		cur, err := os.ReadFile(knob)
		if err != nil {
			return errcode.Wrap(errcode.SysctlFailed, err, "reading net.ipv4.ip_forward")
		}
		if strings.TrimSpace(string(cur)) == "1" {
			return nil
		}
		if err := os.WriteFile(knob, []byte("1\n"), 0o644); err != nil {
			return permissionCode(errcode.SysctlFailed, err, "enabling net.ipv4.ip_forward")
		}
		changed = true
		return nil
	})
	return changed, err
}

// permissionCode wraps err with code, or with errcode.NotRoot when the
// kernel refused for lack of privilege.
func permissionCode(code errcode.Code, err error, what string) error {
	if errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EACCES) {
		return &errcode.Error{Code: errcode.NotRoot, Message: what, Err: err, Hint: "networking needs root (or CAP_NET_ADMIN)"}
	}
	return errcode.Wrap(code, err, "%s", what)
}
