package image

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/creack/pty"

	"github.com/hyphae-run/hyphae/archive/archivetest"
	"github.com/hyphae-run/hyphae/internal/testenv"
)

// sink is a Builder.Progress file and what was written to it.
type sink struct {
	w    *os.File
	done chan []byte
}

// ptySink is the slave side of a new pseudo-terminal, as stderr is when
// hyphae runs in a terminal.
func ptySink(t *testing.T) sink {
	ptmx, tty, err := pty.Open()
	if err != nil {
		testenv.Unavailable(t, "no pseudo-terminal: "+err.Error())
	}
	return drain(ptmx, tty)
}

// pipeSink is a pipe, as stderr is under `hyphae build 2>&1 | less` or CI.
func pipeSink(t *testing.T) sink {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	return drain(r, w)
}

func drain(r, w *os.File) sink {
	s := sink{w: w, done: make(chan []byte, 1)}
	go func() {
		var b bytes.Buffer
		io.Copy(&b, r) // a pty master ends with EIO once the slave is closed
		r.Close()
		s.done <- b.Bytes()
	}()
	return s
}

// output closes the writing side and returns everything written.
func (s sink) output() string {
	s.w.Close()
	return string(<-s.done)
}

// TestProgressOnTerminalOnly runs the long steps — staging a project with
// its runtime, an import — with Builder.Progress a terminal and a pipe: the
// terminal shows progress, the pipe gets nothing at all.
func TestProgressOnTerminalOnly(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	js := t.TempDir()
	for name, body := range map[string]string{"package.json": `{"name":"p","main":"index.js"}`, "index.js": "\n"} {
		if err := os.WriteFile(filepath.Join(js, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	archivePath := filepath.Join(t.TempDir(), "web.tar")
	if err := archivetest.Write(archivePath, debianLike(archivetest.OCI, true)); err != nil {
		t.Fatal(err)
	}
	ops := []struct {
		name  string
		needs string // a host tool
		run   func(*Builder) error
		shows string // on a terminal
	}{
		{name: "binary", shows: "staged ", run: func(b *Builder) error {
			_, err := b.Build(ctx, BuildOptions{Binary: e.program(t, "svc", "x"), Force: true})
			return err
		}},
		{name: "javascript", needs: "node", shows: "copying node runtime ", run: func(b *Builder) error {
			_, err := b.Build(ctx, BuildOptions{Dir: js, Name: "p", Force: true})
			return err
		}},
		{name: "import", shows: "importing: ", run: func(b *Builder) error {
			_, err := b.Import(ctx, ImportOptions{Archive: archivePath, Force: true})
			return err
		}},
	}
	sinks := []struct {
		name     string
		open     func(*testing.T) sink
		terminal bool
	}{
		{"pty", ptySink, true},
		{"pipe", pipeSink, false},
	}
	for _, op := range ops {
		for _, sk := range sinks {
			t.Run(op.name+"/"+sk.name, func(t *testing.T) {
				if op.needs != "" {
					testenv.RequiresTool(t, op.needs)
				}
				s := sk.open(t)
				b := *e.b
				b.Progress = s.w
				err := op.run(&b)
				out := s.output()
				if err != nil {
					t.Fatal(err)
				}
				if sk.terminal && !strings.Contains(out, op.shows) {
					t.Errorf("terminal got %q, want a line with %q", out, op.shows)
				}
				if !sk.terminal && out != "" {
					t.Errorf("pipe got %q, want nothing", out)
				}
			})
		}
	}
	e.assertClean(t)
}
