// Command netguest is the guest program of the networking end-to-end
// tests. It dials each address in $NETGUEST_DIAL (comma-separated host:port;
// the host "gw" means the guest's default gateway, its TAP's host address)
// and prints "netguest: <addr> ok <reply>" or "netguest: <addr> fail
// <error>", then its resolver lines. With NETGUEST_HOLD=1 it then prints
// "netguest: holding" and waits for SIGTERM. It exits with $NETGUEST_EXIT.
package main

import (
	"bufio"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	for _, addr := range strings.Split(os.Getenv("NETGUEST_DIAL"), ",") {
		if addr == "" {
			continue
		}
		fmt.Printf("netguest: %s %s\n", addr, dial(addr))
	}
	if b, err := os.ReadFile("/etc/resolv.conf"); err == nil {
		for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
			fmt.Printf("netguest: resolv %s\n", l)
		}
	}
	if os.Getenv("NETGUEST_HOLD") == "1" {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM)
		fmt.Println("netguest: holding")
		<-sig
	}
	code, _ := strconv.Atoi(os.Getenv("NETGUEST_EXIT"))
	os.Exit(code)
}

// dial connects to addr and reads one line: the servers answer with the
// address they saw the guest at. A dropped SYN ends only by the deadline.
func dial(addr string) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "fail " + err.Error()
	}
	if host == "gw" {
		gw, err := gateway()
		if err != nil {
			return "fail " + err.Error()
		}
		addr = net.JoinHostPort(gw.String(), port)
	}
	c, err := net.DialTimeout("tcp4", addr, 4*time.Second)
	if err != nil {
		return "fail " + err.Error()
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "fail " + err.Error()
	}
	return "ok " + strings.TrimSpace(line)
}

// gateway reads the default route's gateway from /proc/net/route, where
// addresses are hex in host (little-endian) byte order.
func gateway() (netip.Addr, error) {
	b, err := os.ReadFile("/proc/net/route")
	if err != nil {
		return netip.Addr{}, err
	}
	for _, l := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(l)
		if len(f) < 3 || f[1] != "00000000" {
			continue
		}
		raw, err := hex.DecodeString(f[2])
		if err != nil || len(raw) != 4 {
			continue
		}
		var a [4]byte
		binary.BigEndian.PutUint32(a[:], binary.LittleEndian.Uint32(raw))
		return netip.AddrFrom4(a), nil
	}
	return netip.Addr{}, fmt.Errorf("no default route")
}
