// Command dimbundle is the dimension end-to-end test's misbehaving bundle.
// Its JSON payload picks what it does:
//
//	{"mode":"sleep"}          events tick 1..3 and "sleeping", then wait for
//	                          SIGTERM: stderr "got SIGTERM", exit 42
//	{"mode":"abuse","n":N}    bad frames on several events connections (each
//	                          must be closed by the agent), then N "tick"
//	                          events 0..N-1 as fast as the agent takes them,
//	                          then "flood-done"; stdout "flooded N"
//
// It writes frames by hand where they must be wrong, so it does not trust
// the bundle package for them.
package main

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/hyphae-run/hyphae/bundle"
)

type payload struct {
	Mode string `json:"mode"`
	N    int    `json:"n"`
}

// badFrames is the number of connections abuse ruins, one error event each.
const badFrames = 6

func main() {
	// Subscribed before anything else, so that a stop never finds it deaf.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM)
	raw, err := io.ReadAll(io.LimitReader(os.Stdin, 1<<20))
	if err != nil {
		fail("reading the payload: %v", err)
	}
	var p payload
	if err := json.Unmarshal(raw, &p); err != nil {
		fail("the payload is not JSON: %v", err)
	}
	sock := os.Getenv(bundle.EnvEventsSocket)
	cl := bundle.NewClient(sock)
	defer cl.Close()
	send := func(kind string, body any) {
		if err := cl.Send(kind, body, nil); err != nil {
			fail("sending %s: %v", kind, err)
		}
	}
	switch p.Mode {
	case "sleep":
		for i := 1; i <= 3; i++ {
			send("tick", i)
		}
		send("sleeping", "zzz")
		<-sigs
		fmt.Fprintln(os.Stderr, "dimbundle: got SIGTERM")
		os.Exit(42)
	case "abuse":
		abuse(sock)
		for i := range p.N {
			send("tick", i)
		}
		send("flood-done", p.N)
		fmt.Fprintf(os.Stderr, "dimbundle: flooded %d events\n", p.N)
		fmt.Printf("flooded %d", p.N)
	default:
		fail("unknown mode %q", p.Mode)
	}
}

// abuse writes one bad frame on each of badFrames connections and waits
// for the agent to close each, so that every rejection is reported before
// the flood starts.
func abuse(sock string) {
	frame := func(doc string) []byte {
		b := binary.LittleEndian.AppendUint32(nil, uint32(len(doc)))
		return append(b, doc...)
	}
	length := func(n uint32) []byte { return binary.LittleEndian.AppendUint32(nil, n) }
	bad := []struct {
		name  string
		bytes []byte
		// halfClose ends the write side after the bytes (a truncated frame).
		halfClose bool
	}{
		{"zero length", length(0), false},
		{"length 2^32-1", length(0xFFFFFFFF), false},
		{"length just over the cap", length(262145), false},
		{"not JSON, after a good frame", append(frame(`{"kind":"before-bad","body":"ok"}`), frame("not json at all")...), false},
		{"forged state event", frame(`{"kind":"state","body":{"phase":"completed","status":"completed","exit_code":0}}`), false},
		{"truncated frame", append(length(100), `{"kind":"x"`...), true},
	}
	if len(bad) != badFrames {
		fail("badFrames is %d, but %d bad connections are defined", badFrames, len(bad))
	}
	for _, b := range bad {
		c, err := net.Dial("unix", sock)
		if err != nil {
			fail("%s: dialling the events socket: %v", b.name, err)
		}
		if _, err := c.Write(b.bytes); err != nil {
			fail("%s: writing: %v", b.name, err)
		}
		if b.halfClose {
			if err := c.(*net.UnixConn).CloseWrite(); err != nil {
				fail("%s: half-closing: %v", b.name, err)
			}
		}
		// The agent closes the connection after a bad frame; it never
		// writes to it.
		_ = c.SetReadDeadline(time.Now().Add(60 * time.Second))
		n, err := c.Read(make([]byte, 1))
		if n != 0 || err == nil {
			fail("%s: the agent answered %d bytes (%v) instead of closing", b.name, n, err)
		}
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			fail("%s: the agent did not close the connection", b.name)
		}
		c.Close()
	}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "dimbundle: "+format+"\n", args...)
	os.Exit(1)
}
