package guest

import (
	"fmt"
	"strconv"
	"strings"
)

// hyphae-init reports how the program ended with one line on the console,
// so that the host can read the exit status back from the console log:
//
//	hyphae-init: exit code=0
//	hyphae-init: exit code=137 signal=9
//	hyphae-init: fatal E304: cannot read /etc/hyphae/entrypoint: ...
const (
	statusPrefix = "hyphae-init: "
	exitWord     = "exit "
	fatalWord    = "fatal "
)

// Status is the outcome hyphae-init reports.
type Status struct {
	// ExitCode is the program's exit code, 128+signal when a signal killed
	// it, or -1 for a fatal init error.
	ExitCode int
	// Signal is the signal that killed the program, or 0.
	Signal int
	// Fatal is the init error message when init could not run the program.
	Fatal string
}

// FormatExit renders the console line for a program that ended.
func FormatExit(code, signal int) string {
	if signal != 0 {
		return fmt.Sprintf("%s%scode=%d signal=%d", statusPrefix, exitWord, code, signal)
	}
	return fmt.Sprintf("%s%scode=%d", statusPrefix, exitWord, code)
}

// FormatFatal renders the console line for an init failure.
func FormatFatal(msg string) string {
	return statusPrefix + fatalWord + strings.NewReplacer("\r", " ", "\n", " ").Replace(msg)
}

// ParseStatusLine parses one console line. It reports false for any line
// that is not a status line. A console may prefix lines with carriage
// returns or kernel timestamps, so the marker is searched within the line.
func ParseStatusLine(line string) (Status, bool) {
	i := strings.Index(line, statusPrefix)
	if i < 0 {
		return Status{}, false
	}
	rest := strings.TrimRight(line[i+len(statusPrefix):], "\r\n")
	if msg, ok := strings.CutPrefix(rest, fatalWord); ok {
		return Status{ExitCode: -1, Fatal: msg}, true
	}
	fields, ok := strings.CutPrefix(rest, exitWord)
	if !ok {
		return Status{}, false
	}
	st := Status{}
	seenCode := false
	for _, f := range strings.Fields(fields) {
		k, v, _ := strings.Cut(f, "=")
		n, err := strconv.Atoi(v)
		if err != nil {
			return Status{}, false
		}
		switch k {
		case "code":
			st.ExitCode, seenCode = n, true
		case "signal":
			st.Signal = n
		}
	}
	return st, seenCode
}
