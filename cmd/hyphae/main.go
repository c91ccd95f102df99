// Command hyphae builds content-addressed microVM images and manages the
// local registry; see internal/cli for the commands.
package main

import (
	"context"
	"os"

	"github.com/hyphae-run/hyphae/internal/cli"
)

func main() {
	os.Exit(cli.Execute(context.Background()))
}
