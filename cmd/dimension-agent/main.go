// Command dimension-agent is the guest sidecar of dimension: hyphae-init
// starts it as the program of a VM when the image holds
// /sbin/dimension-agent. It opens the host channel named by the kernel
// command line (hyphae.channel, default vsock:1024), serves one request
// with package agent, and exits with the bundle's exit code. The events
// socket is $DIMENSION_EVENTS_SOCK, else /run/dimension/events.sock. It
// must be built static (CGO_ENABLED=0).
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/hyphae-run/hyphae/agent"
	"github.com/hyphae-run/hyphae/guest"
)

func main() {
	os.Exit(run())
}

func run() int {
	channel := flag.String("channel", "", "host channel (vsock:<port>, serial:<device>, virtio-port:<name> or fd:<n>); default from "+guest.CmdlineChannel+" on /proc/cmdline, else "+agent.DefaultChannel)
	root := flag.String("root", "/", "directory holding /etc/hyphae")
	flag.Parse()

	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo})).With("component", "dimension-agent")
	raw, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		log.Warn("cannot read /proc/cmdline", "err", err)
	}
	cmdline := strings.TrimSpace(string(raw))
	if *channel == "" {
		*channel = agent.DefaultChannel
		if v, ok := guest.CmdlineValue(cmdline, guest.CmdlineChannel); ok {
			*channel = v
		}
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	conn, err := agent.Open(ctx, *channel)
	if err != nil {
		fmt.Fprintln(os.Stderr, "dimension-agent:", err)
		return 1
	}
	log.Info("host connected", "channel", *channel)
	code, err := agent.Run(ctx, conn, agent.Config{
		Root:         *root,
		BaseEnv:      agent.EnvFromOS(os.Environ()),
		Cmdline:      cmdline,
		EventsSocket: os.Getenv(agent.EnvEventsSocket),
		Logger:       log,
	})
	conn.Close()
	if err != nil {
		fmt.Fprintln(os.Stderr, "dimension-agent:", err)
	}
	if code < 0 || code > 255 {
		return 1
	}
	return code
}
