// Command hyphae-init is the PID 1 of every hyphae VM: it runs the image's
// entrypoint (or the dimension agent), reports how it ended on the console
// and reboots. See package guestinit. Build it statically (CGO_ENABLED=0):
// the image may hold no dynamic loader.
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"

	"github.com/hyphae-run/hyphae/guestinit"
)

func main() {
	if pid := os.Getpid(); pid != 1 {
		fmt.Fprintf(os.Stderr, "hyphae-init: refusing to run as pid %d: it is the init (PID 1) of a hyphae VM and reboots the machine when its program ends\n", pid)
		os.Exit(2)
	}
	// No timestamps: the guest clock may be anything this early, and the
	// host's console log has its own.
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{
		ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
			if len(groups) == 0 && a.Key == slog.TimeKey {
				return slog.Attr{}
			}
			return a
		},
	})).With("component", "hyphae-init")
	guestinit.Boot(context.Background(), guestinit.Config{
		Root:             "/",
		CmdlinePath:      guestinit.ProcCmdline,
		Stdout:           os.Stdout,
		Stderr:           os.Stderr,
		Logger:           log,
		MountFilesystems: true,
	})
}
