// Command probe is the guest program of the boot benchmark. Its only line
// gives, in the guest's own clock, when the kernel handed over to PID 1
// (hyphae-init), when this program started, and the uptime as it prints,
// so that the host can split a boot into kernel, init and program phases
// while the kernel stays quiet on the console: the kernel's own log buffer
// (/dev/kmsg) keeps every message, console level or not.
package main

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// initMessage is what the kernel logs when it executes PID 1.
const initMessage = "Run /sbin/init as init process"

func main() {
	up, _ := os.ReadFile("/proc/uptime")
	self := startTicks("/proc/self/stat")
	fmt.Printf("bench-probe: init_us=%s self_ticks=%s uptime=%s\n", initExecMicros(), self, strings.Fields(string(up) + " ?")[0])
}

// initExecMicros finds the kernel's "Run /sbin/init" record in /dev/kmsg
// ("prio,seq,usec,flags;text") and returns its timestamp in µs.
func initExecMicros() string {
	fd, err := syscall.Open("/dev/kmsg", syscall.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return "?"
	}
	defer syscall.Close(fd)
	buf := make([]byte, 8192)
	for {
		n, err := syscall.Read(fd, buf)
		if err == syscall.EPIPE {
			continue // a record was overwritten; the next read goes on
		}
		if err != nil || n <= 0 {
			return "?"
		}
		head, text, ok := strings.Cut(string(buf[:n]), ";")
		if !ok || !strings.HasPrefix(text, initMessage) {
			continue
		}
		if f := strings.Split(head, ","); len(f) >= 3 {
			if _, err := strconv.ParseUint(f[2], 10, 64); err == nil {
				return f[2]
			}
		}
		return "?"
	}
}

// startTicks returns field 22 of a /proc/<pid>/stat file (start time in
// clock ticks since boot), counted after the command name's ')'.
func startTicks(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "?"
	}
	if i := bytes.LastIndexByte(b, ')'); i >= 0 {
		if f := strings.Fields(string(b[i+1:])); len(f) >= 20 {
			return f[19]
		}
	}
	return "?"
}
