// Command netprobe is the program the QEMU networking test boots as the
// guest's entrypoint: it dials each address given as an argument and
// prints "netprobe: <addr> ok <reply>" or "netprobe: <addr> fail <error>",
// then "netprobe: done". It starts with the guest's uptime, to measure
// the boot.
package main

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"strings"
	"time"
)

func main() {
	if b, err := os.ReadFile("/proc/uptime"); err == nil {
		fmt.Printf("netprobe: uptime %ss\n", strings.Fields(string(b))[0])
	}
	for _, addr := range os.Args[1:] {
		fmt.Printf("netprobe: %s %s\n", addr, dial(addr))
	}
	fmt.Println("netprobe: done")
}

// dial connects to addr and reads one line: the server answers with the
// address it saw the guest at. A dropped SYN only ends by the deadline.
func dial(addr string) string {
	c, err := net.DialTimeout("tcp4", addr, 3*time.Second)
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
