// Command probe is the program the namespace tests boot under hyphae-init.
// It prints what it sees as "probe: key=value" lines and behaves as its
// first argument asks. Installed as /sbin/dimension-agent it plays the
// agent instead.
package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hyphae-run/hyphae/guest"
)

func main() {
	if filepath.Base(os.Args[0]) == "dimension-agent" {
		agent()
		return
	}
	if len(os.Args) < 2 {
		fail("usage: probe report|exit N|kill9|orphans N|trap|write-root|read-root|spawn|net")
	}
	switch os.Args[1] {
	case "report":
		report()
	case "exit":
		n, _ := strconv.Atoi(os.Args[2])
		os.Exit(n)
	case "kill9":
		_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {}
	case "orphans":
		n, _ := strconv.Atoi(os.Args[2])
		orphans(n)
	case "spawn":
		spawn()
	case "trap":
		trap()
	case "write-root":
		writeRoot()
	case "read-root":
		readRoot()
	case "net":
		netReport()
	default:
		fail("unknown mode " + os.Args[1])
	}
}

func say(key, value string) { fmt.Printf("probe: %s=%s\n", key, value) }

func fail(msg string) {
	say("error", msg)
	os.Exit(1)
}

// report prints the environment, working directory, stdin and mounts.
func report() {
	for _, k := range []string{"A", "B", "C", "PATH", "HOME", "TERM"} {
		v, ok := os.LookupEnv(k)
		if !ok {
			v = "<unset>"
		}
		say("env."+k, v)
	}
	if b, err := os.ReadFile("/etc/resolv.conf"); err == nil {
		say("resolv", strings.ReplaceAll(string(b), "\n", ";"))
	} else {
		say("resolv", "<none>")
	}
	wd, _ := os.Getwd()
	say("cwd", wd)
	say("pid", strconv.Itoa(os.Getpid()))
	say("ppid", strconv.Itoa(os.Getppid()))
	var st syscall.Stat_t
	if err := syscall.Fstat(0, &st); err == nil {
		say("stdin.rdev", fmt.Sprintf("%d:%d", st.Rdev>>8&0xfff, st.Rdev&0xff))
	}
	n, err := os.Stdin.Read(make([]byte, 1))
	say("stdin.read", fmt.Sprintf("%d %v", n, err))
	mounts()
}

// mounts prints "probe: mount=<mountpoint> <fstype>" per mountinfo line.
func mounts() {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		fail(err.Error())
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// id parent maj:min root mountpoint options [optional...] - fstype source super
		fields := strings.Fields(sc.Text())
		for i, fl := range fields {
			if fl == "-" && i+1 < len(fields) && len(fields) > 4 {
				say("mount", fields[4]+" "+fields[i+1])
				break
			}
		}
	}
}

// orphans starts n children that each start a grandchild and exit without
// waiting for it, so that every grandchild is reparented to PID 1. It then
// waits until none of them is left in /proc (not even as a zombie).
func orphans(n int) {
	var pids []int
	for range n {
		r, w, err := os.Pipe()
		if err != nil {
			fail(err.Error())
		}
		p, err := os.StartProcess("/proc/self/exe", []string{"probe", "spawn"}, &os.ProcAttr{Files: []*os.File{nil, w, os.Stderr}})
		if err != nil {
			fail(err.Error())
		}
		w.Close()
		b, _ := io.ReadAll(r)
		r.Close()
		if _, err := p.Wait(); err != nil {
			fail(err.Error())
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil {
			fail("spawn printed " + string(b))
		}
		pids = append(pids, pid)
	}
	// A deadline only bounds the wait; the assertion is that every orphan
	// is gone, whatever time it took.
	deadline := time.Now().Add(20 * time.Second)
	for _, pid := range pids {
		for {
			stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
			if errors.Is(err, os.ErrNotExist) {
				break
			}
			if time.Now().After(deadline) {
				fail(fmt.Sprintf("orphan %d not reaped: %s", pid, stat))
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	say("orphans.reaped", strconv.Itoa(len(pids)))
}

// spawn starts a grandchild that exits at once, prints its pid and exits
// without waiting for it.
func spawn() {
	p, err := os.StartProcess("/proc/self/exe", []string{"probe", "exit", "0"}, &os.ProcAttr{})
	if err != nil {
		fail(err.Error())
	}
	fmt.Println(p.Pid)
	os.Exit(0)
}

// trap waits for SIGTERM and reports it.
func trap() {
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGTERM)
	say("ready", "1")
	sig := <-c
	say("signal", sig.String())
	os.Exit(0)
}

// writeRoot writes into / and reads it back, then lists the mounts.
func writeRoot() {
	if err := os.WriteFile("/overlay-probe", []byte("written in the guest\n"), 0o644); err != nil {
		fail(err.Error())
	}
	readRoot()
	mounts()
}

// readRoot prints what /overlay-probe holds.
func readRoot() {
	b, err := os.ReadFile("/overlay-probe")
	if err != nil {
		fail(err.Error())
	}
	say("readback", strings.TrimSpace(string(b)))
}

// agent plays /sbin/dimension-agent: it reads the entrypoint itself.
func agent() {
	b, err := os.ReadFile(guest.EntrypointPath)
	if err != nil {
		fail(err.Error())
	}
	argv, err := guest.DecodeEntrypoint(b)
	if err != nil {
		fail(err.Error())
	}
	say("agent.entrypoint", strings.Join(argv, " "))
	say("agent.env.A", os.Getenv("A"))
	wd, _ := os.Getwd()
	say("agent.cwd", wd)
}

// netReport prints "probe: link.<name>=up|down <addr/len>..." per
// interface and "probe: route.default=<gateway> dev <name>" from
// /proc/net/route.
func netReport() {
	ifs, err := net.Interfaces()
	if err != nil {
		fail(err.Error())
	}
	for _, ifc := range ifs {
		state := "down"
		if ifc.Flags&net.FlagUp != 0 {
			state = "up"
		}
		addrs, _ := ifc.Addrs()
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok && ipn.IP.To4() != nil {
				state += " " + ipn.String()
			}
		}
		say("link."+ifc.Name, state)
	}
	b, err := os.ReadFile("/proc/net/route")
	if err != nil {
		fail(err.Error())
	}
	// Iface Destination Gateway Flags ...; addresses in little-endian hex.
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 3 || f[1] != "00000000" {
			continue
		}
		gw, err := strconv.ParseUint(f[2], 16, 32)
		if err != nil {
			continue
		}
		say("route.default", fmt.Sprintf("%d.%d.%d.%d dev %s", gw&0xff, gw>>8&0xff, gw>>16&0xff, gw>>24, f[0]))
	}
}
