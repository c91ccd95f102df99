// Command dimension-server is dimension's gateway: the HTTP API that
// authenticates callers, stores bundles, runs them in microVMs (or, with
// DIMENSION_MOCK=true, as host processes) and streams their events.
//
// Configuration comes from DIMENSION_* variables and flags (run with -h);
// see package gateway. SIGINT or SIGTERM shuts down gracefully (running
// runs get DIMENSION_DRAIN_TIMEOUT_SECS to finish); a second signal exits
// at once.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"

	"github.com/hyphae-run/hyphae/dimension/gateway"
	"github.com/hyphae-run/hyphae/errcode"
)

func main() {
	os.Exit(run())
}

func run() int {
	cfg, err := gateway.ParseConfig(os.Args[1:], os.Getenv, os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "dimension-server:", err)
		return 2
	}
	cfg.Version = version()
	level := slog.LevelInfo
	if v := os.Getenv("DIMENSION_LOG_LEVEL"); v != "" {
		if err := level.UnmarshalText([]byte(v)); err != nil {
			fmt.Fprintf(os.Stderr, "dimension-server: DIMENSION_LOG_LEVEL=%q: %v\n", v, err)
			return 2
		}
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	go func() {
		// After the first signal, restore the default so a second one
		// ends the process without waiting for the drain.
		<-ctx.Done()
		stop()
	}()
	if err := gateway.Run(ctx, cfg, gateway.RunOptions{Logger: log}); err != nil {
		fmt.Fprintln(os.Stderr, "dimension-server:", err)
		if hint := errcode.HintOf(err); hint != "" {
			fmt.Fprintln(os.Stderr, "  hint:", hint)
		}
		return 1
	}
	return 0
}

// version is the module version the binary was built from, with the VCS
// revision when the build recorded one.
func version() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "dev"
	}
	v := bi.Main.Version
	if v == "" || v == "(devel)" {
		v = "devel"
	}
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" && len(s.Value) >= 12 {
			v += "+" + s.Value[:12]
		}
	}
	return strings.TrimSpace(v)
}
