// Command hello-go is a hyphae example: it prints a recognizable line, the
// GREETING environment variable when set, and exits with EXIT_CODE
// (default 0). With SLEEP_SECS=N it then waits up to N seconds for SIGTERM,
// printing "got SIGTERM" when it arrives, for tests that stop a running VM.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"
)

func main() {
	fmt.Println("hello from go")
	if g, ok := os.LookupEnv("GREETING"); ok {
		fmt.Printf("GREETING=%s\n", g)
	}
	code := 0
	if s, ok := os.LookupEnv("EXIT_CODE"); ok {
		n, err := strconv.Atoi(s)
		if err != nil {
			fmt.Fprintf(os.Stderr, "EXIT_CODE %q is not a number\n", s)
			n = 2
		}
		code = n
	}
	if s, ok := os.LookupEnv("SLEEP_SECS"); ok {
		secs, err := strconv.Atoi(s)
		if err != nil {
			fmt.Fprintf(os.Stderr, "SLEEP_SECS %q is not a number\n", s)
			os.Exit(2)
		}
		sigs := make(chan os.Signal, 1)
		signal.Notify(sigs, syscall.SIGTERM)
		fmt.Printf("sleeping %d s\n", secs)
		select {
		case <-sigs:
			fmt.Println("got SIGTERM")
		case <-time.After(time.Duration(secs) * time.Second):
			fmt.Println("slept")
		}
	}
	os.Exit(code)
}
