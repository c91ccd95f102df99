// Command sleeper is a test bundle for the runner's real-VM tests: it
// reports that it is running, then waits for SIGTERM (a stop) and exits
// with 42, or is killed.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/hyphae-run/hyphae/bundle"
)

func main() {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM)
	if err := bundle.Send("sleeping", "zzz", nil); err != nil {
		fmt.Fprintln(os.Stderr, "sleeper:", err)
	}
	<-sigs
	fmt.Fprintln(os.Stderr, "got SIGTERM")
	os.Exit(42)
}
