// Command echo-go is an example dimension bundle: it reads its JSON
// payload from stdin, reports progress and a result as events, writes a
// line to stderr, prints the payload to stdout, and exits with
// payload.exit_code (0 when absent).
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"github.com/hyphae-run/hyphae/bundle"
)

func main() {
	os.Exit(run())
}

func run() int {
	raw, err := io.ReadAll(io.LimitReader(os.Stdin, 16<<20))
	if err != nil {
		fmt.Fprintln(os.Stderr, "echo-go: reading the payload:", err)
		return 1
	}
	var payload any
	if err := json.Unmarshal(raw, &payload); err != nil {
		fmt.Fprintln(os.Stderr, "echo-go: the payload is not JSON:", err)
		return 1
	}
	connected := bundle.IsConnected()
	for i := 1; i <= 3; i++ {
		if err := bundle.Send("progress", map[string]int{"step": i, "of": 3}, nil); err != nil && connected {
			fmt.Fprintln(os.Stderr, "echo-go: sending progress:", err)
		}
	}
	if err := bundle.Send("result", map[string]any{"echo": payload}, map[string]string{"lang": "go"}); err != nil && connected {
		fmt.Fprintln(os.Stderr, "echo-go: sending the result:", err)
	}
	fmt.Fprintf(os.Stderr, "echo-go: echoed %d bytes\n", len(raw))
	os.Stdout.Write(raw)
	return exitCode(payload)
}

// exitCode returns payload.exit_code when the payload is an object that
// holds a number there.
func exitCode(payload any) int {
	if m, ok := payload.(map[string]any); ok {
		if n, ok := m["exit_code"].(float64); ok {
			return int(n)
		}
	}
	return 0
}
