package vm

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"regexp"
	"strings"
	"time"

	"github.com/hyphae-run/hyphae/errcode"
	"github.com/hyphae-run/hyphae/guest"
)

// LineKind says what a console line is.
type LineKind int

// Console line kinds.
const (
	// LineProgram is the program's own output: what the user sees.
	LineProgram LineKind = iota
	// LineKernel is a kernel message (printk, with its timestamp).
	LineKernel
	// LineInit is one of hyphae-init's own log lines.
	LineInit
	// LineVMM is a message the VMM itself printed (QEMU's warnings).
	LineVMM
	// LineStatus is hyphae-init's final "hyphae-init: exit …" or
	// "hyphae-init: fatal …" line.
	LineStatus
)

func (k LineKind) String() string {
	switch k {
	case LineProgram:
		return "program"
	case LineKernel:
		return "kernel"
	case LineInit:
		return "init"
	case LineVMM:
		return "vmm"
	case LineStatus:
		return "status"
	}
	return "unknown"
}

var (
	// kernelLineRE matches a printk line: the Debian kernels have
	// CONFIG_PRINTK_TIME, so every message starts with "[ seconds.micros]".
	kernelLineRE = regexp.MustCompile(`^\[\s*\d+\.\d+\]`)
	// initLineRE matches hyphae-init's slog lines (cmd/hyphae-init tags
	// them component=hyphae-init).
	initLineRE = regexp.MustCompile(`^level=(DEBUG|INFO|WARN|ERROR) .*\bcomponent=hyphae-init\b`)
	// vmmLineRE matches QEMU's own diagnostics ("qemu-system-x86_64: …").
	vmmLineRE = regexp.MustCompile(`^qemu-system-[a-z0-9_]+: `)
)

// Line is one classified console line.
type Line struct {
	Kind LineKind
	// Text is the line without its line ending. For a LineStatus it is
	// whatever the program printed before the status on the same line
	// (output that did not end in a newline), often empty.
	Text string
	// Status is the parsed status of a LineStatus.
	Status guest.Status
	// At is when the host read the line.
	At time.Time
}

// Classify tells a console line's kind. The program's output is everything
// that is not recognizably the kernel's, hyphae-init's or the VMM's; a
// program printing lines that look like printk output would see them
// classified as LineKernel, the price of a console shared by all of them.
func Classify(raw string) Line {
	s := strings.TrimRight(raw, "\r\n")
	s = strings.TrimLeft(s, "\r")
	if st, ok := guest.ParseStatusLine(s); ok {
		return Line{Kind: LineStatus, Text: s[:strings.Index(s, "hyphae-init: ")], Status: st}
	}
	switch {
	case kernelLineRE.MatchString(s):
		return Line{Kind: LineKernel, Text: s}
	case initLineRE.MatchString(s):
		return Line{Kind: LineInit, Text: s}
	case vmmLineRE.MatchString(s):
		return Line{Kind: LineVMM, Text: s}
	}
	return Line{Kind: LineProgram, Text: s}
}

// Defaults of the console follower.
const (
	// followPoll is how often a followed console log is re-read at its end.
	// Short, because the benchmark times first output through it.
	followPoll = 5 * time.Millisecond
	// maxLine bounds one console line; a longer run without a newline is
	// delivered in pieces of this size.
	maxLine = 64 << 10
)

// followConsole reads the console log at path from its start and calls fn
// for each line, as it is written, until done is closed (the VMM exited)
// and everything written by then has been read, or ctx ends. A last line
// without a newline is delivered when done is closed. fn returning false
// stops the follow early.
func followConsole(ctx context.Context, path string, done <-chan struct{}, fn func(Line) bool) error {
	var f *os.File
	for f == nil {
		var err error
		if f, err = os.Open(path); err == nil {
			break
		}
		if !errors.Is(err, os.ErrNotExist) {
			return errcode.Wrap(errcode.VMNotRunning, err, "open console log")
		}
		select {
		case <-done:
			return errcode.New(errcode.VMNotRunning, "no console log at %s", path)
		case <-ctx.Done():
			return errcode.Wrap(errcode.Timeout, ctx.Err(), "waiting for the console log")
		case <-time.After(followPoll):
		}
	}
	defer f.Close()
	var (
		pending []byte
		buf     = make([]byte, 32<<10)
	)
	emit := func(b []byte) bool {
		l := Classify(string(b))
		l.At = time.Now()
		return fn(l)
	}
	// split emits the complete lines in pending, reporting false when fn
	// stopped the follow.
	split := func() bool {
		for {
			var cut int
			if i := bytes.IndexByte(pending, '\n'); i >= 0 && i < maxLine {
				cut = i + 1
			} else if len(pending) >= maxLine {
				cut = maxLine
			} else {
				return true
			}
			if !emit(pending[:cut]) {
				return false
			}
			pending = append(pending[:0], pending[cut:]...)
		}
	}
	for {
		n, err := f.Read(buf)
		if n > 0 {
			pending = append(pending, buf[:n]...)
			if !split() {
				return nil
			}
			continue
		}
		if err != nil && !errors.Is(err, io.EOF) {
			return errcode.Wrap(errcode.VMNotRunning, err, "read console log")
		}
		// At the end of what is written so far.
		select {
		case <-done:
			// The VMM has exited: one more read catches what it wrote last.
			if n, _ := f.Read(buf); n > 0 {
				pending = append(pending, buf[:n]...)
				if !split() {
					return nil
				}
				continue
			}
			if len(pending) > 0 {
				emit(pending)
			}
			return nil
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(followPoll):
		}
	}
}
