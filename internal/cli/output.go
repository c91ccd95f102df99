package cli

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/dustin/go-humanize"
)

// emit prints one command's data: v as indented JSON with --json, else
// whatever text writes (nothing at all under --quiet when quietText is
// nil). Every data-printing command goes through here so that --json and
// --quiet mean the same everywhere.
func (a *app) emit(v any, text, quietText func(w io.Writer)) error {
	switch {
	case a.json:
		return writeJSON(a.env.Stdout, v)
	case a.quiet:
		if quietText != nil {
			quietText(a.env.Stdout)
		}
	default:
		text(a.env.Stdout)
	}
	return nil
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// table prints aligned columns with a header row.
func table(w io.Writer, header []string, rows [][]string) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, strings.Join(header, "\t"))
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	tw.Flush()
}

// fields prints "key  value" lines, aligned.
func fields(w io.Writer, kv ...string) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for i := 0; i+1 < len(kv); i += 2 {
		fmt.Fprintf(tw, "%s\t%s\n", kv[i], kv[i+1])
	}
	tw.Flush()
}

// shortDigest shows the first 12 hex digits, the shortest prefix refs
// accept.
func shortDigest(d string) string {
	hex := strings.TrimPrefix(d, "sha256:")
	if len(hex) > 12 {
		hex = hex[:12]
	}
	return hex
}

func sizeText(n int64) string {
	if n < 0 {
		n = 0
	}
	return humanize.IBytes(uint64(n))
}

func ago(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return humanize.Time(t)
}

// argvText renders an argv as JSON, which shows empty and spaced arguments
// unambiguously.
func argvText(argv []string) string {
	if len(argv) == 0 {
		return "-"
	}
	b, _ := json.Marshal(argv)
	return string(b)
}
