// Command prog is the static program the end-to-end tests put into an
// imported image archive. $MODE picks what it does: "kill" kills itself
// with SIGKILL (the run must exit 137), anything else greets and exits 0.
package main

import (
	"fmt"
	"os"
	"syscall"
)

func main() {
	switch os.Getenv("MODE") {
	case "kill":
		fmt.Println("prog: killing myself")
		_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {}
	default:
		fmt.Printf("prog: hello from an imported archive (args %q)\n", os.Args[1:])
	}
}
