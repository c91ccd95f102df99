// Command guestprog is the program the QEMU driver's real-boot tests run
// inside the guest under hyphae-init. $MODE (set through a hyphae.env.
// token on the kernel command line, so that one image serves every test)
// picks what it does.
package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/hyphae-run/hyphae/agent"
)

func main() {
	mode := os.Getenv("MODE")
	switch {
	case mode == "hello":
		fmt.Println("guestprog: hello from the guest")
	case strings.HasPrefix(mode, "exit"):
		n, _ := strconv.Atoi(strings.TrimPrefix(mode, "exit"))
		fmt.Printf("guestprog: exiting with %d\n", n)
		os.Exit(n)
	case mode == "kill":
		fmt.Println("guestprog: killing myself")
		_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {}
	case mode == "wait":
		sigc := make(chan os.Signal, 1)
		signal.Notify(sigc, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
		fmt.Println("guestprog: waiting for a signal")
		sig := <-sigc
		fmt.Printf("guestprog: got %v\n", sig)
	case mode == "write":
		write()
	case mode == "channel":
		channel()
	case mode == "drive":
		drive()
	default:
		fmt.Printf("guestprog: unknown MODE %q\n", mode)
		os.Exit(2)
	}
}

// write changes the root filesystem, which must reach only the VM's private
// writable layer, never the image.
func write() {
	if err := os.WriteFile("/written-by-guest", []byte(strings.Repeat("x", 1<<20)), 0o644); err != nil {
		fail(err)
	}
	if err := os.Remove("/etc/hyphae/workdir"); err != nil && !os.IsNotExist(err) {
		fail(err)
	}
	unix.Sync()
	fmt.Println("guestprog: wrote to /")
}

// drive prints the serial number of the block device $DRIVE: NVMe keeps
// it on the controller (/sys/block/nvmeXn1/device/serial), virtio-blk on
// the disk (/sys/block/vdX/serial).
func drive() {
	name := filepath.Base(os.Getenv("DRIVE"))
	for _, p := range []string{"/sys/block/" + name + "/serial", "/sys/block/" + name + "/device/serial"} {
		if b, err := os.ReadFile(p); err == nil {
			fmt.Printf("guestprog: drive serial %q\n", strings.TrimSpace(string(b)))
			return
		}
	}
	fail(fmt.Errorf("no serial for %s", name))
}

// channel talks over the channel $CHANNEL names (a serial device, or
// virtio-port:<name>): it greets the host, then echoes one line back.
func channel() {
	dev, _ := os.LookupEnv("CHANNEL")
	port, virtio := strings.CutPrefix(dev, "virtio-port:")
	if virtio {
		var err error
		if dev, err = agent.VirtioPortDevice(context.Background(), port); err != nil {
			fail(err)
		}
	}
	f, err := os.OpenFile(dev, os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		fail(err)
	}
	if !virtio {
		if err := makeRaw(int(f.Fd())); err != nil {
			fail(err)
		}
	}
	// On a virtio port this write waits until the host has connected.
	fmt.Fprintf(f, "hello-from-guest\n")
	line, err := bufio.NewReader(f).ReadString('\n')
	if err != nil {
		fail(err)
	}
	fmt.Fprintf(f, "echo:%s", line)
	fmt.Printf("guestprog: host said %q\n", strings.TrimSpace(line))
	if !virtio {
		// Let the UART drain before init reboots the machine.
		_ = unix.IoctlSetInt(int(f.Fd()), unix.TCSBRK, 1)
	}
}

// makeRaw turns off echo, line editing and output processing, so that the
// serial port carries bytes unchanged.
func makeRaw(fd int) error {
	t, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	if err != nil {
		return err
	}
	t.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON
	t.Oflag &^= unix.OPOST
	t.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
	t.Cflag &^= unix.CSIZE | unix.PARENB
	t.Cflag |= unix.CS8
	t.Cc[unix.VMIN] = 1
	t.Cc[unix.VTIME] = 0
	return unix.IoctlSetTermios(fd, unix.TCSETS, t)
}

func fail(err error) {
	fmt.Printf("guestprog: %v\n", err)
	os.Exit(1)
}
