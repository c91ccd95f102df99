// Command bundle is the gateway tests' (and the load benchmark's)
// behaviour bundle. Its JSON payload picks what it does:
//
//	{"mode":"echo"}                      like examples/echo-go
//	{"mode":"sleep"}                     event "sleeping", then wait for SIGTERM; exit 42
//	{"mode":"gate","gate":"/path","n":N} events tick 1..3, wait for the file, ticks 4..3+N (N: 3 when 0)
//	{"mode":"flood","n":N}               N "tick" events as fast as the log takes them
//	{"mode":"exit","code":N}             exit with N at once
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/hyphae-run/hyphae/bundle"
)

type payload struct {
	Mode string `json:"mode"`
	Gate string `json:"gate"`
	N    int    `json:"n"`
	Code int    `json:"code"`
}

func main() {
	// Subscribed before anything else, so a stop never finds it deaf.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM)
	raw, err := io.ReadAll(io.LimitReader(os.Stdin, 16<<20))
	if err != nil {
		fail("reading the payload: %v", err)
	}
	var p payload
	if err := json.Unmarshal(raw, &p); err != nil {
		fail("the payload is not JSON: %v", err)
	}
	cl := bundle.NewClient(os.Getenv(bundle.EnvEventsSocket))
	defer cl.Close()
	send := func(kind string, body any) {
		if err := cl.Send(kind, body, nil); err != nil {
			fail("sending %s: %v", kind, err)
		}
	}
	switch p.Mode {
	case "echo":
		for i := 1; i <= 3; i++ {
			send("progress", map[string]int{"step": i, "of": 3})
		}
		send("result", map[string]json.RawMessage{"echo": raw})
		fmt.Fprintf(os.Stderr, "bundle: echoed %d bytes\n", len(raw))
		os.Stdout.Write(raw)
	case "sleep":
		send("sleeping", "zzz")
		<-sigs
		fmt.Fprintln(os.Stderr, "bundle: got SIGTERM")
		os.Exit(42)
	case "gate":
		for i := 1; i <= 3; i++ {
			send("tick", i)
		}
		// Polled: the test creates the file once it has reconnected.
		for {
			if _, err := os.Stat(p.Gate); err == nil {
				break
			}
			select {
			case <-sigs:
				os.Exit(43)
			case <-time.After(10 * time.Millisecond):
			}
		}
		if p.N <= 0 {
			p.N = 3
		}
		for i := 4; i <= 3+p.N; i++ {
			send("tick", i)
		}
	case "flood":
		for i := range p.N {
			send("tick", i)
		}
	case "exit":
		os.Exit(p.Code)
	default:
		fail("unknown mode %q", p.Mode)
	}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "bundle: "+format+"\n", args...)
	os.Exit(1)
}
